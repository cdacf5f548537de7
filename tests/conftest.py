"""Test set-up: Triton's CPU interpreter when there is no GPU, a poisoned allocator, seeds, device lists.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported (``@triton.jit`` decides at
decoration time), hence at the very top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check correctness, not speed: one tile config per kernel, no autotuning runs.
os.environ.setdefault("SPARSEMM_AUTOTUNE", "0")

import pytest  # noqa: E402

# CUDA runs carry the `gpu` mark, so `pytest -m gpu` on a GPU machine selects exactly them.
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fresh seed per test; every ``torch.empty`` returns NaN (floats) / max-int, so unwritten output shows."""
    torch.manual_seed(1234)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
