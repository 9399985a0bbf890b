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
