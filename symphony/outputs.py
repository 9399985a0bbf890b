"""Output folders written atomically: the work goes into a temporary folder beside the output
(`.NAME.tmp-XXXX`), which is renamed into place at the end (`publish`); a failure removes it. Build and stage 2
write their models this way, so an output folder is either the old one or the complete new one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from symphony.errors import SymphonyError


def check_output_dir(out_dir: Path, force: bool):
    """Fail early when `out_dir` cannot be (re)placed: it exists without `force`, it is not a folder, or its
    parent folder is missing or not writable."""
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise SymphonyError(f"output {out_dir} already exists (use --force to replace it)")
        if not out_dir.is_dir():
            raise SymphonyError(f"output {out_dir} exists and is not a folder; remove it first")
    parent = out_dir.parent
    if not parent.is_dir():
        raise SymphonyError(f"cannot write {out_dir}: {parent} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SymphonyError(f"cannot write {out_dir}: folder {parent} is not writable")


def make_tmp(out_dir: Path) -> Path:
    """A new empty temporary folder beside `out_dir`, readable by others."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise SymphonyError(f"cannot write {out_dir}: {e}") from e
    tmp.chmod(0o755)
    return tmp


def publish(folder: Path, out_dir: Path):
    """Move the finished `folder` to `out_dir`; an old output is replaced only once the new one is in place.
    Files are made readable by others first (safetensors and mkstemp write them private)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(folder, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
