"""Avg-K: avgk_select against a float64 loop (exactly: ties, block size 1, one block, odd sizes); avgk_ffn and
AvgKFeedForward against a loop in float64, forward and backward for every tensor input, both strategies forced (torch
in float64, triton in float32 under the interpreter, sizes off the tiles); the dense identity at top_k = n_blocks;
the "auto" choice; fullgraph compile; bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.nn import AvgKFeedForward
from sparsemm_kernels.ops.avgk import GATHERED_BELOW, choose_strategy

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def loop_select(x, w_in, g, k):
    """Per token: blocks sorted by (x . mean key descending, block ascending), the first k, ascending."""
    nb = w_in.shape[0] // g
    mean = w_in.double().view(nb, g, -1).mean(1)
    out = []
    for row in x.double():
        s = (mean @ row).tolist()
        out.append(sorted(sorted(range(nb), key=lambda b: (-s[b], b))[:k]))
    return torch.tensor(out, dtype=torch.int64).view(x.shape[0], k)


def loop_ffn(x, w_in, w_out, g, k, act, b_in=None, b_out=None, w_up=None, blocks=None):
    if blocks is None:
        blocks = loop_select(x.detach(), w_in.detach(), g, k)
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(w_out.shape[0], dtype=x.dtype)
        for b in blocks[t].tolist():
            cells = slice(b * g, (b + 1) * g)
            h = x[t] @ w_in[cells].t() + (b_in[cells] if b_in is not None else 0)
            h = ACT[act](h)
            if w_up is not None:
                h = h * (x[t] @ w_up[cells].t())
            y = y + w_out[:, cells] @ h
        rows.append(y + (b_out if b_out is not None else 0))
    return torch.stack(rows)


@pytest.mark.parametrize("N,d,d_ff,g,k,kind", [
    (7, 5, 12, 4, 2, "rand"), (9, 4, 6, 1, 3, "rand"), (5, 3, 8, 8, 1, "rand"), (11, 6, 15, 3, 5, "ties"),
    (1, 2, 4, 2, 2, "rand"), (0, 4, 8, 2, 1, "rand"),
])
def test_select_matches_the_loop_exactly(N, d, d_ff, g, k, kind):
    gen = torch.Generator().manual_seed(N + d_ff)
    if kind == "ties":  # integer keys and inputs: many blocks tie exactly
        x = torch.randint(-1, 2, (N, d), generator=gen).double()
        w = torch.randint(-1, 2, (d_ff, d), generator=gen).double()
    else:
        x, w = torch.randn(N, d, generator=gen, dtype=torch.float64), torch.randn(d_ff, d, generator=gen,
                                                                                  dtype=torch.float64)
    got = smk.avgk_select(x, w, g, k)
    assert got.dtype == torch.int64 and torch.equal(got, loop_select(x, w, g, k))
    if N:
        assert bool((got[:, 1:] > got[:, :-1]).all())  # ascending, no repeats


SELECT_BACKEND_CASES = [(7, 5, 12, 4, 2), (9, 4, 6, 1, 3), (5, 3, 8, 8, 1), (1, 2, 4, 2, 2), (0, 4, 8, 2, 1),
                        (70, 33, 600, 3, 7), (17, 70, 1024, 4, 5), (9, 20, 1024, 2, 5), (6, 8, 64, 1, 64),
                        (3, 4, 1100, 1, 9)]


@pytest.mark.parametrize("kind", ["rand", "ties"])
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("case", SELECT_BACKEND_CASES, ids=lambda c: "N{}-d{}-dff{}-g{}-k{}".format(*c))
def test_select_on_every_backend_matches_the_loop(case, backend, kind):
    """float32 on every backend (the triton kernel: token tiles of 16-64, 200 blocks off the 256-column tile, 256
    blocks with d off the chunk, k = every block; 512 and 1100 blocks: past its float32 limit, the GEMM + top-k).
    Integer inputs make every score exact (ties decided by the rule alone); random ones are compared where the k-th
    and (k+1)-th best scores are apart."""
    reasons = unsupported_reasons("avgk_select", backend, torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    N, d, d_ff, g, k = case
    gen = torch.Generator().manual_seed(N + d_ff + len(kind))
    if kind == "ties":
        x = torch.randint(-1, 2, (N, d), generator=gen).float()
        w = torch.randint(-1, 2, (d_ff, d), generator=gen).float() * g  # the means are integers too
    else:
        x, w = torch.randn(N, d, generator=gen), torch.randn(d_ff, d, generator=gen)
    x = x.t().contiguous().t() if N > 1 else x  # a strided x
    got = smk.avgk_select(x, w, g, k, backend=backend)
    want = loop_select(x, w, g, k)
    assert got.dtype == torch.int64 and got.shape == (N, k)
    if kind == "rand" and N:
        nb = d_ff // g
        scores = (x.double() @ w.double().view(nb, g, -1).mean(1).t()).sort(dim=1, descending=True).values
        gap = scores[:, k - 1] - (scores[:, k] if k < nb else scores[:, k - 1] - 1)
        clear = gap > 1e-4  # rows whose choice float32 rounding cannot flip
        assert bool(clear.sum() >= N // 2)
        got, want = got[clear], want[clear]
    assert torch.equal(got, want)


@pytest.mark.parametrize("n_blocks", [40, 512])
def test_triton_select_in_bfloat16_with_exact_ties(n_blocks):
    """The kernel's 16-bit path up to its 512-block limit: small integers are exact in bf16, so the choice is the
    loop's to the last tie."""
    reasons = unsupported_reasons("avgk_select", "triton", torch.device("cpu"), torch.bfloat16)
    if reasons:
        pytest.skip("; ".join(reasons))
    gen = torch.Generator().manual_seed(n_blocks)
    x = torch.randint(-1, 2, (21, 6), generator=gen).bfloat16()
    w = (torch.randint(-1, 2, (n_blocks * 2, 6), generator=gen) * 2).bfloat16()
    got = smk.avgk_select(x, w, 2, 7, backend="triton")
    assert torch.equal(got, loop_select(x, w, 2, 7))


