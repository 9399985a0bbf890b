"""Extract the peer for benchmarks/bench_peer.py from a vLLM source: its fused-MoE Triton kernel and tuned tables.

    python tools/make_peer.py SOURCE [--out .carry/peer] [--rev HEAD] [--devices NVIDIA_H200 ...]

SOURCE is any of: a git directory of vLLM (bare or not; `--rev` picks the commit), a directory tree holding
`vllm/` (a checkout, an unpacked sdist or wheel, a site-packages folder), or a vLLM wheel / zip / sdist archive
(e.g. the file `pip download vllm --no-deps --only-binary :all:` saves). This script holds no vLLM code: it
finds the kernel's source text and copies it. The output folder (git-ignored; vLLM's code is never committed
here) holds:

- `vllm_fused_moe_kernel.py`: the `@triton.jit` function `fused_moe_kernel` of
  vllm/model_executor/layers/fused_moe/fused_moe.py and the `@triton.jit` functions of that file it calls,
  copied verbatim under a header naming the vLLM version, commit and licence, and two imports (triton,
  triton.language as tl). Any other name the kernel needs from its file is refused, not guessed;
- `configs/`: vLLM's tuned tables for unquantized weights of the named devices
  (`E=..,N=..,device_name=DEVICE.json`), verbatim;
- `LICENSE`: vLLM's licence (Apache-2.0), verbatim;
- `manifest.json`: where all of it came from (source, version, commit, sha256 of each copied file) and the
  kernel's parameter names, which the launcher (benchmarks/peer_moe.py) checks against the ones it passes.

The folder is written beside `--out` and renamed into place; an existing `--out` is replaced only if it holds a
manifest.json (an earlier output of this script).
"""
from __future__ import annotations

import argparse
import ast
import builtins
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

KERNEL_FILE = "vllm/model_executor/layers/fused_moe/fused_moe.py"
CONFIG_DIR = "vllm/model_executor/layers/fused_moe/configs"
VERSION_FILE = "vllm/_version.py"
KERNEL = "fused_moe_kernel"
OUT_KERNEL = "vllm_fused_moe_kernel.py"
PROVIDED = {"tl", "triton"}  # the header's imports
FORMAT = 1


class PeerError(Exception):
    """A one-line reason why no peer folder was written."""


# ---------------------------------------------------------------------------------------------- sources
class GitSource:
    """Files of one commit of a git directory, read with `git show`."""

    kind = "git"

    def __init__(self, git_dir: Path, rev: str):
        self.git_dir = git_dir
        self.commit = self._git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()

    def _git(self, *args) -> bytes:
        r = subprocess.run(["git", "--git-dir", str(self.git_dir), *args], capture_output=True)
        if r.returncode:
            raise PeerError(f"git {' '.join(args)} failed in {self.git_dir}: {r.stderr.decode().strip()[:200]}")
        return r.stdout

    def read(self, path: str) -> bytes | None:
        r = subprocess.run(["git", "--git-dir", str(self.git_dir), "show", f"{self.commit}:{path}"],
                           capture_output=True)
        return r.stdout if r.returncode == 0 else None

    def names(self, folder: str) -> list[str]:
        out = self._git("ls-tree", "--name-only", f"{self.commit}:{folder}")
        return out.decode().split("\n")[:-1]

    def paths_near_root(self) -> list[str]:
        return []


class TreeSource:
    """Files under a directory that holds vllm/."""

    kind = "tree"

    def __init__(self, root: Path):
        self.root = root
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True)
        self.commit = r.stdout.decode().strip() if r.returncode == 0 and (root / ".git").exists() else None

    def read(self, path: str) -> bytes | None:
        p = self.root / path
        return p.read_bytes() if p.is_file() else None

    def names(self, folder: str) -> list[str]:
        p = self.root / folder
        return sorted(q.name for q in p.iterdir()) if p.is_dir() else []

    def paths_near_root(self) -> list[str]:
        return [str(q.relative_to(self.root)) for d in self.root.glob("vllm-*.dist-info")
                for q in (d / "LICENSE", d / "licenses" / "LICENSE") if q.is_file()]


