"""grouped_swiglu_ffn (the whole per-group SwiGLU FFN as one op) on every backend.

Two references: the composition of the ops it fuses (``grouped_mm``, ``silu_mul``, ``grouped_mm``; each tested
per element in its own module) on the same backend and dtype, which it must reproduce exactly in the forward and
the weight gradients (the same kernels on the same operands) and to rounding in ``dx`` (summed in one buffer
rather than by autograd); and a float64 truth written here (``F.linear`` and ``F.silu`` per group).
"""

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.ops.grouped_ffn import grouped_swiglu_ffn_bwd_op
from sparsemm_kernels.utils.testing import EPS, ids_from_counts, offsets_from_counts
from tests.ops.test_grouped_mm import BACKENDS, _skip_unless_runs

# (group sizes, dim, hidden): empty groups first, last and in the middle, one row, T = 0, sizes off the
# interpreter's 32-tiles, many groups (the torch backend's one-ATen-call path from 8 on).
CASES = [
    ([0, 7, 0], 33, 17),
    ([1], 3, 2),
    ([40, 0, 25], 20, 45),
    ([0, 0], 8, 8),
    ([3] * 8 + [0] * 8, 12, 10),
]


def _operands(counts, D, H, dtype, device):
    G = len(counts)
    x = torch.randn(sum(counts), D, device=device).to(dtype).requires_grad_(True)
    w1, w3 = ((torch.randn(G, H, D, device=device) / D**0.5).to(dtype).requires_grad_(True) for _ in range(2))
    w2 = (torch.randn(G, D, H, device=device) / H**0.5).to(dtype).requires_grad_(True)
    return x, w1, w3, w2


def _composition(x, w1, w3, w2, offsets, backend):
    h = smk.silu_mul(smk.grouped_mm(x, w1, offsets, backend=backend), smk.grouped_mm(x, w3, offsets, backend=backend),
                     backend=backend)
    return smk.grouped_mm(h, w2, offsets, backend=backend)