@pytest.mark.parametrize("n_blocks", [40, 600])
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_bfloat16_select_ranks_float32_scores_on_every_path(backend, n_blocks):
    """bf16 inputs whose exact scores need more than bf16's 8 bits (integers up to ~3600): every path - the fused
    kernel (40 blocks) and the GEMM + top-k (600 blocks, past its limit; the cpu and torch backends always) - ranks
    the float32 scores, so the choice is the exact loop's. Scores rounded to bf16 would tie and pick lower blocks."""
    reasons = unsupported_reasons("avgk_select", backend, torch.device("cpu"), torch.bfloat16)
    if reasons:
        pytest.skip("; ".join(reasons))
    gen = torch.Generator().manual_seed(n_blocks + 1)
    x = torch.randint(-15, 16, (13, 16), generator=gen).bfloat16()
    w = torch.randint(-15, 16, (n_blocks, 16), generator=gen).bfloat16()  # block size 1: the keys are the rows
    got = smk.avgk_select(x, w, 1, 5, backend=backend)
    assert torch.equal(got, loop_select(x, w, 1, 5))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_select_under_autocast_ranks_float32_scores(backend):
    """Under autocast the op's own GEMM runs with autocast off (an op implementation never sees it): float32
    inputs whose scores need more than bf16's 8 bits still get the exact choice."""
    reasons = unsupported_reasons("avgk_select", backend, torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-15, 16, (13, 16), generator=gen).float()
    w = torch.randint(-15, 16, (600, 16), generator=gen).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = smk.avgk_select(x, w, 1, 5, backend=backend)
    assert torch.equal(got, loop_select(x, w, 1, 5))


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
def test_ffn_under_autocast_mixed_dtypes(strategy):
    """bf16 activations and float32 parameters under autocast (what an nn.Linear before it gives): accepted, and the
    output is the autocast dtype with or without b_out, close to the float32 result."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=gen)
    w_in, w_out = torch.randn(24, 8, generator=gen) / 3, torch.randn(8, 24, generator=gen) / 5
    b_out = torch.randn(8, generator=gen)
    want = smk.avgk_ffn(x, w_in, w_out, 4, 2, b_out=b_out, strategy=strategy, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for bias in (None, b_out):
            y = smk.avgk_ffn(x.bfloat16(), w_in, w_out, 4, 2, b_out=bias, strategy=strategy, backend="torch")
            assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)


def test_select_uses_the_current_weights():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(8, 3, dtype=torch.float64)
    first = smk.avgk_select(x, w, 2, 1)
    with torch.no_grad():
        w.neg_()  # every score flips sign: a stale mean-key cache would keep the old choice
    assert torch.equal(smk.avgk_select(x, w, 2, 1), loop_select(x, w, 2, 1))
    assert not torch.equal(first, smk.avgk_select(x, w, 2, 1))


def _check_ffn_against_the_loop(N, d, d_ff, g, k, glu, bias, act, strategy, dtype, backend, tol):
    """avgk_ffn in ``dtype`` on ``backend`` against the float64 loop: the output and every input's gradient."""
    ins = {"x": torch.randn(N, d), "w_in": torch.randn(d_ff, d) / 2, "w_out": torch.randn(d, d_ff) / 2}
    if bias:
        ins.update(b_in=torch.randn(d_ff) / 4, b_out=torch.randn(d))
    if glu:
        ins["w_up"] = torch.randn(d_ff, d) / 2
    a = {n: t.to(dtype).clone().requires_grad_(True) for n, t in ins.items()}
    r = {n: t.double().requires_grad_(True) for n, t in ins.items()}
    kw = {n: a[n] for n in ("b_in", "b_out", "w_up") if n in a}
    y = smk.avgk_ffn(a["x"], a["w_in"], a["w_out"], g, k, act, strategy=strategy, backend=backend, **kw)
    want = loop_ffn(r["x"], r["w_in"], r["w_out"], g, k, act, r.get("b_in"), r.get("b_out"), r.get("w_up"))
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    dy = torch.randn_like(want)
    y.backward(dy.to(dtype))
    want.backward(dy)
    for n in a:
        torch.testing.assert_close(a[n].grad.double(), r[n].grad, rtol=tol, atol=tol, msg=n)


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("g,k,glu,bias", [(4, 2, False, False), (1, 5, False, True), (8, 1, True, True),
                                           (2, 6, True, False), (3, 4, False, True)])
