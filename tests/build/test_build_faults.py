"""`symphony build` under the faults of issue 14: outputs that would destroy inputs, signals (SIGTERM, SIGKILL and
the leftovers they leave), two builds of one output at once, a full disk in assembly and in stage 2's save,
sources without a tokenizer, too little calibration text. Each gives one clear line, the right exit status and
nothing half-written beside --out."""
import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from symphony import cli
from symphony.build import pipeline, writer
from symphony.testing import domain_text

ROOT = Path(__file__).resolve().parents[2]

# A build whose assembly writes half a file, says so, then waits to be killed.
SLOW_BUILD = """
import sys, time
import symphony.build.assemble as assemble

def slow(plan, folder, **kw):
    (folder / "model.safetensors").write_bytes(b"half")
    print("WRITING", flush=True)
    time.sleep(120)

assemble.write_model = slow
from symphony.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def job(source_family, tmp_path_factory):
    """Two fixture sources, their calibration text and a config (zeros router init, no stage 2)."""
    root = tmp_path_factory.mktemp("job")
    calib = {}
    for d in ("prose", "code"):
        calib[d] = root / f"{d}.txt"
        calib[d].write_text("\n".join(domain_text(d, 60, seed=11)))
    sources = dict(zip(("prose", "code"), source_family))
    return sources, calib


def config(path, job, **extra):
    sources, calib = job
    data = {"sources": [{"name": n, "path": str(p), "calibration": [str(calib[n])]} for n, p in sources.items()],
            "experts": {"router_init": "zeros"}, "router_training": {"steps": 0}, "device": "cpu", **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def one_line(rc, err, *words, status=1):
    assert rc == status and err.startswith("symphony build: error:") and err.count("\n") == 1, (rc, err)
    for w in words:
        assert w in err, err


def test_outputs_that_would_destroy_inputs_are_refused(job, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    cfg = config(work / "b.yaml", job)
    (work / "notes.txt").write_text("mine")
    sources, calib = job
    monkeypatch.chdir(work)
    cases = [("", "--out is empty"), (".", "the current folder or a folder above it"),
             ("..", "the current folder or a folder above it"), (str(work), "the current folder"),
             ("/", "a folder above it"), (str(sources["code"].parent), "would replace source 'prose'"),
             (str(calib["code"].parent), "would replace text file")]
    for out, words in cases:
        rc, _, err = run_cli(capsys, "build", cfg, "--out", out, "--force", "--quiet")
        one_line(rc, err, words)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work, "--force", "--quiet")
    one_line(rc, err, "would replace the config")
    assert sorted(os.listdir(work)) == ["b.yaml", "notes.txt"] and sources["code"].is_dir() and calib["code"].is_file()


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline()
            break
    if line.strip() != "WRITING":
        proc.kill()
        pytest.fail(f"the child build did not reach assembly: {line!r} {proc.communicate()[1][-2000:]}")
    return proc


def test_sigterm_cleans_up_and_a_second_build_of_the_same_output_is_refused(job, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    cfg = config(tmp_path / "b.yaml", job)
    proc = _start(["build", cfg, "--out", work / "moe", "--quiet"], tmp_path)
    try:
        assert any(p.startswith(".moe.tmp-") for p in os.listdir(work))
        rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--force", "--quiet")
        one_line(rc, err, "is being written by another process", f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "symphony build: terminated (SIGTERM)", err
    assert os.listdir(work) == []  # no temporary folder, no lock file


def test_leftovers_of_a_killed_build_are_reported_then_removed_with_force(job, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    cfg = config(tmp_path / "b.yaml", job)
    proc = _start(["build", cfg, "--out", work / "moe", "--quiet"], tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = [p for p in os.listdir(work) if p.startswith(".moe.tmp-")]
    assert len(left) == 1 and (work / left[0] / "model" / "model.safetensors").is_file()
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
    assert rc == 0 and "warning:" in err and left[0] in err and "--force" in err, err
    assert sorted(os.listdir(work)) == sorted([left[0], "moe"])  # reported, kept; the lock file is gone
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--force", "--quiet")
    assert rc == 0 and f"removed {work / left[0]}" in err, err
    assert os.listdir(work) == ["moe"]


@pytest.mark.parametrize("stage", ["assembly", "stage 2 save"])
def test_a_full_disk_is_one_line_and_leaves_nothing(job, tmp_path, capsys, monkeypatch, stage):
    real, hit = writer._write_tensor, []

    def full_disk(f, entry):  # the disk fills up in the middle of a tensor
        if stage == "assembly" or ".model.tmp-" in f.name:
            hit.append(f.name)
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, entry)

    monkeypatch.setattr(writer, "_write_tensor", full_disk)
    steps = {"steps": 1, "seq_len": 16, "batch_size": 2} if stage != "assembly" else {"steps": 0}
    cfg = config(tmp_path / "b.yaml", job, router_training=steps)
    work = tmp_path / "work"
    work.mkdir()
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
    one_line(rc, err, "No space left on device", str(work / "moe"), "nothing was written")
    assert hit and os.listdir(work) == []


def test_not_enough_free_space_is_refused_before_the_work(job, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    monkeypatch.setattr(pipeline, "_routers", lambda *a: pytest.fail("the build started on a full disk"))
    work = tmp_path / "work"
    work.mkdir()
    rc, _, err = run_cli(capsys, "build", config(tmp_path / "b.yaml", job), "--out", work / "moe", "--quiet")
    one_line(rc, err, "not enough disk space", "1000 B are free")
    assert os.listdir(work) == []


def _without_tokenizer(src, dst, keep=()):
    dst.mkdir()
    for p in src.iterdir():
        if p.name == "config.json" or p.name.endswith(".safetensors") or p.name in keep:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_sources_without_a_working_tokenizer_are_refused(job, tmp_path, capsys):
    sources, calib = job
    bare = _without_tokenizer(sources["code"], tmp_path / "bare")
    broken = _without_tokenizer(sources["code"], tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{}")  # a file, but no vocabulary
    work = tmp_path / "work"
    work.mkdir()
    for srcs, words in [({"prose": sources["prose"], "code": bare}, ["source 'code'", "no tokenizer"]),
                        ({"prose": bare, "code": tmp_path / "bare"}, ["source 'prose'", "no tokenizer"]),
                        ({"prose": sources["prose"], "code": broken}, ["source 'code'", "into no tokens"])]:
        rc, _, err = run_cli(capsys, "build", config(tmp_path / "b.yaml", (srcs, calib)), "--out", work / "moe",
                             "--quiet")
        one_line(rc, err, *words)
        assert os.listdir(work) == []


def test_too_little_calibration_text(job, tmp_path, capsys):
    """Alignment (it runs here: 2 experts per FFN) refuses fewer tokens than FFN neurons (128) and warns under
    4 per neuron; a calibration path that is a folder is said to be one."""
    sources, calib = job
    short = tmp_path / "short.txt"
    short.write_text("\n".join(domain_text("prose", 3, seed=1)))
    work = tmp_path / "work"
    work.mkdir()
    experts = {"router_init": "zeros", "per_source": 2}
    for align, words in [({"calibration": [str(short)]}, ["at least as many calibration tokens as FFN neurons (128)",
                                                          "the calibration text gives"]),
                         ({"calibration": [str(calib["prose"])], "max_tokens": 64}, ["alignment.max_tokens gives 64"]),
                         ({"calibration": [str(tmp_path)]}, ["is a folder, not a text file"])]:
        cfg = config(tmp_path / "b.yaml", job, experts=experts, alignment=align)
        rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
        one_line(rc, err, *words)
        assert os.listdir(work) == []
    cfg = config(tmp_path / "b.yaml", job, experts=experts,
                 alignment={"calibration": [str(calib["prose"])], "max_tokens": 256, "seq_len": 64})
    rc, _, err = run_cli(capsys, "build", cfg, "--out", work / "moe", "--quiet")
    assert rc == 0 and "warning: alignment: only 256 calibration tokens for 128 FFN neurons" in err, err
    import json

    report = json.loads((work / "moe" / "alignment_report.json").read_text())
    assert "only 256 calibration tokens" in report["alignment"]["note"]
