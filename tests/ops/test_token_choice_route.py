"""token_choice_route(logits, top_k): every token's top-k experts (descending, ties to the lower expert) and the
renormalised softmax gates, against a loop written here in float64, on every backend; gradients; the op contract;
bad input."""

import pytest
import torch
from torch.library import opcheck

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons


def loop_token_route(logits, k):
    """Per token: experts sorted by (logit descending, index ascending), the first k; softmax over their logits."""
    idx, gates = [], []
    for row in logits:
        vals = row.tolist()
        order = sorted(range(len(vals)), key=lambda e: (-vals[e], e))[:k]
        idx.append(order)
        gates.append(torch.softmax(row[order].double(), -1))
    N = logits.shape[0]
    return (torch.tensor(idx, dtype=torch.int64).view(N, k),
            torch.stack(gates) if gates else torch.zeros(0, k, dtype=torch.float64))


def _logits(N, E, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(0, 3, (N, E), generator=g).float()
        if N:
            x[0] = 1.0  # one row where every logit ties
    else:
        x = torch.randn(N, E, generator=g)
    return x.to(dtype)


CASES = [(1, 1, 1, "rand"), (5, 4, 1, "rand"), (5, 4, 2, "ties"), (9, 6, 6, "rand"), (33, 8, 3, "ties"),
         (0, 4, 2, "rand"), (40, 128, 8, "rand")]


def _skip(backend, dtype):
    if backend is not None:
        reasons = unsupported_reasons("token_choice_route", backend, torch.device("cpu"), dtype)
        if reasons:
            pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-E{}-k{}-{}".format(*c))
def test_matches_the_loop(case, dtype, backend):
    _skip(backend, dtype)
    N, E, k, kind = case
    logits = _logits(N, E, kind, seed=N * 13 + E, dtype=dtype).requires_grad_(True)
    idx, gates = smk.token_choice_route(logits, k, backend=backend)
    want_idx, want_gates = loop_token_route(logits.detach().double(), k)
    assert idx.dtype == torch.int64 and gates.dtype == dtype and idx.shape == (N, k)
    assert torch.equal(idx, want_idx), (idx, want_idx)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(gates.double(), want_gates, **tol)
    if N and kind == "ties":  # the all-tie row: the first k experts, equal gates
        assert idx[0].tolist() == list(range(k))
        torch.testing.assert_close(gates[0].double(), torch.full((k,), 1.0 / k, dtype=torch.float64), **tol)


def test_gate_gradient_matches_the_loop_in_float64():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ref = logits.detach().clone().requires_grad_(True)
    _, gates = smk.token_choice_route(logits, 3)
    idx, _ = loop_token_route(ref.detach(), 3)
    want = torch.softmax(ref.gather(1, idx), -1)
    dg = torch.randn(7, 3, dtype=torch.float64)
    gates.backward(dg)
    want.backward(dg)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: smk.token_choice_route(t, 2)[1], (logits.detach().requires_grad_(),))