class ArchiveSource:
    """Files of a wheel / zip (paths from the root) or an sdist tar (paths under one top folder)."""

    kind = "archive"
    commit = None

    def __init__(self, path: Path):
        self.files: dict[str, object] = {}
        if zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            members = [(i.filename, i) for i in self._zip.infolist() if not i.is_dir()]
            self._open = lambda info: self._zip.read(info)
        elif tarfile.is_tarfile(path):
            self._tar = tarfile.open(path)
            members = [(m.name, m) for m in self._tar.getmembers() if m.isfile()]
            self._open = lambda m: self._tar.extractfile(m).read()
        else:
            raise PeerError(f"{path} is neither a zip/wheel nor a tar archive")
        top = {PurePosixPath(n).parts[0] for n, _ in members}
        strip = len(top) == 1 and not any(n == KERNEL_FILE for n, _ in members)  # sdist: one top folder
        for name, member in members:
            key = str(PurePosixPath(*PurePosixPath(name).parts[1:])) if strip else name
            self.files[key] = member

    def read(self, path: str) -> bytes | None:
        m = self.files.get(path)
        return self._open(m) if m is not None else None

    def names(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        return sorted(n[len(prefix):] for n in self.files if n.startswith(prefix) and "/" not in n[len(prefix):])

    def paths_near_root(self) -> list[str]:
        return list(self.files)


def open_source(path: Path, rev: str):
    if not path.exists():
        raise PeerError(f"{path} does not exist")
    if path.is_file():
        return ArchiveSource(path)
    if (path / KERNEL_FILE).is_file():
        return TreeSource(path)
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return GitSource(path, rev)
    if (path / ".git").exists():
        return GitSource(path / ".git", rev)
    raise PeerError(f"{path} is not a git directory, a directory holding {KERNEL_FILE}, or an archive")


LICENSE_PATH = re.compile(r"(vllm-[^/]+\.dist-info/(licenses/)?)?LICENSE")


def license_text(source) -> bytes:
    for path in ["LICENSE"] + sorted(p for p in source.paths_near_root() if LICENSE_PATH.fullmatch(p)):
        data = source.read(path)
        if data is not None:
            return data
    raise PeerError("no LICENSE file found in the source (looked at LICENSE and vllm-*.dist-info/)")


def version_info(source) -> tuple[str | None, str | None]:
    """(version, commit) as vllm/_version.py states them (written by the build; absent in a git tree)."""
    data = source.read(VERSION_FILE)
    if data is None:
        return None, None
    found = {}
    for node in ast.parse(data).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id in ("__version__", "__commit_id__"):
                    found[t.id] = node.value.value
    commit = found.get("__commit_id__")
    if isinstance(commit, str) and re.fullmatch(r"g[0-9a-f]{7,40}", commit):
        commit = commit[1:]  # setuptools-scm's "g<sha>"
    return found.get("__version__"), commit


# -------------------------------------------------------------------------------------------- extraction
def _is_jit(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit" or isinstance(target, ast.Name) \
                and target.id == "jit":
            return True
    return False


def _free_names(fn: ast.FunctionDef) -> set[str]:
    """Names fn reads that are neither its parameters, nor assigned in it, nor builtins."""
    bound = {a.arg for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs}
    loads = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loads - bound - set(dir(builtins))


def extract_kernel(text: str, name: str = KERNEL) -> tuple[list[str], list[str], list[str]]:
    """(function names in file order, their verbatim source texts with decorators, `name`'s parameter names)
    for `name` and the module-level @triton.jit functions it calls, transitively."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if name not in funcs or not _is_jit(funcs[name]):
        raise PeerError(f"no module-level @triton.jit function {name} in {KERNEL_FILE}")
    need, todo = set(), [name]
    while todo:
        fn = funcs[todo.pop()]
        need.add(fn.name)
        for free in sorted(_free_names(fn) - PROVIDED - need):
            if free in funcs and _is_jit(funcs[free]):
                todo.append(free)
            else:
                raise PeerError(f"{fn.name} uses {free!r}, which is not a @triton.jit function of its file: "
                                "make_peer does not know how to provide it")
    chosen = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in need]
    texts = []
    for fn in chosen:
        start = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1
        texts.append("".join(lines[start:fn.end_lineno]))
    params = [a.arg for a in funcs[name].args.args]
    return [fn.name for fn in chosen], texts, params


def kernel_module(texts: list[str], names: list[str], version, commit, where: str) -> str:
    made_from = f"vLLM {version or '(version unknown)'}, commit {commit or '(unknown)'}"
    header = (
        f"# Extracted by tools/make_peer.py (Symphony-MoE) from {made_from},\n"
        f"# file {KERNEL_FILE} ({where}): the functions {', '.join(names)},\n"
        "# copied verbatim below the two imports. Not part of Symphony-MoE; a local benchmark copy only.\n"
        "# SPDX-License-Identifier: Apache-2.0\n"
        "# SPDX-FileCopyrightText: Copyright contributors to the vLLM project\n"
        "# Licensed under the Apache License, Version 2.0 (LICENSE beside this file).\n"
        "import triton\n"
        "import triton.language as tl\n")
    return header + "".join("\n\n" + t for t in texts)


# ---------------------------------------------------------------------------------------------- configs
def config_names(source, devices) -> list[str]:
    pattern = re.compile(r"E=\d+,N=\d+,device_name=(?P<dev>[^,]+)\.json")
    found = [n for n in source.names(CONFIG_DIR) if (m := pattern.fullmatch(n)) and m["dev"] in devices]
    if not found:
        raise PeerError(f"no tuned tables for {', '.join(devices)} in {CONFIG_DIR}")
    return found


# ------------------------------------------------------------------------------------------------ output
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_peer(source_path: Path, out: Path, rev: str = "HEAD", devices=("NVIDIA_H200",)) -> dict:
    """Write the peer folder `out` from `source_path` (see the module docstring); returns its manifest."""
    source = open_source(source_path, rev)
    kernel_src = source.read(KERNEL_FILE)
    if kernel_src is None:
        raise PeerError(f"{source_path} has no {KERNEL_FILE}")
    version, commit = version_info(source)
    commit = source.commit or commit
    names, texts, params = extract_kernel(kernel_src.decode())
    files = {OUT_KERNEL: kernel_module(texts, names, version, commit, source.kind).encode(),
             "LICENSE": license_text(source)}
    tables = config_names(source, set(devices))
    for name in tables:
        files[f"configs/{name}"] = source.read(f"{CONFIG_DIR}/{name}")
    manifest = {"format": FORMAT, "source_kind": source.kind, "source_name": source_path.name,
                "vllm_version": version, "commit": commit, "licence": "Apache-2.0", "kernel_file": KERNEL_FILE,
                "kernel_file_sha256": _sha(kernel_src), "functions": names, "kernel": KERNEL, "kernel_params": params,
                "devices": sorted(devices), "files": {n: _sha(d) for n, d in sorted(files.items())}}
    files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    if out.exists() and not (out / "manifest.json").is_file():
        raise PeerError(f"{out} exists and is not a folder this script wrote (no manifest.json): not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="vLLM git directory, source tree, or wheel/zip/sdist archive")
    ap.add_argument("--out", type=Path, default=Path(".carry/peer"))
    ap.add_argument("--rev", default="HEAD", help="commit of a git source (default HEAD)")
    ap.add_argument("--devices", nargs="+", default=["NVIDIA_H200"],
                    help="device names of the tuned tables to copy (as in vLLM's file names)")
    args = ap.parse_args(argv)
    try:
        m = make_peer(args.source, args.out, args.rev, args.devices)
    except (PeerError, OSError, zipfile.BadZipFile, tarfile.TarError, SyntaxError, UnicodeDecodeError) as e:
        print(f"make_peer: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: vLLM {m['vllm_version']} commit {m['commit']}, functions {', '.join(m['functions'])}, "
          f"{sum(n.startswith('configs/') for n in m['files'])} tables, {folder_bytes(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
