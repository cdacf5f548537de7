"""pytest-benchmark microbenchmarks: one entry per public op and backend that runs here (``make bench``).

Shapes are tiny on CPU (the suite also runs under ``make test`` as a smoke check) and layer-sized on CUDA.
Timings from pytest-benchmark are wall-clock per call; on CUDA each call ends in a synchronize so the time
covers the kernels. Compare only rows from one run on one machine.
"""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.utils.device import is_interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
T, D, HIDDEN, M = (16384, 1024, 2816, 2) if ON_GPU else (256, 64, 96, 2)
BACKENDS = ["triton", "cuda", "cpu", "torch"]


def _backend_or_skip(op, backend, dtype):
    if backend == "triton" and not ON_GPU and is_interpreting():
        pytest.skip("the Triton interpreter is not timed")
    reasons = unsupported_reasons(op, backend, DEVICE, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _run(benchmark, fn):
    def call():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    call()  # warm-up: compile / autotune outside the timed rounds
    benchmark(call)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, M, (T,), generator=g).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_group_plan(benchmark, backend, ids):
    _backend_or_skip("group_plan", backend, ids.dtype)
    _run(benchmark, lambda: smk.group_plan(ids, M, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_modality_linear(benchmark, backend, ids):
    _backend_or_skip("grouped_mm", backend, DTYPE)
    x = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
    w = torch.randn(M, HIDDEN, D, device=DEVICE, dtype=DTYPE) / D**0.5
    plan = smk.group_plan(ids, M)
    _run(benchmark, lambda: smk.modality_linear(x, ids, w, plan=plan, backend=backend))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_modality_norm(benchmark, backend, norm, ids):
    _backend_or_skip("modality_norm", backend, DTYPE)
    x = torch.randn(T, D, device=DEVICE, dtype=DTYPE)
    w = torch.rand(M, D, device=DEVICE, dtype=DTYPE)
    if norm == "rms":
        _run(benchmark, lambda: smk.modality_rms_norm(x, ids, w, backend=backend, validate=False))
    else:
        b = torch.randn(M, D, device=DEVICE, dtype=DTYPE)
        _run(benchmark, lambda: smk.modality_layer_norm(x, ids, w, b, backend=backend, validate=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_swiglu(benchmark, backend):
    _backend_or_skip("swiglu", backend, DTYPE)
    gate_up = torch.randn(T, 2 * HIDDEN, device=DEVICE, dtype=DTYPE)
    _run(benchmark, lambda: smk.swiglu(gate_up, backend=backend))
