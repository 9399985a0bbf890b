"""Host time of `symphony_kernels.route`'s Python path on the CPU, every kernel launch stubbed out (no GPU needed).

Most of what `bench_host.py` measures on a GPU is Python: checks, buffer allocations, launch arguments. This runs
the same code on CPU tensors as if they were on CUDA device 0 (`is_cuda` answers True, the launch layer sees
device 0, the current stream is 0) with every compiled variant a stand-in whose launch does nothing. So a call
costs its host path minus the CUDA share (CPU allocations instead of the caching allocator's, no driver calls):
a way to compare two versions of the host path without a GPU, not a GPU number. Paths: `replay` (eager
inference once the shape was seen: what bench_host times), `no replay` (eager inference through the launch
path: a shape's first call), `grad` (logits that need a gradient: the autograd Function). T = 20000 has more
count blocks than sort programs, so its counter table is zero-filled.

    python benchmarks/bench_host_cpu.py [--n 3000]     # prints a table (microseconds per call, best of 5)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# CPU tensors take the kernels' path: Triton reads this when it is imported. Only as a script: set on import (a
# test module importing this one), it would send every kernel of a GPU test run through the interpreter.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks import bench_host  # noqa: E402

TOKENS = (1, 256, 4096, 20000)


class _Noop:
    """A compiled variant whose launch does nothing."""
    function = packed_metadata = None

    def run(self, *args):
        pass


class _AsCuda:
    """Patches the CPU into looking like CUDA device 0 (see the module docstring) until `undo()`, which also
    removes the no-op variants and the replays recorded meanwhile (a real device 0 must never meet them).
    While `compiling`, a launch first registers a no-op variant for its key (off while timing, so that a timed
    launch costs what a launch of compiled kernels costs)."""

    def __init__(self):
        from symphony_kernels import _launch, routing

        self._launch, self.routing = _launch, routing
        self.replays, self.added = dict(routing._REPLAYS), []
        self.init, self.launch, self.is_cuda = _launch.Call.__init__, _launch.Kernel.launch, torch.Tensor.is_cuda
        self.stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        init = self.init

        def call_init(call, device):
            init(call, device)
            call.device = 0

        _launch.Call.__init__ = call_init
        torch.Tensor.is_cuda = property(lambda t: True)
        torch._C._cuda_getCurrentRawStream = lambda device: 0

    def compiling(self, on: bool):
        launch = self.launch

        def compile_and_launch(kernel, grid, args, meta, device):
            key = kernel.key(args, meta, device)
            if key is not None and key not in kernel.variants:
                kernel.variants[key] = (_Noop(), tuple(dict(meta)[name] for name in kernel.constexpr_names))
                self.added.append((kernel, key))
            launch(kernel, grid, args, meta, device)

        self._launch.Kernel.launch = compile_and_launch if on else launch

    def undo(self):
        self._launch.Call.__init__, self._launch.Kernel.launch, torch.Tensor.is_cuda = \
            self.init, self.launch, self.is_cuda
        for kernel, key in self.added:
            kernel.variants.pop(key, None)
        self.routing._REPLAYS.clear()
        self.routing._REPLAYS.update(self.replays)
        if self.stream is not None:
            torch._C._cuda_getCurrentRawStream = self.stream
        else:
            del torch._C._cuda_getCurrentRawStream


def _time(fn, n: int) -> float:
    return bench_host._time(fn, n, sync=lambda: None)


def measure(n: int = 3000, tokens=TOKENS, E: int = 64, k: int = 8) -> list[dict]:
    import symphony_kernels as sk
    from symphony_kernels import routing

    sk.set_compile_mode("blocking")
    cuda = _AsCuda()
    rows = []
    try:
        for T in tokens:
            logits = torch.randn(T, E)
            needs_grad = logits.clone().requires_grad_()
            cuda.compiling(True)
            sk.route(needs_grad, k)
            with torch.no_grad():
                sk.route(logits, k)  # records the replay
            cuda.compiling(False)
            with torch.no_grad():
                replay = _time(lambda: sk.route(logits, k), n)
                replays = dict(routing._REPLAYS)
                routing._REPLAYS.clear()
                remember, routing._remember = routing._remember, lambda *args: None
                try:
                    launch_path = _time(lambda: sk.route(logits, k), n)
                finally:
                    routing._remember = remember
                    routing._REPLAYS.update(replays)
            grad = _time(lambda: sk.route(needs_grad, k), max(1, n // 2))
            rows.append({"T": T, "replay_us": round(replay, 2), "no_replay_us": round(launch_path, 2),
                         "grad_us": round(grad, 2)})
    finally:
        cuda.undo()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="calls per timing")
    args = parser.parse_args(argv)
    print(f"route, E 64, k 8, launches stubbed, CPU tensors: host path in us per call (torch {torch.__version__})")
    print(f"{'T':>6} {'replay':>8} {'no replay':>10} {'grad':>8}")
    for r in measure(args.n):
        print(f"{r['T']:>6} {r['replay_us']:>8.1f} {r['no_replay_us']:>10.1f} {r['grad_us']:>8.1f}")


if __name__ == "__main__":
    main()