def test_ffn_matches_the_loop_forward_and_backward(g, k, glu, bias, act, strategy):
    torch.manual_seed(g * 10 + k)
    _check_ffn_against_the_loop(9, 6, 24 if g != 3 else 12, g, k, glu, bias, act, strategy, torch.float64, None,
                                1e-10)


def test_module_all_blocks_is_the_dense_ffn_and_from_dense():
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(8, 32, dtype=torch.float64), torch.nn.Linear(32, 8, dtype=torch.float64)
    m = AvgKFeedForward.from_dense(fc1.weight, fc2.weight, 4, 8, "relu", fc1.bias, fc2.bias)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), fc2(F.relu(fc1(x))), rtol=1e-12, atol=1e-12)
    sparse = AvgKFeedForward(8, 32, 4, 2, glu=True, dtype=torch.float64)
    y = sparse(x)
    want = loop_ffn(x.reshape(-1, 8), sparse.w_in, sparse.w_out, 4, 2, "gelu", w_up=sparse.w_up).view(x.shape)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert sparse.n_blocks == 8 and sparse.top_k == 2 and sparse.b_in is None


def test_bad_input_names_the_argument():
    x, w_in, w_out = torch.randn(4, 6), torch.randn(12, 6), torch.randn(6, 12)
    with pytest.raises(ValueError, match="`block_size`"):
        smk.avgk_select(x, w_in, 5, 1)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="`top_k`"):
            smk.avgk_select(x, w_in, 4, bad)
    with pytest.raises(ValueError, match="`x`"):
        smk.avgk_select(torch.randn(4, 5), w_in, 4, 1)
    with pytest.raises(ValueError, match="`w_out`"):
        smk.avgk_ffn(x, w_in, torch.randn(12, 6), 4, 1)
    with pytest.raises(ValueError, match="`b_in`"):
        smk.avgk_ffn(x, w_in, w_out, 4, 1, b_in=torch.randn(6))
    with pytest.raises(ValueError, match="`w_up`"):
        smk.avgk_ffn(x, w_in, w_out, 4, 1, w_up=torch.randn(6, 12))
    with pytest.raises(ValueError, match="`activation`"):
        smk.avgk_ffn(x, w_in, w_out, 4, 1, "tanh")
    with pytest.raises(ValueError, match="`strategy`"):
        smk.avgk_ffn(x, w_in, w_out, 4, 1, strategy="magic")
    with pytest.raises(ValueError, match="`block_size`"):
        AvgKFeedForward(6, 12, 5, 1)
    with pytest.raises(ValueError, match="`top_k`"):
        AvgKFeedForward(6, 12, 4, 9)




