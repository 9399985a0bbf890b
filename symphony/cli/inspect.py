"""`symphony inspect`: what a built model is, how it routes a text, and how its experts were aligned
(symphony.evaluate measures; this prints)."""
from __future__ import annotations

import argparse

from symphony.cli.model_options import add_model_options, check_model_options
from symphony.data import check_seq_len, load_config, load_model, load_tokenizer, read_texts, write_json
from symphony.evaluate import REPORT, config_summary, expert_load, moe_shape, read_report, source_load

HELP = "summarise a built model: config, expert load, alignment report"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def _print_report(obj, indent: str = ""):
    """Print JSON in a readable form: scalars as `key: value`, lists of flat records as tables."""
    for key, value in obj.items():
        records = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        if records and all(not isinstance(x, (dict, list)) for v in value for x in v.values()):
            header = list(dict.fromkeys(k for v in value for k in v))
            print(f"{indent}{key}:")
            print("\n".join(indent + "  " + line for line in
                            _table(header, [[v.get(k, "") for k in header] for v in value]).splitlines()))
        elif isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        else:
            print(f"{indent}{key}: {_scalar(value)}")


def _scalar(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(_scalar, value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="model folder (a transformers checkpoint, e.g. the output of `symphony build`)")
    parser.add_argument("--text", nargs="+", metavar="FILE", help="measure the expert load on these text files")
    add_model_options(parser, json_help="also write everything shown as JSON to OUT")


def run(args) -> int:
    model_dir = check_model_options(args)
    summary = config_summary(model_dir)
    report = read_report(model_dir)
    texts = read_texts(args.text) if args.text else None
    if texts:  # everything that can fail before anything is printed
        moe_shape(load_config(model_dir))
        check_seq_len(load_config(model_dir), args.seq_len)
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, device=args.device, dtype=args.dtype)
    result = {"model": str(model_dir), "config": summary}

    print(f"{model_dir}")
    _print_report(summary, "  ")
    if texts:
        load = expert_load(model, tokenizer, texts, seq_len=args.seq_len, batch_size=args.batch_size)
        result["expert_load"] = load.tolist()
        print(f"\nexpert load on {', '.join(args.text)} (% of routed assignments; uniform = "
              f"{100 / load.shape[1]:.1f}%)")
        print(_table(["layer"] + [f"e{i}" for i in range(load.shape[1])],
                     [[i] + [f"{100 * v:.1f}" for v in row] for i, row in enumerate(load.tolist())]))
        if report and report.get("expert_sources"):
            per_source = source_load(load, report["expert_sources"])
            result["source_load"] = per_source
            print("\nload per source (%)")
            print(_table(["layer"] + list(per_source),
                         [[i] + [f"{100 * v[i]:.1f}" for v in per_source.values()] for i in range(load.shape[0])]
                         + [["mean"] + [f"{100 * sum(v) / len(v):.1f}" for v in per_source.values()]]))
    if report is not None:
        result["alignment_report"] = report
        print(f"\n{REPORT}")
        _print_report(report, "  ")
    if args.json is not None:
        write_json(args.json, result)
    return 0
