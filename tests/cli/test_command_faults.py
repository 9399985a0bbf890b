"""`symphony eval`, `inspect` and `demo` under the faults of issue 14: texts shorter than --seq-len, outputs that
are folders or would replace inputs (checked before the work), models without a tokenizer or weights, a full
disk, and the demo's work folder on a bad --out, an interrupt or SIGTERM."""
import errno
import json
import os
import shutil
import signal

import pytest

from symphony.cli import demo, main


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, *words, command="eval"):
    err = err.rsplit("\r", 1)[-1]  # after the progress bar, if one ran
    assert rc == 1 and err.startswith(f"symphony {command}: error:") and err.count("\n") == 1, (rc, err)
    for w in words:
        assert w in err, err


def test_a_text_shorter_than_seq_len_is_one_window(moe_dir, tmp_path, capsys):
    from symphony.data import load_tokenizer

    short = tmp_path / "short.txt"
    short.write_text("The old river watched the king near the quiet garden.")
    n = len(load_tokenizer(moe_dir)(short.read_text(), add_special_tokens=False)["input_ids"])
    assert 2 < n < 512
    rc, out, err = run(capsys, "eval", moe_dir, "--text", short, "--json", tmp_path / "r.json")  # --seq-len 512
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["all"]["tokens"] == n - 1
    rc, out, err = run(capsys, "inspect", moe_dir, "--text", short)
    assert rc == 0 and "expert load" in out, err


def test_outputs_are_checked_before_the_work(moe_dir, files, tmp_path, capsys, monkeypatch):
    import symphony.cli.eval
    import symphony.cli.inspect

    monkeypatch.setattr(symphony.cli.eval, "perplexity", lambda *a, **k: pytest.fail("evaluated first"))
    monkeypatch.setattr(symphony.cli.inspect, "expert_load", lambda *a, **k: pytest.fail("measured first"))
    before = {p: p.read_bytes() for p in [*files, moe_dir / "config.json"]}
    for command in ("eval", "inspect"):
        for out, words in [(tmp_path, "it is a folder"), ("", "is empty"),
                           (files[0], "would replace text file"),
                           (moe_dir / "config.json", "would replace file config.json of the model")]:
            rc, _, err = run(capsys, command, moe_dir, "--text", *files, "--json", out)
            one_line(rc, err, words, command=command)
    assert {p: p.read_bytes() for p in before} == before
    rc, _, err = run(capsys, "eval", moe_dir, "--text", files[0], "--seq-len", "65536")
    one_line(rc, err, "--seq-len 65536 is longer than the 32768 positions", "max_position_embeddings")


def test_models_that_cannot_be_read(moe_dir, files, tmp_path, capsys):
    no_tokenizer, no_weights = tmp_path / "no-tokenizer", tmp_path / "no-weights"
    no_tokenizer.mkdir()
    no_weights.mkdir()
    for p in moe_dir.iterdir():
        shutil.copy(p, (no_weights if "safetensors" not in p.name else no_tokenizer) / p.name)
    shutil.copy(moe_dir / "config.json", no_tokenizer)
    (tmp_path / "empty").mkdir()
    for command in ("eval", "inspect"):
        for model, words in [(no_tokenizer, "no tokenizer in"), (no_weights, "no file named model.safetensors"),
                             (tmp_path / "empty", "no config.json")]:
            rc, out, err = run(capsys, command, model, "--text", files[0], "--seq-len", "32")
            one_line(rc, err, words, command=command)
            assert out == ""  # nothing printed before the error
    bad = tmp_path / "bad-report"
    shutil.copytree(moe_dir, bad)
    (bad / "alignment_report.json").write_text("[1, 2]")
    rc, _, err = run(capsys, "inspect", bad)
    one_line(rc, err, "is not a build report", command="inspect")


def test_a_full_disk_is_one_line(moe_dir, files, tmp_path, capsys, monkeypatch):
    import symphony.cli.eval

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(symphony.cli.eval, "write_json", full)
    rc, _, err = run(capsys, "eval", moe_dir, "--text", files[0], "--seq-len", "32", "--json", tmp_path / "r.json")
    one_line(rc, err, "No space left on device", "r.json")


@pytest.fixture
def quick_demo(monkeypatch, tmp_path):
    """The demo without its kernel check, run in tmp_path."""
    monkeypatch.setattr(demo, "check_moe_layer", lambda seed: {"output": 0.0})
    monkeypatch.chdir(tmp_path)


def test_demo_refuses_a_bad_work_folder(quick_demo, tmp_path, capsys):
    here = tmp_path / "old-demo"
    here.mkdir()
    (here / demo.MARKER).write_text("made by `symphony demo`")
    (here / "mine.txt").write_text("mine")
    os.chdir(here)
    for out, words in [("", "--out is empty"), (".", "the current folder"), ("..", "the current folder"),
                       ("mine.txt", "was not made by `symphony demo`")]:
        rc, out_, err = run(capsys, "demo", "--out", out)
        one_line(rc, err, words, command="demo")
        assert "[1/3]" not in out_  # refused before any work
    assert sorted(os.listdir(here)) == sorted([demo.MARKER, "mine.txt"])


@pytest.mark.parametrize("how", ["interrupt", "SIGTERM"])
def test_demo_interrupted_leaves_nothing(quick_demo, tmp_path, capsys, monkeypatch, how):
    if how == "SIGTERM" and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler in this process")
    def write_then_stop(out, seed):
        (out / "sources").mkdir()
        (out / "sources" / "model.safetensors").write_bytes(b"half")
        if how == "interrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process

    monkeypatch.setattr(demo, "_write_sources", write_then_stop)
    rc, _, err = run(capsys, "demo", "--out", "work/demo")
    assert (rc, err.strip()) == ((130, "symphony demo: interrupted") if how == "interrupt" else
                                 (143, "symphony demo: terminated (SIGTERM)"))
    assert os.listdir(tmp_path / "work") == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
