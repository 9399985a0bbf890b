"""Importing a benchmark or tool module leaves the environment alone: pytest imports them all when it collects,
and a TRITON_INTERPRET set on import once sent every kernel of a GPU test run through Triton's interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, os, sys
import torch._inductor.config  # torch's own import sets TORCHINDUCTOR_CACHE_DIR
before = dict(os.environ)
names = sys.argv[1:]
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"imported": len(names), "changed": changed}))
"""


def _modules():
    names = []
    for folder, package in ((ROOT / "benchmarks", "benchmarks"), (ROOT / "benchmarks" / "quality", "benchmarks.quality"),
                            (ROOT / "tools", "tools")):
        names += [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py"))
                  if p.stem != "__init__" and not p.stem.startswith("test_")]
    return names


def test_importing_benchmark_modules_changes_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    names = _modules()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"imported": len(names), "changed": []}
