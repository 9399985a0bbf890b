"""What every command does before and while it writes an output: the safety checks, atomic output folders and
files, a lock per output path, cleanup on Ctrl-C and on termination signals, and a full disk said in one line.

- Paths (`output_path`, `check_output_path`): an empty output path is refused (an unset shell variable in
  `--out "$OUT"` gives one, and it would mean the current folder), and so are the current folder and every
  folder above it, and any path that is, or holds, an input of the command (a config, a source, a text file).
- Folders (`atomic_output`): the work goes into a temporary folder beside the output (`.NAME.tmp-XXXXXXXX`),
  which `publish` renames into place at the end, so an output folder is either the old one or the complete new
  one. The block holds a lock on the output path (`.NAME.lock`, flock; a second process writing the same output
  is refused at once), and any exception, Ctrl-C, SIGTERM or SIGHUP removes the temporary folder. `--force`
  replaces an existing output only if it is empty or a model folder (it has a config.json), never an unrelated
  folder.
- Leftovers: SIGKILL (or a power cut) leaves the temporary folder behind. The next write of the same output
  finds it: while that write holds the lock, every `.NAME.tmp-*` / `.NAME.old-*` folder beside the output
  belongs to a process that is gone, so it is reported, and removed with `--force`.
- Signals (`terminate_as_exception`): SIGTERM (what kill, timeout, Slurm, Kubernetes and docker stop send) and
  SIGHUP raise `Terminated` in the main thread, so cleanup runs as for Ctrl-C; the CLI exits 128 + the signal
  number (143 for SIGTERM). A program that calls the library with the default handlers still dies of the
  signal, after the cleanup.
- Disk full (ENOSPC, EDQUOT, EFBIG) inside `atomic_output` or `write_text_atomic` becomes a SymphonyError.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from symphony.errors import SymphonyError, warn

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """Raised in the main thread by a termination signal (see `terminate_as_exception`); like KeyboardInterrupt
    it is not an Exception, so only cleanup code sees it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"terminated by {self.name}")


def _raise_terminated(signum, frame):
    for s in SIGNALS:  # one exception only: a second signal must not interrupt the cleanup it started
        if signal.getsignal(s) is _raise_terminated:
            signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_exception(*, resignal: bool = False):
    """Inside the block, SIGTERM and SIGHUP raise `Terminated` (only where they have their default action and
    only in the main thread; otherwise nothing changes). With `resignal`, a Terminated that leaves the block
    ends the process with the signal's own default action once the block's cleanup has run, as it would have
    ended without the block (what a library function does for a caller that did not ask for exceptions)."""
    installed = []
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            if signal.getsignal(s) == signal.SIG_DFL:
                signal.signal(s, _raise_terminated)
                installed.append(s)
    try:
        yield
    except Terminated as e:
        if resignal and e.signum in installed:
            for s in installed:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), e.signum)
        raise
    finally:
        for s in installed:
            signal.signal(s, signal.SIG_DFL)


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def output_path(path, what: str = "--out") -> Path:
    """`path` as an absolute, normalised Path; an empty one (an unset shell variable) is refused."""
    if path is None or not str(path).strip():
        raise SymphonyError(f"{what} is empty (an unset variable?): give the path to write")
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _replaced(path: Path) -> Path:
    """What writing `path` replaces: the path with its folder's symlinks resolved but not its own last part
    (an output that is a symlink is replaced as a link; its target is left alone)."""
    return path.parent.resolve() / path.name


def check_output_path(path: Path, inputs=None):
    """Refuse an output that is the current folder or a folder above it, or that is or holds one of `inputs`
    ((label, path) pairs, or a {label: path} dict: what the command reads)."""
    out = _replaced(path)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise SymphonyError(f"output {path} is the current folder or a folder above it; give a new folder")
    for label, p in (inputs.items() if isinstance(inputs, dict) else inputs or ()):
        p = Path(p).absolute().resolve()
        if out == p or out in p.parents:
            raise SymphonyError(f"output {path} would replace {label} ({p}); choose another output")


