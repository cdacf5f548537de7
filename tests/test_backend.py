"""Backend selection: automatic choice falls back silently, a forced backend runs or says why it cannot."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import select_backend, unsupported_reasons
from sparsemm_kernels.utils.device import is_interpreting
from sparsemm_kernels.utils.testing import offsets_from_counts

CPU = torch.device("cpu")


def test_auto_selection_on_cpu_never_picks_the_interpreter():
    assert select_backend("grouped_mm", CPU, torch.float32) in ("torch", "cpu")
    assert select_backend("grouped_mm", CPU, torch.float64) in ("torch", "cpu")
    assert select_backend("grouped_mm", CPU, torch.float16) == "torch"
    assert select_backend("group_plan", CPU, torch.int64) in ("cpu", "torch")


def test_forced_unavailable_backend_explains():
    with pytest.raises(smk.BackendUnavailableError, match="`grouped_mm` has no cuda implementation"):
        select_backend("grouped_mm", CPU, torch.float32, "cuda")
    with pytest.raises(smk.BackendUnavailableError, match="needs CUDA tensors"):
        select_backend("group_plan", CPU, torch.int64, "cuda")
    with pytest.raises(smk.BackendUnavailableError, match="float64"):
        select_backend("grouped_mm", CPU, torch.float64, "triton")


def test_float64_goes_to_a_backend_that_supports_it():
    reasons = unsupported_reasons("grouped_mm", "triton", CPU, torch.float64)
    assert any("float64" in r for r in reasons)
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(2, 5, 3, dtype=torch.float64)
    out = smk.grouped_mm(x, w, offsets_from_counts([1, 3]))
    assert out.dtype == torch.float64


def test_environment_variable_is_a_preference(monkeypatch):
    monkeypatch.setenv("SPARSEMM_BACKEND", "torch")
    assert select_backend("grouped_mm", CPU, torch.float32) == "torch"
    monkeypatch.setenv("SPARSEMM_BACKEND", "cpu")
    assert select_backend("grouped_mm", CPU, torch.float64) == "cpu"
    # cpu has no block gather: the preference falls back to the automatic choice instead of failing the model.
    assert select_backend("block_gather", CPU, torch.float32) == "torch"
    assert select_backend("modality_norm", CPU, torch.float32) == "cpu"
    monkeypatch.setenv("SPARSEMM_BACKEND", "cuda")
    out = smk.grouped_mm(torch.randn(2, 3), torch.randn(1, 4, 3), offsets_from_counts([2]))
    assert out.shape == (2, 4)
    # An explicit argument is strict and wins over the environment.
    assert select_backend("grouped_mm", CPU, torch.float32, "torch") == "torch"
    with pytest.raises(smk.BackendUnavailableError):
        smk.grouped_mm(torch.randn(2, 3), torch.randn(1, 4, 3), offsets_from_counts([2]), backend="cuda")
    monkeypatch.setenv("SPARSEMM_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SPARSEMM_BACKEND"):
        select_backend("grouped_mm", CPU, torch.float32)


def test_preference_falls_back_per_op():
    assert select_backend("grouped_mm", CPU, torch.float32, "prefer:cpu") == "cpu"
    assert select_backend("block_gather", CPU, torch.float32, "prefer:cpu") == "torch"
    assert select_backend("modality_norm", CPU, torch.bfloat16, "prefer:cpu") == "torch"  # C++ norms: fp32/fp64
    assert select_backend("swiglu", CPU, torch.float16, "prefer:cpu") == "torch"
    assert select_backend("grouped_mm", CPU, torch.float16, "prefer:cpu") == "torch"  # cpu has no fp16 GEMM
    with pytest.raises(ValueError, match="`backend`"):
        select_backend("grouped_mm", CPU, torch.float32, "prefer:tpu")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="`backend`"):
        select_backend("grouped_mm", CPU, torch.float32, "tpu")
    with pytest.raises(TypeError, match="`backend`"):
        select_backend("grouped_mm", CPU, torch.float32, 3)


@pytest.mark.skipif(not is_interpreting(), reason="only meaningful when the CPU run uses the interpreter")
def test_triton_available_on_cpu_under_interpreter():
    assert "triton" in smk.available_backends("grouped_mm", "cpu", torch.float32)


@pytest.mark.parametrize("installed,ok", [("3.6.0", True), ("3.9.0", True), ("3.7.1+git123", True),
                                          ("3.5.1", False), ("3.10.0", False), ("4.0.0", False)])
def test_triton_outside_the_supported_range_is_unavailable_with_the_reason(monkeypatch, installed, ok):
    import importlib.metadata

    from sparsemm_kernels import backend
    from sparsemm_kernels.utils import device

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    device.triton_version_problem.cache_clear()
    backend._select_cached.cache_clear()
    try:
        reasons = unsupported_reasons("grouped_mm", "triton", torch.device("cpu"), torch.float32)
        assert any("supported range 3.6-3.9" in r for r in reasons) != ok, reasons
    finally:
        monkeypatch.undo()
        device.triton_version_problem.cache_clear()
        backend._select_cached.cache_clear()


def test_tf32_setting_read_from_either_api(monkeypatch):
    # The new fp32_precision API: reading the legacy flag after it has been used raises in torch.
    from sparsemm_kernels.kernels.triton.grouped_gemm import _dot_precision
    from sparsemm_kernels.utils.device import fp32_matmul_allows_tf32

    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr("sparsemm_kernels.kernels.triton.grouped_gemm.is_interpreting", lambda: False)
    prev = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fp32_matmul_allows_tf32() and _dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert not fp32_matmul_allows_tf32() and _dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "none"  # inherits the global setting
        monkeypatch.setattr(torch.backends, "fp32_precision", "tf32")
        assert fp32_matmul_allows_tf32()
        assert _dot_precision(torch.bfloat16) == "tf32"  # 16-bit operands: the tensor-core dot either way
    finally:
        matmul.fp32_precision = prev  # (only the new API was used: the legacy flag stays readable)


def test_cuda_fallback_to_torch_is_said(monkeypatch):
    # Automatic selection on CUDA landing on the torch fallback for a dtype the kernels take: a RuntimeWarning
    # with the reason (here: no triton), not a silent slowdown. float64 (no kernel takes it) says nothing.
    import warnings

    from sparsemm_kernels import backend

    monkeypatch.setattr(backend, "has_triton", lambda: False)
    with pytest.warns(RuntimeWarning, match="grouped_mm on CUDA.*torch fallback.*triton"):
        assert backend._auto("grouped_mm", torch.device("cuda"), torch.bfloat16) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend._auto("grouped_mm", torch.device("cuda"), torch.float64) == "torch"
