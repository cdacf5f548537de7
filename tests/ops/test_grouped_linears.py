"""grouped_linears (several grouped linears of one input, one op) on every backend vs an independent float64 truth:
one ``F.linear`` per row with the row's own group, per weight, moved into the requested output order.

The outputs are checked as one concatenation (linear in ``x`` and every weight), so ``dx`` is checked as the sum
over the weights, with the bounds of :mod:`tests.ops.test_grouped_mm` (the same GEMMs run underneath). In float16
each weight's share of ``dx`` is rounded before the sum (as autograd sums separate ``grouped_linear`` calls): up to
half an ulp of each share, ``0.5 eps16 * sum |terms|`` over all, which the relative term alone does not cover where
the shares cancel; the float16 bound adds that.
"""

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.ops.grouped_linears import grouped_gemm_multi_bwd_op
from sparsemm_kernels.utils.testing import EPS, Tol, check_multilinear, ids_from_counts
from tests.ops.test_grouped_mm import BACKENDS, _skip_unless_runs, _tol

# (group sizes, K, output widths): empty groups first, last and in the middle, one row, sizes off the
# interpreter's 32-tiles, many groups (the torch backend's one-ATen-call path from 8 on), widths that differ.
CASES = [
    ([0, 7, 0], 33, (17, 5, 9)),
    ([1], 3, (1, 2)),
    ([40, 0, 25], 70, (45,)),
    ([33, 1, 64, 2], 32, (40, 8, 8)),
    ([3] * 8 + [0] * 8, 20, (12, 7)),
]
ORDERS = [("token", "token"), ("sorted", "token"), ("token", "sorted"), ("sorted", "sorted")]


def _tol_multi(backend, dtype):
    tol = _tol(backend, dtype)
    if dtype != torch.float16:
        return tol
    return Tol(rtol=tol.rtol, atol=tol.atol + 0.5 * EPS[torch.float16], floor=tol.floor)


def _truth(ids, plan, input_order, output_order):
    """Per-row F.linear in the input's order (float64, differentiable), then into the output's order."""
    groups = (ids if input_order == "token" else ids[plan.sorted_to_orig]).tolist()
    if input_order == output_order:
        move = None
    else:
        move = plan.sorted_to_orig if output_order == "sorted" else plan.orig_to_sorted

    def truth(x, *ws):
        outs = []
        for w in ws:
            rows = [F.linear(x[i], w[g]) for i, g in enumerate(groups)]
            y = torch.stack(rows) if rows else x.new_zeros(0, w.shape[1])
            outs.append(y if move is None else y[move])
        return torch.cat(outs, 1)

    return truth


def _operands(T, K, widths, G, dtype, device):
    x = torch.randn(T, K, device=device).to(dtype).requires_grad_(True)
    ws = [(torch.randn(G, n, K, device=device) / K**0.5).to(dtype).requires_grad_(True) for n in widths]
    return x, ws


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("orders", ORDERS, ids=["token-token", "sorted-token", "token-sorted", "sorted-sorted"])
@pytest.mark.parametrize("case", CASES, ids=[f"{len(c[0])}g-{sum(c[0])}r-{len(c[2])}w" for c in CASES])
def test_grouped_linears_match_truth(case, orders, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    if device == "cuda" and backend == "torch":  # keeps gpu_check's capped test step short
        pytest.skip("on the GPU the kernels run every order; the torch fallback's loop is the CPU one")
    counts, K, widths = case
    G = len(counts)
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, G)
    x, ws = _operands(sum(counts), K, widths, G, dtype, device)
    got = check_multilinear(
        lambda x, *ws: torch.cat(
            smk.grouped_linears(x, ws, plan, input_order=orders[0], output_order=orders[1], backend=backend), 1),
        _truth(ids, plan, *orders), [x, *ws], dtype, _tol_multi(backend, dtype),
        names=("dx", *(f"dw{j}" for j in range(len(ws)))),
    )
    empty = [g for g, c in enumerate(counts) if c == 0]
    for j, dw in enumerate(got[1:]):
        assert torch.count_nonzero(dw[empty]) == 0, f"dw{j}: the weight gradient of an empty group must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_to_one_grouped_linear_per_weight(backend, device):
    """Same values as the single-weight op, outputs a tuple, and only the inputs that need it get a gradient."""
    _skip_unless_runs(backend, device, torch.float32)
    ids = ids_from_counts([9, 0, 14], shuffle=True).to(device)
    plan = smk.group_plan(ids, 3)
    x, (w0, w1) = _operands(23, 16, (8, 24), 3, torch.float32, device)
    w0.requires_grad_(False)
    outs = smk.grouped_linears(x, [w0, w1], plan, backend=backend)
    assert isinstance(outs, tuple) and len(outs) == 2
    for out, w in zip(outs, (w0, w1)):
        torch.testing.assert_close(out, smk.grouped_linear(x, w, plan, backend=backend), rtol=1e-6, atol=1e-6)
    (outs[0].sum() + outs[1].square().sum()).backward()
    assert w0.grad is None and x.grad is not None and w1.grad is not None
    want = torch.autograd.grad(
        smk.grouped_linear(x, w0, plan, backend=backend).sum() + smk.grouped_linear(
            x, w1, plan, backend=backend).square().sum(), [x, w1])
    torch.testing.assert_close(x.grad, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_operands(backend, device):
    """A column slice of a wider input, a weight stored transposed, a weight that is an expanded view."""
    _skip_unless_runs(backend, device, torch.float32)
    ids = ids_from_counts([5, 11, 3], shuffle=True).to(device)
    plan = smk.group_plan(ids, 3)
    base = torch.randn(19, 30, device=device, requires_grad=True)
    wt = torch.randn(3, 12, 7, device=device, requires_grad=True)  # (G, K, N) memory
    we = torch.randn(1, 5, 12, device=device, requires_grad=True)
    x, ws = base[:, 4:16], [wt.transpose(1, 2), we.expand(3, 5, 12)]
    check_multilinear(
        lambda x, *ws: torch.cat(smk.grouped_linears(x, ws, plan, backend=backend), 1),
        _truth(ids, plan, "token", "token"), [x, *ws], torch.float32, _tol(backend, torch.float32),
        names=("dx", "dw0", "dw1"),
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("orders", ORDERS[:2], ids=["token-token", "sorted-token"])
def test_second_derivatives(backend, orders):
    ids = ids_from_counts([4, 0, 3], shuffle=True)
    plan = smk.group_plan(ids, 3)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3, n, 5, dtype=torch.float64, requires_grad=True) for n in (4, 2)]

    def f(x, *ws):
        return smk.grouped_linears(x, ws, plan, input_order=orders[0], output_order=orders[1], backend=backend)

    assert torch.autograd.gradcheck(f, (x, *ws))
    assert torch.autograd.gradgradcheck(f, (x, *ws))


