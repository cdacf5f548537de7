"""MoTLinear: parity with one nn.Linear per modality; from_linear; initialisation."""

import math

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.utils.testing import assert_close_verbose


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_one_linear_per_modality(backend, num_modalities, bias):
    reasons = unsupported_reasons("grouped_mm", backend, torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    layer = smk.nn.MoTLinear(12, 7, num_modalities, bias=bias, backend=backend)
    dense = [torch.nn.Linear(12, 7, bias=bias, dtype=torch.float64) for _ in range(num_modalities)]
    with torch.no_grad():
        for m, lin in enumerate(dense):
            lin.weight.copy_(layer.weight[m])
            if bias:
                lin.bias.copy_(layer.bias[m])
    ids = torch.randint(0, num_modalities, (3, 11))
    ids[0, :5] = 0  # a contiguous run, then interleaved tokens
    x = torch.randn(3, 11, 12, requires_grad=True)
    out = layer(x, ids)
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.zeros(3, 11, 7, dtype=torch.float64)
    for m, lin in enumerate(dense):
        ref = torch.where((ids == m)[..., None], lin(x64), ref)
    assert_close_verbose(out, ref, torch.float32, "out")
    dy = torch.randn(3, 11, 7)
    out.backward(dy)
    ref.backward(dy.double())
    assert_close_verbose(x.grad, x64.grad, torch.float32, "dx")
    for m, lin in enumerate(dense):
        assert_close_verbose(layer.weight.grad[m], lin.weight.grad, torch.float32, f"dW[{m}]")
        if bias:
            assert_close_verbose(layer.bias.grad[m], lin.bias.grad, torch.float32, f"db[{m}]")


def test_from_linear_equals_dense_for_every_modality():
    lin = torch.nn.Linear(9, 5)
    layer = smk.nn.MoTLinear.from_linear(lin, 3)
    assert layer.weight.shape == (3, 5, 9) and layer.bias.shape == (3, 5)
    x = torch.randn(20, 9)
    ids = torch.randint(0, 3, (20,))
    assert_close_verbose(layer(x, ids), lin(x).double(), torch.float32, "out")
    assert layer.weight.data_ptr() != lin.weight.data_ptr()


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
