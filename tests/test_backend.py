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


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("SPARSEMM_BACKEND", "torch")
    assert select_backend("grouped_mm", CPU, torch.float32) == "torch"
    monkeypatch.setenv("SPARSEMM_BACKEND", "cuda")
    with pytest.raises(smk.BackendUnavailableError):
        smk.grouped_mm(torch.randn(2, 3), torch.randn(1, 4, 3), offsets_from_counts([2]))
    # An explicit argument wins over the environment.
    assert select_backend("grouped_mm", CPU, torch.float32, "torch") == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="`backend`"):
        select_backend("grouped_mm", CPU, torch.float32, "tpu")
    with pytest.raises(TypeError, match="`backend`"):
        select_backend("grouped_mm", CPU, torch.float32, 3)


@pytest.mark.skipif(not is_interpreting(), reason="only meaningful when the CPU run uses the interpreter")
def test_triton_available_on_cpu_under_interpreter():
    assert "triton" in smk.available_backends("grouped_mm", "cpu", torch.float32)