def _truth(x, w1, w3, w2, counts):
    bounds = offsets_from_counts(counts).tolist()
    parts = [F.linear(F.silu(F.linear(x[s:e], w1[g])) * F.linear(x[s:e], w3[g]), w2[g])
             for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat(parts) if parts else x.new_zeros(0, w2.shape[1])


def _dx_scale(x, w1, w3, w2, dy, counts):
    """``|dgate| |W1_g| + |dup| |W3_g|`` per row, float64."""
    bounds = offsets_from_counts(counts).tolist()
    x, w1, w3, w2, dy = (t.detach().double().cpu() for t in (x, w1, w3, w2, dy))
    scale = torch.zeros_like(x)
    for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        gate, up, dh = x[s:e] @ w1[g].t(), x[s:e] @ w3[g].t(), dy[s:e] @ w2[g]
        sig = torch.sigmoid(gate)
        dgate, dup = dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig
        scale[s:e] = dgate.abs() @ w1[g].abs() + dup.abs() @ w3[g].abs()
    return scale.to(dy.device)


def _case_id(c):
    return f"{len(c[0])}g-{sum(c[0])}r-{c[1]}x{c[2]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_equals_the_ops_it_fuses(case, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    counts, D, H = case
    offsets = offsets_from_counts(counts, device)
    ops = _operands(counts, D, H, dtype, device)
    out = smk.grouped_swiglu_ffn(*ops, offsets, backend=backend)
    want = _composition(*ops, offsets, backend)
    assert out.dtype == dtype and torch.equal(out, want), "forward: the same kernels on the same operands"
    dy = torch.randn_like(out)
    got_g = torch.autograd.grad(out, ops, dy)
    want_g = torch.autograd.grad(want, ops, dy)
    for name, g, w in zip(("dw1", "dw3", "dw2"), got_g[1:], want_g[1:]):
        assert torch.equal(g, w), name
    # dx = dgate W1 + dup W3: one buffer here, two products and an add there. Per element: a few roundings of
    # each product and of the sum, and (fp32) a different summation order over the hidden dim, relative to
    # |dgate| |W1| + |dup| |W3| (computed in float64); plus float16's subnormal spacing.
    scale = _dx_scale(*ops, dy, counts)
    err = (got_g[0].double() - want_g[0].double()).abs()
    bound = 4 * EPS[dtype] * (H + 1) ** 0.5 * scale + torch.finfo(dtype).smallest_normal * EPS[dtype]
    assert (err <= bound).all(), f"dx: worst {(err / bound).max().item():.3g}x the bound"
    empty = [g for g, c in enumerate(counts) if c == 0]
    for name, g in zip(("dw1", "dw3", "dw2"), got_g[1:]):
        assert torch.count_nonzero(g[empty]) == 0, f"{name}: an empty group's gradient must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64_truth(case, backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    counts, D, H = case
    ops = _operands(counts, D, H, torch.float32, device)
    out = smk.grouped_swiglu_ffn(*ops, offsets_from_counts(counts, device), backend=backend)
    ops64 = [t.detach().double().requires_grad_(True) for t in ops]
    want = _truth(*ops64, counts)
    dy = torch.randn_like(out)
    got_g = torch.autograd.grad(out, ops, dy)
    want_g = torch.autograd.grad(want, ops64, dy.double())
    # Normwise: float32 GEMMs of depth D and H around an elementwise op, each a few eps32 relative.
    for name, g, w in zip(("out", "dx", "dw1", "dw3", "dw2"), (out, *got_g), (want, *want_g)):
        assert g.shape == w.shape, name
        if w.numel():
            bound = 50 * EPS[torch.float32] * (w.abs().max().item() + 1e-30)
            assert (g.double() - w.detach()).abs().max().item() <= bound, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_operands_and_a_plan(backend, device):
    """A column slice of a wider input, weights stored transposed, and a plan in place of offsets."""
    _skip_unless_runs(backend, device, torch.float32)
    ids = ids_from_counts([5, 0, 9], shuffle=True).to(device)
    plan = smk.group_plan(ids, 3)
    base = torch.randn(14, 20, device=device)
    x = base[:, 3:11]
    w1 = torch.randn(3, 8, 6, device=device).transpose(1, 2)  # (G, 6, 8) stored as (G, 8, 6)
    w3 = torch.randn(3, 6, 8, device=device)
    w2 = torch.randn(3, 6, 8, device=device).transpose(1, 2)  # (G, 8, 6)
    got = smk.grouped_swiglu_ffn(x, w1, w3, w2, plan, backend=backend)
    want = _composition(x.contiguous(), w1.contiguous(), w3, w2.contiguous(), plan.offsets, backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_only_the_inputs_that_need_it_get_a_gradient():
    offsets = offsets_from_counts([3, 4])
    x, w1, w3, w2 = _operands([3, 4], 5, 6, torch.float32, "cpu")
    w1.requires_grad_(False)
    w2.requires_grad_(False)
    out = smk.grouped_swiglu_ffn(x, w1, w3, w2, offsets)
    out.sum().backward()
    assert w1.grad is None and w2.grad is None and x.grad is not None and w3.grad is not None
    x2, w32 = x.detach().requires_grad_(), w3.detach().requires_grad_()
    _composition(x2, w1, w32, w2, offsets, None).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w3.grad, w32.grad)


def test_second_derivative_is_refused():
    offsets = offsets_from_counts([3, 4])
    ops = _operands([3, 4], 5, 6, torch.float64, "cpu")
    (dx,) = torch.autograd.grad(smk.grouped_swiglu_ffn(*ops, offsets).sum(), ops[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


def test_backward_op_returns_empty_for_inputs_not_needed():
    offsets = offsets_from_counts([2, 3])
    x, w1, w3, w2 = (t.detach() for t in _operands([2, 3], 4, 6, torch.float32, "cpu"))
    gate, up = x @ w1[0].t(), x @ w3[0].t()
    h = F.silu(gate) * up
    grads = grouped_swiglu_ffn_bwd_op(torch.randn(5, 4), x, w1, w3, w2, gate, up, h, offsets,
                                      [False, True, False, True], "trusted", "torch", "torch")
    assert [tuple(g.shape) for g in grads] == [(0,), tuple(w1.shape), (0,), tuple(w2.shape)]


def test_errors_name_the_argument():
    offsets = offsets_from_counts([2, 3])
    x, w1, w3, w2 = (t.detach() for t in _operands([2, 3], 4, 6, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="`w3` must have the shape of `w1`"):
        smk.grouped_swiglu_ffn(x, w1, w3[:, :5], w2, offsets)
    with pytest.raises(ValueError, match=r"`w2` must have shape \(G, dim, hidden\)"):
        smk.grouped_swiglu_ffn(x, w1, w3, w2.transpose(1, 2), offsets)
    with pytest.raises(ValueError, match="`w1` has in_features 4"):
        smk.grouped_swiglu_ffn(x[:, :3], w1, w3, w2, offsets)
    with pytest.raises(TypeError, match="`w2`"):
        smk.grouped_swiglu_ffn(x, w1, w3, w2.double(), offsets)
    with pytest.raises(ValueError, match="`offsets` must be 1-D of length G\\+1 = 3"):
        smk.grouped_swiglu_ffn(x, w1, w3, w2, offsets[:2])
    with pytest.raises(ValueError, match="`offsets`"):
        smk.grouped_swiglu_ffn(x, w1, w3, w2, torch.tensor([0, 4, 3]))
    plan = smk.group_plan(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"`offsets` \(a plan\) covers 3 rows but `x` has 5"):
        smk.grouped_swiglu_ffn(x, w1, w3, w2, plan)


def test_under_autocast_in_its_dtype():
    offsets = offsets_from_counts([2, 3])
    x, w1, w3, w2 = (t.detach() for t in _operands([2, 3], 4, 6, torch.float32, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = smk.grouped_swiglu_ffn(x, w1, w3, w2, offsets)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _composition(*(t.bfloat16() for t in (x, w1, w3, w2)), offsets, None))
