"""Avg-K: avgk_select against a float64 loop (exactly: ties, block size 1, one block, odd sizes); avgk_ffn and
AvgKFeedForward against a loop in float64, forward and backward for every tensor input; the dense identity at
top_k = n_blocks; bad input."""

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.nn import AvgKFeedForward

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


def loop_ffn(x, w_in, w_out, g, k, act, b_in=None, b_out=None, w_up=None):
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


def test_select_uses_the_current_weights():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(8, 3, dtype=torch.float64)
    first = smk.avgk_select(x, w, 2, 1)
    with torch.no_grad():
        w.neg_()  # every score flips sign: a stale mean-key cache would keep the old choice
    assert torch.equal(smk.avgk_select(x, w, 2, 1), loop_select(x, w, 2, 1))
    assert not torch.equal(first, smk.avgk_select(x, w, 2, 1))


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("g,k,glu,bias", [(4, 2, False, False), (1, 5, False, True), (8, 1, True, True),
                                           (2, 6, True, False), (3, 4, False, True)])
def test_ffn_matches_the_loop_forward_and_backward(g, k, glu, bias, act):
    torch.manual_seed(g * 10 + k)
    N, d, d_ff = 9, 6, 24 if g != 3 else 12
    ins = {"x": torch.randn(N, d), "w_in": torch.randn(d_ff, d) / 2, "w_out": torch.randn(d, d_ff) / 2}
    if bias:
        ins.update(b_in=torch.randn(d_ff) / 4, b_out=torch.randn(d))
    if glu:
        ins["w_up"] = torch.randn(d_ff, d) / 2
    a = {n: t.double().requires_grad_(True) for n, t in ins.items()}
    r = {n: t.double().requires_grad_(True) for n, t in ins.items()}
    kw = {n: a[n] for n in ("b_in", "b_out", "w_up") if n in a}
    y = smk.avgk_ffn(a["x"], a["w_in"], a["w_out"], g, k, act, strategy="grouped", **kw)
    want = loop_ffn(r["x"], r["w_in"], r["w_out"], g, k, act, r.get("b_in"), r.get("b_out"), r.get("w_up"))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    for n in a:
        torch.testing.assert_close(a[n].grad, r[n].grad, rtol=1e-9, atol=1e-10, msg=n)


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


def test_compiles_fullgraph_with_eager_equal_results():
    m = AvgKFeedForward(8, 32, 4, 3, glu=True, bias=True)
    x = torch.randn(2, 5, 8)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)