def test_backward_op_is_not_differentiated_itself():
    ids = torch.tensor([0, 1, 1, 0])
    plan = smk.group_plan(ids, 2)
    x, w, dy = torch.randn(4, 3), torch.randn(2, 5, 3, requires_grad=True), torch.randn(4, 5)
    dx, dw = grouped_gemm_multi_bwd_op(x, [w], [dy], plan.offsets, plan.sorted_to_orig, True, True, True, [True],
                                       "trusted", "torch")
    with pytest.raises(RuntimeError, match="not differentiated itself"):
        dx.sum().backward()


def test_errors_name_the_argument():
    ids = torch.tensor([0, 1, 1, 0, 1])
    plan = smk.group_plan(ids, 2)
    x, w = torch.randn(5, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="`weights` must be a list or tuple"):
        smk.grouped_linears(x, w, plan)
    with pytest.raises(ValueError, match="`weights` must hold at least one"):
        smk.grouped_linears(x, [], plan)
    with pytest.raises(ValueError, match=r"`weights\[1\]` has in_features 5"):
        smk.grouped_linears(x, [w, torch.randn(2, 3, 5)], plan)
    with pytest.raises(ValueError, match=r"`weights\[1\]` has 3 groups but `weights\[0\]` has 2"):
        smk.grouped_linears(x, [w, torch.randn(3, 3, 4)], plan)
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        smk.grouped_linears(x, [w, w.double()], plan)
    with pytest.raises(ValueError, match=r"`plan` has 2 groups but `weights\[0\]` has 3"):
        smk.grouped_linears(x, [torch.randn(3, 3, 4)], plan)
    with pytest.raises(ValueError, match="`output_order` must be"):
        smk.grouped_linears(x, [w], plan, output_order="rows")
    with pytest.raises(TypeError, match="`plan` must be a GroupPlan"):
        smk.grouped_linears(x, [w], plan.offsets)


def test_under_autocast_in_its_dtype():
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    plan = smk.group_plan(ids, 2)
    x, ws = torch.randn(6, 4), [torch.randn(2, 3, 4), torch.randn(2, 5, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = smk.grouped_linears(x, ws, plan)
    assert [o.dtype for o in outs] == [torch.bfloat16] * 2
    for o, w in zip(outs, ws):
        want = smk.grouped_linear(x.bfloat16(), w.bfloat16(), plan)
        torch.testing.assert_close(o, want)


def test_one_weight_twice_and_views_of_one_parameter():
    """The same tensor twice gets both shares of its gradient; slices of one fused parameter get theirs."""
    ids = torch.tensor([1, 0, 1, 1, 0])
    plan = smk.group_plan(ids, 2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a, b = smk.grouped_linears(x, (w, w), plan)
    (a.sum() + 2 * b.sum()).backward()
    want = torch.autograd.grad(3 * smk.grouped_linear(x, w, plan).sum(), [x, w])
    torch.testing.assert_close(x.grad, want[0])
    torch.testing.assert_close(w.grad, want[1])
    fused = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    q, k = smk.grouped_linears(x, (fused[:, :3], fused[:, 3:]), plan)
    (q.square().sum() + k.sum()).backward()
    (want_w,) = torch.autograd.grad(smk.grouped_linear(x, fused, plan)[:, :3].square().sum()
                                    + smk.grouped_linear(x, fused, plan)[:, 3:].sum(), [fused])
    torch.testing.assert_close(fused.grad, want_w)
