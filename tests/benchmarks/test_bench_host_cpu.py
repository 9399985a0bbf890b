"""benchmarks/bench_host_cpu.py at a few calls: every path timed, and afterwards nothing of its stand-ins is left
(CPU tensors are not CUDA ones again, no no-op variant or replay stays behind). No timing assertions."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_host_cpu  # noqa: E402
from symphony_kernels import _routing_launch, routing  # noqa: E402
from symphony_kernels._runtime import INTERPRET  # noqa: E402


@pytest.mark.skipif(not INTERPRET, reason="times the kernels' path of CPU tensors (Triton's interpreter)")
def test_host_path_timings_leave_nothing_behind():
    seen = {}

    def spy(replay_run):
        def run(self, tensors):
            seen["replayed"] = True
            return replay_run(self, tensors)
        return run

    from symphony_kernels import _launch

    had_stream = hasattr(torch._C, "_cuda_getCurrentRawStream")
    real_run = _launch.Replay.run
    _launch.Replay.run = spy(real_run)
    try:
        rows = bench_host_cpu.measure(n=3, tokens=(1, 9000))
    finally:
        _launch.Replay.run = real_run
    assert [r["T"] for r in rows] == [1, 9000] and seen == {"replayed": True}
    assert all(r[key] > 0 for r in rows for key in ("replay_us", "no_replay_us", "grad_us"))
    assert not torch.zeros(1).is_cuda and hasattr(torch._C, "_cuda_getCurrentRawStream") == had_stream
    assert not any(key[-1] == 0 for k in _routing_launch._KERNELS.values() for key in k.variants)
    assert not any(key[3] == torch.device("cpu") for key in routing._REPLAYS)
