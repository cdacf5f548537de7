"""MoTLinear: parity with one float64 nn.Linear per modality (every backend); from_linear; initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.utils.testing import EPS32, Tol, assert_close_verbose, check_multilinear

# The layer is one grouped GEMM: the bound and its measurement are those of tests/ops/test_grouped_mm.py
# (float32 atol 3.5 eps32 * scale * sqrt(L); measured here: 0.45 eps32 at most).
TOL = Tol(rtol=0.0, atol=3.5 * EPS32)


def _truth(ids):
    """Per modality, a float64 F.linear over every token, kept where the token has that modality."""

    def truth(x, w, b=None):
        out = x.new_zeros(*x.shape[:-1], w.shape[1])
        for m in range(w.shape[0]):
            out = torch.where((ids == m)[..., None], F.linear(x, w[m], None if b is None else b[m]), out)
        return out

    return truth


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_one_linear_per_modality(backend, num_modalities, bias):
    reasons = unsupported_reasons("grouped_mm", backend, torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    layer = smk.nn.MoTLinear(12, 7, num_modalities, bias=bias, backend=backend)
    ids = torch.randint(0, num_modalities, (3, 11))
    ids[0, :5] = 0  # a contiguous run, then interleaved tokens
    x = torch.randn(3, 11, 12, requires_grad=True)

    def run(x, w, b):
        assert w is layer.weight and b is layer.bias
        return layer(x, ids)

    check_multilinear(run, _truth(ids), [x, layer.weight, layer.bias], torch.float32, TOL)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_from_linear_equals_dense_for_every_modality(backend):
    if unsupported_reasons("grouped_mm", backend, torch.device("cpu"), torch.float32):
        pytest.skip("backend unavailable")
    lin = torch.nn.Linear(9, 5)
    layer = smk.nn.MoTLinear.from_linear(lin, 3, backend=backend)
    assert layer.weight.shape == (3, 5, 9) and layer.bias.shape == (3, 5)
    assert layer.weight.data_ptr() != lin.weight.data_ptr()
    x = torch.randn(20, 9)
    ids = torch.randint(0, 3, (20,))
    got = layer(x, ids)
    x64, w64, b64 = x.double(), lin.weight.detach().double(), lin.bias.detach().double()
    scale = F.linear(x64.abs(), w64.abs(), b64.abs()) * (9 + 1) ** 0.5  # sum |terms| * sqrt(terms)
    assert_close_verbose(got, F.linear(x64, w64, b64), torch.float32, "out", tol=TOL, scale=scale)


def test_initialisation_like_nn_linear_and_independent_per_modality():
    layer = smk.nn.MoTLinear(256, 64, 2, bias=True)
    bound = 1 / math.sqrt(256)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert layer.weight[0].std() > 0.8 * bound / math.sqrt(3)
    assert not torch.equal(layer.weight[0], layer.weight[1])
    assert "num_modalities=2" in repr(layer)


def test_parameters_follow_factory_kwargs():
    layer = smk.nn.MoTLinear(4, 3, 2, bias=True, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