def check_output_dir(out_dir: Path, force: bool, inputs=None):
    """Fail early when `out_dir` cannot or must not be (re)placed: see `check_output_path`; it exists without
    `force`, it is not a folder, it is a non-empty folder that is not a model (no config.json), or its parent
    folder is missing or not writable."""
    check_output_path(out_dir, inputs)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise SymphonyError(f"output {out_dir} already exists (use --force to replace it)")
        if not out_dir.is_dir():
            raise SymphonyError(f"output {out_dir} exists and is not a folder; remove it first")
        if not out_dir.is_symlink() and not (out_dir / "config.json").is_file() and any(out_dir.iterdir()):
            raise SymphonyError(f"output {out_dir} is a folder with files but no model (no config.json): --force "
                                "only replaces an earlier output; remove it yourself if you mean it")
    parent = out_dir.parent
    if not parent.is_dir():
        raise SymphonyError(f"cannot write {out_dir}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SymphonyError(f"cannot write {out_dir}: folder {parent} is not writable")


def check_output_file(path, inputs=None) -> Path:
    """Fail early (before any heavy work) when the file `path` cannot be written: see `check_output_path`; it
    is a folder; its folder is missing or not writable."""
    path = output_path(path, "the output file")
    if path.is_dir():
        raise SymphonyError(f"cannot write {path}: it is a folder (give a file name)")
    check_output_path(path, inputs)
    if not path.parent.is_dir():
        raise SymphonyError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SymphonyError(f"cannot write {path}: folder {path.parent} is not writable")
    return path


_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth
_WRITING: list[Path] = []     # the outputs of the atomic_output blocks now open, outermost first


def _leftover(out_dir: Path, name: str) -> bool:
    prefix = re.escape(f".{out_dir.name}.")
    return bool(re.fullmatch(prefix + r"(tmp-[A-Za-z0-9_]{8}|old-\d+)", name))


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _clean_leftovers(out_dir: Path, force: bool):
    for p in sorted(out_dir.parent.iterdir()):
        if not _leftover(out_dir, p.name) or not p.is_dir() or p.is_symlink():
            continue
        size = _tree_size(p)
        if force:
            shutil.rmtree(p, ignore_errors=True)
            warn(f"removed {p} ({size / 2**20:.1f} MiB), left by an earlier write of {out_dir} that did not finish")
        else:
            warn(f"{p} ({size / 2**20:.1f} MiB) was left by an earlier write of {out_dir} that did not finish "
                 "(killed?); remove it, or run with --force to have it removed")


@contextlib.contextmanager
def output_lock(out_dir: Path, force: bool = False):
    """Hold an exclusive lock on writing `out_dir` (the lock file `.NAME.lock` beside it, removed on release);
    another process that holds it makes this a SymphonyError at once. Reentrant within a process. On first
    acquisition, leftovers of writes that died are reported (removed with `force`)."""
    path = out_dir.with_name(f".{out_dir.name}.lock")
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SymphonyError(f"cannot write {out_dir}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SymphonyError(f"output {out_dir} is being written by another process (pid {owner}); wait for it "
                                "to finish or choose another output") from None
        except OSError as e:  # a filesystem without locks (some network mounts): go on, and say so
            warn(f"cannot lock {path} ({e.strerror}): a second write of {out_dir} at the same time would not "
                 "be noticed")
            break
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the holder removed the file between our open and flock: take the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    _HELD[path] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _clean_leftovers(out_dir, force)
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def make_tmp(out_dir: Path) -> Path:
    """A new empty temporary folder beside `out_dir`, readable by others."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise SymphonyError(f"cannot write {out_dir}: {e}") from e
    tmp.chmod(0o755)
    return tmp


def _disk_full_error(e: OSError, out: Path) -> SymphonyError:
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free now"
    except OSError:
        free = "free space unknown"
    return SymphonyError(f"{e.strerror or 'disk full'} while writing {out} ({free}); nothing was written: free "
                         "some space and run again")


@contextlib.contextmanager
def atomic_output(out_dir, *, force: bool = False, inputs=None):
    """Yield a new temporary folder for writing the folder `out_dir`; the block ends with `publish(folder,
    out_dir)`. Checks the output first (`check_output_dir`), holds `output_lock` for the whole block, and
    removes the temporary folder when the block ends, however it ends (signals: `terminate_as_exception`); a
    full disk is re-raised as a SymphonyError."""
    out = output_path(out_dir)
    check_output_dir(out, force, inputs)
    with terminate_as_exception(resignal=True), output_lock(out, force):
        check_output_dir(out, force, inputs)  # again: another process may have written it before we had the lock
        tmp = make_tmp(out)
        _WRITING.append(out)
        try:
            yield tmp
        except OSError as e:
            if disk_full(e) and _WRITING[0] == out:  # said once, naming the output the user asked for
                raise _disk_full_error(e, out) from e
            raise
        finally:
            _WRITING.pop()
            shutil.rmtree(tmp, ignore_errors=True)


def publish(folder: Path, out_dir: Path):
    """Move the finished `folder` to `out_dir`; an old output is replaced only once the new one is in place.
    Files are made readable by others first (safetensors and mkstemp write them private)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(folder, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path, text: str):
    """Write `text` to the file `path` atomically (a temporary file in the same folder, then a rename); a full
    disk is a SymphonyError and leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(e):
            raise _disk_full_error(e, path) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
