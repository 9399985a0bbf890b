"""symphony.outputs on its own: atomic folders and files, the lock, leftovers, signals, a full disk."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from symphony import outputs
from symphony.errors import SymphonyError

ROOT = Path(__file__).resolve().parents[1]


def test_a_library_caller_killed_by_sigterm_dies_of_it_after_the_cleanup(tmp_path):
    """A program that did not ask for exceptions: atomic_output removes its temporary folder and lock, then
    the process ends by SIGTERM as it would have without symphony."""
    child = ("import sys, time\nfrom symphony.outputs import atomic_output\n"
             "with atomic_output(sys.argv[1]) as tmp:\n"
             "    (tmp / 'half').write_bytes(b'x')\n    print('READY', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "READY"
    assert len(os.listdir(tmp_path)) == 2  # the temporary folder and the lock file
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and os.listdir(tmp_path) == []


@pytest.fixture
def default_signals():
    """SIGTERM and SIGHUP at their default action for the test (a run under nohup ignores SIGHUP), restored."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    if any(h not in (signal.SIG_DFL, signal.SIG_IGN) for h in before.values()):
        pytest.skip("a termination signal has a handler in this process")
    for s in before:
        signal.signal(s, signal.SIG_DFL)
    yield
    for s, h in before.items():
        signal.signal(s, h)


def test_termination_signals_raise_in_the_block_and_handlers_come_back(default_signals):
    with pytest.raises(outputs.Terminated) as e, outputs.terminate_as_exception():
        os.kill(os.getpid(), signal.SIGHUP)
    assert e.value.name == "SIGHUP"
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_an_ignored_signal_stays_ignored(default_signals):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
    with outputs.terminate_as_exception():
        os.kill(os.getpid(), signal.SIGHUP)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_leftovers_are_only_this_outputs_temporary_folders(tmp_path, capsys):
    names = [".moe.tmp-ab_cd123", ".moe.old-4242", ".moe.tmp-x", ".moe2.tmp-ab_cd123", ".moe.lockdir", "moe"]
    for n in names:
        (tmp_path / n).mkdir()
    with outputs.output_lock(tmp_path / "moe"):
        assert (tmp_path / ".moe.lock").is_file()
        with outputs.output_lock(tmp_path / "moe"):  # the same process may nest
            pass
    err = capsys.readouterr().err
    assert ".moe.tmp-ab_cd123" in err and ".moe.old-4242" in err and "--force" in err and ".moe2" not in err
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # reported, not removed, lock file gone
    with outputs.output_lock(tmp_path / "moe", force=True):
        pass
    assert sorted(os.listdir(tmp_path)) == sorted([".moe.tmp-x", ".moe2.tmp-ab_cd123", ".moe.lockdir", "moe"])


def test_a_full_disk_in_an_atomic_file_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    class Full:
        def __init__(self, fd, mode):
            self.f = open(fd, mode)

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(outputs.os, "fdopen", Full)
    with pytest.raises(SymphonyError, match="No space left on device while writing .*r.json"):
        outputs.write_text_atomic(tmp_path / "r.json", "{}" * 100)
    assert os.listdir(tmp_path) == []


def test_an_output_that_is_a_symlink_is_replaced_as_a_link(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (tmp_path / "out").symlink_to(target)
    with outputs.atomic_output(tmp_path / "out", force=True) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        outputs.publish(tmp, tmp_path / "out")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "config.json").read_text() == '{"new": 1}'
    assert (target / "config.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["out", "target"]


def test_a_filesystem_without_locks_is_said_and_the_write_goes_on(tmp_path, capsys, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(outputs.fcntl, "flock", no_locks)
    with outputs.atomic_output(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
        outputs.publish(tmp, tmp_path / "out")
    assert "cannot lock" in capsys.readouterr().err and os.listdir(tmp_path) == ["out"]
