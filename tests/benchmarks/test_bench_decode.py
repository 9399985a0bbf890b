"""benchmarks/bench_decode.py without a GPU: its switches restore what they patch, its table names every mode,
and it refuses to run without CUDA. (The timings themselves need the GPU; tests/kernels/test_decode_rule.py
checks the rule against the tables it wrote.)"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_decode as bd  # noqa: E402
from benchmarks.run_info import _portable  # noqa: E402
from symphony_kernels import _configs, _routing_launch  # noqa: E402


def test_switches_patch_and_restore():
    rule, launch = _configs.decode_mode, _routing_launch._ONE_LAUNCH
    with bd.forced_mode(2), bd.one_launch(not launch):
        assert _configs.decode_mode(10_000, 1) == 2 and _routing_launch._ONE_LAUNCH is (not launch)
    assert _configs.decode_mode is rule and _routing_launch._ONE_LAUNCH is launch
    with pytest.raises(RuntimeError), bd.forced_mode(0):
        raise RuntimeError("the patch is undone on an error too")
    assert _configs.decode_mode is rule


def test_table_marks_modes_not_timed():
    row = {"shape": "s", "T": 8, "floor_us": 10.0, "mode0_us": 20.0, "mode2_us": 30.0, "rule": 0,
           "route_one_launch_us": 5.0, "route_two_launches_us": 9.0}
    assert bd.table([row]).splitlines()[-1] == "| s | 8 | 10.0 | 20.0 | - | 30.0 | 0 | 5.0 | 9.0 |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bd.main(["--out", str(tmp_path)])


def test_results_record_no_absolute_path():
    assert [_portable(a) for a in ["--out", "/somewhere/runs/out", "rel/dir"]] == ["--out", "out", "rel/dir"]