def test_op_contract():
    op = torch.ops.sparsemm.token_topk.default
    opcheck(op, (torch.randn(9, 6), 2, None))
    opcheck(op, (torch.randn(9, 6), 6, "torch"))

    def route(x):
        return smk.token_choice_route(x @ x.t(), 2)

    x = torch.randn(6, 4)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    for a, b in zip(route(x), compiled(x)):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    x = torch.randn(6, 4)
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match="`top_k`"):
            smk.token_choice_route(x, bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="`top_k`"):
            smk.token_choice_route(x, bad)
    y = x.clone()
    y[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`logits` must be finite; logits\[2, 3\]"):
        smk.token_choice_route(y, 2)
    with pytest.raises(ValueError, match="`logits`"):
        smk.token_choice_route(torch.randn(6), 2)
    with pytest.raises(ValueError, match="`logits`"):
        smk.token_choice_route(torch.randn(6, 0), 1)
    with pytest.raises(TypeError, match="`logits`"):
        smk.token_choice_route(torch.ones(6, 4, dtype=torch.long), 2)


# ---- token_choice_plan: the fused routing + plan of the (token, expert) pairs ----

# (N, E, k, kind, layout): rows say which edge they hit. Triton's token block is 64 rows for E <= 64 and 32 for
# E = 128; the C++ block is 256 tokens.
PLAN_CASES = [
    (0, 4, 2, "rand", "contiguous"),  # no tokens
    (1, 1, 1, "rand", "contiguous"),  # E = 1: every pair to expert 0
    (1, 5, 5, "rand", "contiguous"),  # one token, k = E
    (7, 6, 1, "ties", "contiguous"),  # k = 1 with ties
    (9, 4, 4, "ties", "transposed"),  # k = E, all-tied first row, column-major logits
    (65, 8, 2, "ties", "strided"),  # one past a Triton block, heavy ties (few distinct experts), column stride 2
    (33, 128, 8, "rand", "contiguous"),  # one past a Triton block at E = 128, fine-grained top-8
    (130, 3, 2, "ties", "contiguous"),  # three Triton blocks, the last partial
    (300, 16, 3, "rand", "strided"),  # past the C++ token block, row-strided view
]


def _layout(x, layout):
    if layout == "transposed":
        return x.t().contiguous().t()
    if layout == "strided":  # every other column of a wider tensor (column stride 2)
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def _separate_path(logits, k):
    """What TokenChoiceMoE ran before the fused op: token_choice_route, then pair_rows of its experts."""
    from sparsemm_kernels.ops.slots import pair_rows

    idx, gates = smk.token_choice_route(logits, k, backend="torch")
    plan, slots, inverse = pair_rows(idx, logits.shape[1], backend="torch", name="expert_idx")
    return idx, gates, plan, slots, inverse


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "N{}-E{}-k{}-{}-{}".format(*c))
def test_fused_plan_equals_the_separate_path_and_the_loop(case, dtype, backend):
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    _skip(backend, dtype)
    N, E, k, kind, layout = case
    logits = _layout(_logits(N, E, kind, seed=N * 7 + E, dtype=dtype), layout)
    assert layout == "contiguous" or not logits.is_contiguous()
    # Outputs land in poisoned memory (conftest): exact equality shows every element was written.
    idx, gates, plan, slots, inverse = token_choice_plan(logits, k, backend=backend)
    want_idx, want_gates = loop_token_route(logits.double(), k)
    assert torch.equal(idx, want_idx), (idx, want_idx)
    assert gates.dtype == dtype and gates.shape == (N, k)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(gates.double(), want_gates, **tol)
    r_idx, r_gates, r_plan, r_slots, r_inverse = _separate_path(logits, k)
    assert torch.equal(idx, r_idx)
    for name in ("sorted_to_orig", "offsets", "counts", "orig_to_sorted"):
        assert torch.equal(getattr(plan, name), getattr(r_plan, name)), name
    assert (plan.num_groups, plan.num_rows, plan.trusted) == (E, N * k, True)
    assert torch.equal(slots, r_slots) and torch.equal(inverse, r_inverse)
    if backend == "torch":  # the same torch computation: the gates too are bitwise equal
        assert torch.equal(gates, r_gates)
    else:
        torch.testing.assert_close(gates, r_gates, **tol)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_fused_plan_gradient_matches_the_route(backend):
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    dtype = torch.float32 if backend == "triton" else torch.float64
    _skip(backend, dtype)
    base = _logits(11, 6, "rand", seed=3, dtype=dtype)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    _, gates, *_ = token_choice_plan(a, 3, backend=backend)
    _, want = smk.token_choice_route(b, 3, backend="torch")
    dg = torch.randn(11, 3, dtype=dtype)
    gates.backward(dg)
    want.backward(dg)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fused_plan_first_and_second_derivatives(backend):
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    _skip(backend, torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def gates(t):
        return token_choice_plan(t, 3, backend=backend)[1]

    assert torch.autograd.gradcheck(gates, (x,))
    assert torch.autograd.gradgradcheck(gates, (x,))


def test_fused_plan_op_contract():
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    op = torch.ops.sparsemm.token_choice_plan.default
    for backend in ("torch", "cpu", "triton"):
        if unsupported_reasons("token_choice_route", backend, torch.device("cpu"), torch.float32):
            continue
        opcheck(op, (torch.randn(9, 6, requires_grad=True), 2, backend))
        opcheck(op, (torch.randn(5, 4, requires_grad=True), 4, backend))
    opcheck(op, (torch.randn(7, 3, dtype=torch.float64, requires_grad=True), 1, None))

    def route(x):
        idx, gates, plan, slots, inverse = token_choice_plan(x @ x.t(), 2)
        return idx, gates, plan.sorted_to_orig, plan.offsets, plan.counts, plan.orig_to_sorted, slots, inverse

    x = torch.randn(6, 4)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    for a, b in zip(route(x), compiled(x)):
        assert torch.equal(a, b)


def test_fused_plan_is_deterministic_across_thread_counts():
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    _skip("cpu", torch.float32)
    logits = _logits(1000, 8, "ties", seed=9)
    prev = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            idx, gates, plan, slots, inverse = token_choice_plan(logits, 3, backend="cpu")
            results.append((idx, gates, plan.sorted_to_orig, plan.offsets, plan.orig_to_sorted, slots, inverse))
    finally:
        torch.set_num_threads(prev)
    for run in results[1:]:
        for a, b in zip(results[0], run):
            assert torch.equal(a, b)


def test_fused_plan_bad_input_names_the_argument():
    from sparsemm_kernels.ops.token_routing import token_choice_plan

    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="`top_k`"):
        token_choice_plan(x, 5)
    y = x.clone()
    y[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`logits` must be finite; logits\[1, 2\]"):
        token_choice_plan(y, 2)
    with pytest.raises(ValueError, match="`logits`"):
        token_choice_plan(torch.randn(6, 0), 1)
    if not unsupported_reasons("token_choice_route", "triton", torch.device("cpu"), torch.float32):
        with pytest.raises(ValueError, match="at most 4096 experts"):
            token_choice_plan(torch.randn(2, 4097), 2, backend="triton")


def test_top_k_past_the_kernel_width_sorts_unless_triton_is_demanded(monkeypatch):
    # Wider rows than the Triton top-k takes: automatic selection (here a preference) sorts instead; a demand for
    # triton gets its error. Avg-K's GEMM + top-k path hands its top-k a preference, so it sorts too.
    from sparsemm_kernels.backend import unsupported_reasons
    from sparsemm_kernels.kernels.triton import token_topk as triton_topk
    from sparsemm_kernels.ops.token_routing import token_topk_op

    if unsupported_reasons("token_choice_route", "triton", torch.device("cpu"), torch.float32):
        pytest.skip("no triton backend here")
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    want = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :3]
    monkeypatch.setattr(triton_topk, "MAX_EXPERTS", 4)
    assert torch.equal(token_topk_op(logits, 3, "prefer:triton"), want)
    with pytest.raises(ValueError, match="4"):
        token_topk_op(logits, 3, "triton")
    x, w = torch.randn(5, 8), torch.randn(600, 8)  # 600 blocks: past the fused selection, and past 4 for the top-k
    got = smk.avgk_select(x, w, 1, 3, backend="triton")
    scores = x.double() @ w.double().t()
    assert torch.equal(got, scores.topk(3, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_unchecked_nan_logit_reads_as_minus_inf_on_every_backend(backend):
    from sparsemm_kernels.ops.token_routing import token_topk_op

    if unsupported_reasons("token_choice_route", backend, torch.device("cpu"), torch.float32):
        pytest.skip("backend unavailable here")
    logits = torch.tensor([[float("nan"), float("-inf"), 1.0], [0.5, float("nan"), 2.0]])
    assert token_topk_op(logits, 3, backend).tolist() == [[2, 0, 1], [2, 0, 1]]
