"""Shared test setup: the `gpu` marker, Triton's CPU interpreter, and small real source checkpoints."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare calls bitwise: every call runs the kernels (tests/kernels/test_launch.py covers the background mode).
os.environ.setdefault("SYMPHONY_COMPILE", "blocking")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when a kernel is decorated, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@pytest.fixture(scope="session")
def source_family(tmp_path_factory):
    """Three small Qwen2 sources (prose, code, math) that share one base and one vocabulary."""
    from symphony.testing import make_family

    return make_family(tmp_path_factory.mktemp("family"), arch="qwen2", seed=0)


def _gloo_child(fn, rank, world, port, out, args):
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = {"value": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out)
    os._exit(0)  # a forked child must not run pytest's exit handlers


@pytest.fixture
def gloo(tmp_path_factory):
    """run(fn, world, *args): fn(rank, world, *args) in `world` processes forked from this one (no re-import:
    they start in milliseconds) and joined by a gloo process group on a free port; returns the per-rank
    results. One thread per process. Skips the test when torch.distributed or gloo is unavailable."""
    import multiprocessing
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")

    def run(fn, world, *args, timeout=120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        folder = tmp_path_factory.mktemp("gloo")
        outs = [folder / f"rank{r}.pt" for r in range(world)]
        procs = [ctx.Process(target=_gloo_child, args=(fn, r, world, port, outs[r], args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r, out in enumerate(outs):
            if not out.is_file():
                pytest.fail(f"gloo rank {r} of {world} died or timed out (exit code {procs[r].exitcode})")
            result = torch.load(out, weights_only=False)
            if "error" in result:
                pytest.fail(f"gloo rank {r} of {world} failed:\n{result['error']}")
            results.append(result["value"])
        return results

    return run
