"""MoTRMSNorm / MoTLayerNorm: parity with one dense norm per modality; from_norm; initialisation; repr."""

import pytest
import torch

from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.nn.norms import MoTLayerNorm, MoTRMSNorm
from sparsemm_kernels.utils.testing import EPS32, Tol, assert_close_verbose

BACKENDS = ["triton", "cpu", "torch"]
# Module-level parity, bounded relative to the root mean square of each compared tensor (the per-element bounds
# are in tests/ops/test_norms.py). Measured worst (SPARSEMM_TOL_LOG, float32, both backends): 4.7 eps32 * rms
# (dx) -> atol = 14 eps32.
TOL = Tol(rtol=0.0, atol=14 * EPS32)


def _skip_unless_runs(backend, device, dtype=torch.float32):
    reasons = unsupported_reasons("modality_norm", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _modules(kind, D, M, bias, backend, device):
    """A MoT norm with distinct random weights per modality, and M float64 dense norms holding the same."""
    if kind == "rms":
        mot = MoTRMSNorm(D, M, eps=1e-6, device=device, backend=backend)
        dense = [torch.nn.RMSNorm(D, eps=1e-6, device=device, dtype=torch.float64) for _ in range(M)]
    else:
        mot = MoTLayerNorm(D, M, eps=1e-6, bias=bias, device=device, backend=backend)
        dense = [torch.nn.LayerNorm(D, eps=1e-6, bias=bias, device=device, dtype=torch.float64) for _ in range(M)]
    with torch.no_grad():
        mot.weight.uniform_(0.5, 1.5)
        if getattr(mot, "bias", None) is not None:
            mot.bias.uniform_(-0.5, 0.5)
        for m, norm in enumerate(dense):
            norm.weight.copy_(mot.weight[m])
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(mot.bias[m])
    return mot, dense


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_modalities", [1, 3])
@pytest.mark.parametrize("kind,bias", [("rms", False), ("layer", True), ("layer", False)])
def test_matches_one_dense_norm_per_modality(kind, bias, num_modalities, backend, device):
    _skip_unless_runs(backend, device)
    B, S, D, M = 2, 9, 20, num_modalities
    mot, dense = _modules(kind, D, M, bias, backend, device)
    ids = torch.randint(0, M, (B, S), device=device)
    ids[0, :4] = 0  # a contiguous run, then interleaved tokens
    x = torch.randn(B, S, D, device=device, requires_grad=True)
    out = mot(x, ids)
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.zeros(B, S, D, dtype=torch.float64, device=device)
    for m, norm in enumerate(dense):  # the MoT paper's style: boolean masks, a loop over modalities
        mask = ids == m
        ref = ref.masked_scatter(mask[..., None].expand_as(ref), norm(x64[mask]))
    assert_close_verbose(out, ref, torch.float32, "out", tol=TOL)
    dy = torch.randn(B, S, D, device=device)
    out.backward(dy)
    ref.backward(dy.double())
    assert_close_verbose(x.grad, x64.grad, torch.float32, "dx", tol=TOL)
    for m, norm in enumerate(dense):
        assert_close_verbose(mot.weight.grad[m], norm.weight.grad, torch.float32, f"dW[{m}]", tol=TOL)
        if bias:
            assert_close_verbose(mot.bias.grad[m], norm.bias.grad, torch.float32, f"db[{m}]", tol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_per_head(backend, device):
    """(B, S, H, d_h) with ids (B, S): each head is normalised over d_h with its token's modality weight."""
    _skip_unless_runs(backend, device)
    B, S, H, dh, M = 2, 4, 3, 8, 2
    mot, dense = _modules("rms", dh, M, False, backend, device)
    ids = torch.randint(0, M, (B, S), device=device)
    q = torch.randn(B, S, H, dh, device=device)
    ref = torch.zeros(B, S, H, dh, dtype=torch.float64, device=device)
    for m, norm in enumerate(dense):
        ref = torch.where((ids == m)[..., None, None], norm(q.double()), ref)
    assert_close_verbose(mot(q, ids), ref, torch.float32, "out", tol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_from_norm_equals_dense_for_every_modality(kind, backend, device):
    _skip_unless_runs(backend, device)
    D = 12
    dense = (torch.nn.RMSNorm if kind == "rms" else torch.nn.LayerNorm)(D, eps=1e-6, device=device)
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5)
        if kind == "layer":
            dense.bias.uniform_(-1, 1)
    mot = (MoTRMSNorm if kind == "rms" else MoTLayerNorm).from_norm(dense, 3, backend=backend)
    assert mot.weight.shape == (3, D) and mot.eps == 1e-6
    assert mot.weight.data_ptr() != dense.weight.data_ptr()
    x = torch.randn(17, D, device=device)
    ids = torch.randint(0, 3, (17,), device=device)
    assert_close_verbose(mot(x, ids), dense.double()(x.double()), torch.float32, "out", tol=TOL)


def test_from_norm_defaults_and_refusals():
    rms = MoTRMSNorm.from_norm(torch.nn.RMSNorm(8, dtype=torch.float64), 2)
    assert rms.eps == torch.finfo(torch.float64).eps and rms.weight.dtype == torch.float64
    ln = MoTLayerNorm.from_norm(torch.nn.LayerNorm(8, bias=False), 2)
    assert ln.bias is None
    with pytest.raises(TypeError, match="`norm`"):
        MoTRMSNorm.from_norm(torch.nn.LayerNorm(8), 2)
    with pytest.raises(TypeError, match="`norm`"):
        MoTLayerNorm.from_norm(torch.nn.RMSNorm(8), 2)
    with pytest.raises(ValueError, match="`norm`"):
        MoTLayerNorm.from_norm(torch.nn.LayerNorm(8, elementwise_affine=False), 2)
    with pytest.raises(ValueError, match="`norm`"):
        MoTRMSNorm.from_norm(torch.nn.RMSNorm((2, 4)), 2)


def test_parameters_initialisation_and_repr():
    rms = MoTRMSNorm(16, 3, dtype=torch.float64)
    assert [n for n, _ in rms.named_parameters()] == ["weight"]
    assert rms.weight.shape == (3, 16) and rms.weight.dtype == torch.float64
    assert torch.equal(rms.weight, torch.ones(3, 16, dtype=torch.float64))
    ln = MoTLayerNorm(16, 2, eps=1e-6)
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    assert torch.equal(ln.weight, torch.ones(2, 16)) and torch.equal(ln.bias, torch.zeros(2, 16))
    assert MoTLayerNorm(16, 2, bias=False).bias is None
    assert repr(rms) == "MoTRMSNorm(16, num_modalities=3, eps=1e-05)"
    assert repr(ln) == "MoTLayerNorm(16, num_modalities=2, eps=1e-06, bias=True)"
    with pytest.raises(ValueError, match="`num_modalities`"):
        MoTRMSNorm(16, 0)
    with pytest.raises(TypeError, match="`dim`"):
        MoTLayerNorm(16.0, 2)
    with pytest.raises(ValueError, match="`weight`"):
        ln(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))  # x's D = 8 but the module's dim is 16
    with pytest.raises(ValueError, match="`modality_ids`"):
        ln(torch.randn(4, 16))  # ids may be left out only with one modality


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_modality_without_ids(backend, device):
    _skip_unless_runs(backend, device)
    x = torch.randn(3, 5, 2, 8, device=device)
    for mot, dense in (
        (MoTRMSNorm(8, 1, device=device, backend=backend), torch.nn.RMSNorm(8, eps=1e-5, device=device)),
        (MoTLayerNorm(8, 1, device=device, backend=backend), torch.nn.LayerNorm(8, device=device)),
    ):
        assert_close_verbose(mot(x), dense.double()(x.double()), torch.float32, type(mot).__name__, tol=TOL)
