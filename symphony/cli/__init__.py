"""`symphony` command line. Each command lives in its own module, imported only when that command runs.

A command module defines HELP (one line), add_arguments(parser) and run(args) -> int | None.
Every command: a SymphonyError or a full disk is one `symphony CMD: error: ...` line and exit status 1; Ctrl-C
exits 130, SIGTERM 143 and SIGHUP 129 after the cleanup (symphony.outputs.terminate_as_exception).
"""
import argparse
import importlib
import sys

COMMANDS = {
    "build": ("symphony.cli.build", "build a Symphony-MoE checkpoint from dense sources (YAML config)"),
    "train": ("symphony.cli.train", "stage 2 on a built MoE: train its routers or every parameter"),
    "eval": ("symphony.cli.eval", "perplexity of a model on text files"),
    "inspect": ("symphony.cli.inspect", "summarise a built model: config, expert load, alignment report"),
    "demo": ("symphony.cli.demo", "the built-in default job (see README)"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="symphony", description="Symphony-MoE: build one MoE model from several dense checkpoints, and run it fast.")
    parser.add_argument("--version", action="version", version="symphony-moe 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from symphony.errors import SymphonyError
    from symphony.outputs import Terminated, disk_full, terminate_as_exception

    try:
        with terminate_as_exception():
            return args._run(args) or 0
    except SymphonyError as e:
        return _fail(args.command, str(e))
    except OSError as e:
        if not disk_full(e):
            raise
        return _fail(args.command, f"{e.strerror} ({e.filename or 'while writing'})")
    except KeyboardInterrupt:
        print(f"symphony {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"symphony {args.command}: terminated ({e.name})", file=sys.stderr)
        return 128 + e.signum


def _fail(command: str, message: str) -> int:
    """One line on stderr (a message from a library may hold line breaks), exit status 1."""
    print(f"symphony {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
