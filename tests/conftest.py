"""Test set-up: Triton's CPU interpreter when there is no GPU, a poisoned allocator, seeds, device lists, and
(with ``SPARSEMM_REQUIRE_EXT=1``, as CI sets it) a session that fails when the native extension is missing or
broken, instead of quietly skipping its tests.

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


def _extension_problem() -> str:
    """Why ``sparsemm_kernels._C`` cannot be trusted here ("" when it imports and its CPU ops compute)."""
    from sparsemm_kernels import _ext

    if not _ext.is_available():
        return _ext.unavailable_reason()
    try:  # a few values through every C++ entry point: an extension that imports can still be broken
        from sparsemm_kernels.kernels.cpu import group_plan_cpu, grouped_gemm_cpu, grouped_gemm_dw_cpu

        order, _, offsets, bad = group_plan_cpu(torch.tensor([1, 0, 1, 0]), 2)
        if order.tolist() != [1, 3, 0, 2] or offsets.tolist() != [0, 2, 4] or bad != -1:
            return f"group_plan_cpu gives {order.tolist()} / {offsets.tolist()} / {bad}"
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]])
        off = torch.tensor([0, 1, 2])
        y = grouped_gemm_cpu(a, w, off)
        if y.tolist() != [[1.0, 2.0], [6.0, 7.0]]:
            return f"grouped_gemm_cpu gives {y.tolist()}, want [[1, 2], [6, 7]]"
        dw, db = grouped_gemm_dw_cpu(y, a, off, compute_dbias=True)
        if dw.tolist() != [[[1.0, 2.0], [2.0, 4.0]], [[18.0, 24.0], [21.0, 28.0]]] or db.tolist() != [[1, 2], [6, 7]]:
            return f"grouped_gemm_dw_cpu gives {dw.tolist()} / {db.tolist()}"
    except Exception as exc:  # noqa: BLE001  any failure of the smoke call is the message
        return f"calling it failed: {type(exc).__name__}: {exc}"
    return ""


def pytest_sessionstart(session):
    if os.environ.get("SPARSEMM_REQUIRE_EXT", "") in ("", "0"):
        return
    problem = _extension_problem()
    if problem:
        raise pytest.UsageError(
            f"SPARSEMM_REQUIRE_EXT is set but the native extension is unusable: {problem}. "
            "Build it (`make build` or `pip install --no-build-isolation -e .`) or unset SPARSEMM_REQUIRE_EXT."
        )


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