def _triton_or_skip(dtype=torch.float32):
    reasons = unsupported_reasons("block_gather", "triton", torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


# Sizes off every tile: row tiles of 64 (g = 80: two), column tiles (d = 70), one token, one block per token.
TRITON_CASES = [(7, 6, 24, 4, 2, True, True), (5, 70, 160, 80, 1, False, True), (1, 9, 12, 1, 12, True, False),
                (6, 33, 64, 16, 3, False, False)]


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "N{}-d{}-dff{}-g{}-k{}".format(*c[:5]))
def test_triton_strategies_match_the_loop(case, strategy):
    """Both strategies on the triton kernels (interpreter, float32) against the float64 loop, every gradient."""
    _triton_or_skip()
    torch.manual_seed(case[0] + case[1])
    _check_ffn_against_the_loop(*case, "silu", strategy, torch.float32, "triton", 1e-4)


def test_triton_gathered_bfloat16_forward_and_backward():
    """bf16 through the gathered kernels (the interpreter takes the weight gradient's dot in fp32)."""
    _triton_or_skip(torch.bfloat16)
    torch.manual_seed(3)
    ins = [torch.randn(6, 40), torch.randn(96, 40) / 6, torch.randn(40, 96) / 6]
    a = [t.bfloat16().requires_grad_() for t in ins]
    r = [t.bfloat16().double().requires_grad_() for t in ins]
    y = smk.avgk_ffn(*a, 16, 2, strategy="gathered", backend="triton")
    # The choice in bf16 (its own rounding of the scores) is avgk_select's; the products are the kernels'.
    blocks = smk.avgk_select(a[0].detach(), a[1].detach(), 16, 2, backend="triton")
    want = loop_ffn(*r, 16, 2, "gelu", blocks=blocks)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(want)
    y.backward(dy.bfloat16())
    want.backward(dy)
    for got, ref, name in zip(a, r, ("x", "w_in", "w_out")):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=3e-2, atol=3e-2, msg=name)


def test_auto_strategy_follows_pairs_per_block():
    """"auto" is "gathered" below GATHERED_BELOW pairs per block and "grouped" at or above it, and the result is
    the forced strategy's."""
    cpu = torch.device("cpu")
    below = GATHERED_BELOW["cpu"]
    n_blocks, k = 64, 2
    few = int(below * n_blocks / k) - 1
    assert choose_strategy(few, k, n_blocks, cpu) == "gathered"
    assert choose_strategy(few + 1, k, n_blocks, cpu) == "grouped"
    assert choose_strategy(0, k, n_blocks, cpu) == "gathered"
    x, w_in, w_out = torch.randn(3, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64), \
        torch.randn(8, 64, dtype=torch.float64)
    for strategy in ("gathered", "grouped"):
        torch.testing.assert_close(smk.avgk_ffn(x, w_in, w_out, 4, 2),
                                   smk.avgk_ffn(x, w_in, w_out, 4, 2, strategy=strategy), rtol=1e-12, atol=1e-12)


def test_module_strategy_is_forwarded():
    m = AvgKFeedForward(8, 32, 4, 2, strategy="gathered", dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    want = loop_ffn(x.reshape(-1, 8), m.w_in, m.w_out, 4, 2, "gelu").view(x.shape)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
    assert "strategy='gathered'" in repr(m)
    with pytest.raises(ValueError, match="`strategy`"):
        AvgKFeedForward(8, 32, 4, 2, strategy="dense")


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
def test_compiles_fullgraph_both_strategies(strategy):
    m = AvgKFeedForward(8, 32, 4, 3, glu=True, bias=True, strategy=strategy)
    x = torch.randn(2, 5, 8, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert m.w_in.grad is not None and torch.isfinite(m.w_out.grad).all()


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_select_op_opcheck(backend):
    reasons = unsupported_reasons("avgk_select", backend, torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    x, mean_keys = torch.randn(9, 6), torch.randn(20, 6)
    opcheck(torch.ops.sparsemm.avgk_topk.default, (x, mean_keys, 3, backend))
