"""silu_mul(gate, up): the two-tensor SwiGLU, on every backend against float64 F.silu(gate) * up."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.utils.testing import assert_close_verbose
from tests.ops.test_swiglu import TOL
from tests.ops.test_swiglu import _scales as swiglu_scales

SHAPES = [  # each row names the edge it crosses (interpreter tiles are 16 wide, 256 elements)
    (1, 1),        # one element
    (7, 33),       # H off the tile
    (40, 16),      # many row tiles, H on the tile
    (3, 5, 17),    # 3-D
    (0, 8),        # no rows
]


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_mul_matches_float64(shape, dtype, backend):
    reasons = unsupported_reasons("swiglu", backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    gate = (torch.randn(shape) * 4).to(dtype).requires_grad_(True)  # wide range: the sigmoid's tails
    up = torch.randn(shape).to(dtype).requires_grad_(True)
    y = smk.silu_mul(gate, up, backend=backend)
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (gate, up))
    ref = g64 / (1 + torch.exp(-g64)) * u64
    assert y.dtype == dtype and y.shape == ref.shape
    dy = torch.randn(shape).to(dtype)
    # The error model of the fused form: the scale of [gate | up] side by side.
    s_out, s_grad = swiglu_scales(torch.cat([gate.detach(), up.detach()], dim=-1), dy)
    h = shape[-1]
    assert_close_verbose(y, ref, dtype, "y", tol=TOL[dtype], scale=s_out)
    grads = zip(torch.autograd.grad(y, (gate, up), dy), torch.autograd.grad(ref, (g64, u64), dy.double()),
                ("dgate", "dup"), (s_grad[..., :h], s_grad[..., h:]))
    for got, want, name, sc in grads:
        assert_close_verbose(got, want, dtype, name, tol=TOL[dtype], scale=sc)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_silu_mul_strided_halves_equal_swiglu(backend):
    buf = torch.randn(9, 2 * 12, requires_grad=True)
    y = smk.silu_mul(buf[:, :12], buf[:, 12:], backend=backend)  # row-strided views, no copy
    z = smk.swiglu(buf, backend=backend)
    torch.testing.assert_close(y, z)
    (g1,) = torch.autograd.grad(y.square().sum(), buf)
    (g2,) = torch.autograd.grad(z.square().sum(), buf)
    torch.testing.assert_close(g1, g2)


def test_silu_mul_bad_input():
    with pytest.raises(ValueError, match="`up`"):
        smk.silu_mul(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="`up`"):
        smk.silu_mul(torch.randn(3, 4), torch.randn(3, 4).double())
    with pytest.raises(TypeError, match="`gate`"):
        smk.silu_mul(torch.zeros(3, 4, dtype=torch.long), torch.randn(3, 4))


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_silu_mul_transposed_operands_give_contiguous_results(backend):
    # Column-major gate and dy: the outputs and gradients are still contiguous and right (the torch backend
    # computes in place into fresh buffers, which must not inherit the operands' layout).
    gate = (torch.randn(12, 9) * 3).t().requires_grad_(True)
    up = torch.randn(9, 12, requires_grad=True)
    dy = torch.randn(12, 9).t()
    y = smk.silu_mul(gate, up, backend=backend)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (gate, up))
    ref = torch.nn.functional.silu(g64) * u64
    rg, ru = torch.autograd.grad(ref, (g64, u64), dy.double())
    assert y.is_contiguous()
    for got, want in ((y, ref), (dg, rg), (du, ru)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
