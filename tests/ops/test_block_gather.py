"""The gathered-block ops of Avg-K (sparsemm::block_gather_mm, block_scatter_mm, block_wgrad): against einsum loops in
float64 on the torch and triton (interpreter, float32) backends, forward and every gradient; block ids out of range
read zeros and receive nothing; non-contiguous operands; an empty batch; opcheck; a refused second derivative."""

import pytest
import torch
from torch.library import opcheck

from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.ops.block_gather import block_gather_mm_op, block_scatter_mm_op, block_wgrad_op
from sparsemm_kernels.plan import build_plan


def loop_gather(x, w, bias, blocks, g):
    N, k = blocks.shape
    out = torch.zeros(N, k, g, dtype=torch.float64) + 0 * (x.sum() + w.sum() + bias.sum())  # a graph even when empty
    for t in range(N):
        for j, b in enumerate(blocks[t].tolist()):
            if 0 <= b < w.shape[0] // g:
                rows = slice(b * g, (b + 1) * g)
                out[t, j] = w[rows].double() @ x[t].double() + (bias[rows].double() if bias is not None else 0)
    return out


def loop_scatter(h, w, blocks, g):
    N, k = blocks.shape
    out = torch.zeros(N, w.shape[1], dtype=torch.float64) + 0 * (h.sum() + w.sum())
    for t in range(N):
        for j, b in enumerate(blocks[t].tolist()):
            if 0 <= b < w.shape[0] // g:
                out[t] += h[t, j].double() @ w[b * g:(b + 1) * g].double()
    return out


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype, copy=True).requires_grad_()


def _skip(backend, dtype=torch.float32):
    reasons = unsupported_reasons("block_gather", backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _blocks(N, k, n_blocks, gen, bad=False):
    b = torch.stack([torch.randperm(n_blocks, generator=gen)[:k] for _ in range(N)]) if N else \
        torch.zeros(0, k, dtype=torch.int64)
    if bad and N:
        b[0, 0], b[-1, -1] = -1, n_blocks  # out of range both ways
    return b


# (N, k, n_blocks, g, C): one token, g = 1, row tiles of 64 (g = 80), column tiles (C = 70, 300), an empty batch.
CASES = [(6, 2, 5, 4, 7), (1, 3, 3, 1, 5), (5, 1, 2, 80, 9), (4, 2, 3, 40, 70), (3, 2, 4, 16, 300), (0, 2, 4, 4, 6)]
DTYPES = {"torch": torch.float64, "triton": torch.float32}


@pytest.mark.parametrize("bad", [False, True], ids=["ids-in-range", "ids-out-of-range"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-k{}-nb{}-g{}-C{}".format(*c))
def test_products_and_gradients_match_the_loops(case, backend, bad):
    dtype = DTYPES[backend]
    _skip(backend, dtype)
    N, k, nb, g, C = case
    gen = torch.Generator().manual_seed(N * 100 + g + C)
    blocks = _blocks(N, k, nb, gen, bad)
    x = torch.randn(C, N, generator=gen).t().to(dtype)  # non-contiguous rows
    w = torch.randn(C, nb * g, generator=gen).t().to(dtype)  # a transposed weight, as w_out.t()
    bias = torch.randn(nb * g, generator=gen).to(dtype)
    h = torch.randn(N, k, g, generator=gen).to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}

    xs, ws, bs = (_leaf(t) for t in (x, w, bias))
    out = block_gather_mm_op(xs, ws, bs, blocks, g, None, None, backend)
    xd, wd, bd = (_leaf(t, torch.float64) for t in (x, w, bias))
    want = loop_gather(xd, wd, bd, blocks, g)
    torch.testing.assert_close(out.double(), want, **tol)
    dout = torch.randn(N, k, g, generator=gen, dtype=torch.float64)
    out.backward(dout.to(dtype))
    want.backward(dout)
    for got, ref, name in ((xs.grad, xd.grad, "dx"), (ws.grad, wd.grad, "dw"), (bs.grad, bd.grad, "dbias")):
        torch.testing.assert_close(got.double(), ref, **tol, msg=name)

    hs, ws = _leaf(h), _leaf(w)
    out = block_scatter_mm_op(hs, ws, blocks, g, None, None, backend)
    hd, wd = _leaf(h, torch.float64), _leaf(w, torch.float64)
    want = loop_scatter(hd, wd, blocks, g)
    torch.testing.assert_close(out.double(), want, **tol)
    dout = torch.randn(N, C, generator=gen, dtype=torch.float64)
    out.backward(dout.to(dtype))
    want.backward(dout)
    torch.testing.assert_close(hs.grad.double(), hd.grad, **tol, msg="dh")
    torch.testing.assert_close(ws.grad.double(), wd.grad, **tol, msg="dw")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_weight_gradient_is_bitwise_reproducible_and_takes_a_given_plan(backend):
    dtype = DTYPES[backend]
    _skip(backend, dtype)
    gen = torch.Generator().manual_seed(0)
    N, k, nb, g, C = 40, 3, 4, 8, 24  # ~30 pairs per block: several chunks of the kernel's pair loop
    blocks = _blocks(N, k, nb, gen)
    h, x = torch.randn(N, k, g, generator=gen).to(dtype), torch.randn(N, C, generator=gen).to(dtype)
    plan = build_plan(blocks.reshape(-1), nb, backend=None, validate=False, name="blocks")
    runs = [block_wgrad_op(h, x, blocks, plan.sorted_to_orig, plan.offsets, nb, True, backend) for _ in range(3)]
    for dw, db in runs[1:]:
        assert torch.equal(dw, runs[0][0]) and torch.equal(db, runs[0][1])
    want = torch.zeros(nb * g, C, dtype=torch.float64)
    for t in range(N):
        for j, b in enumerate(blocks[t].tolist()):
            want[b * g:(b + 1) * g] += h[t, j].double()[:, None] * x[t].double()[None, :]
    torch.testing.assert_close(runs[0][0].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    dtype = DTYPES[backend]
    _skip(backend, dtype)
    gen = torch.Generator().manual_seed(1)
    blocks = _blocks(5, 2, 3, gen)
    plan = build_plan(blocks.reshape(-1), 3, backend=None, validate=False, name="blocks")

    def rg(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    ops = torch.ops.sparsemm
    opcheck(ops.block_gather_mm.default, (rg(5, 6), rg(12, 6), rg(12), blocks, 4, None, None, backend))
    opcheck(ops.block_gather_mm.default, (rg(5, 6), rg(12, 6), None, blocks, 4, plan.sorted_to_orig, plan.offsets,
                                          backend))
    opcheck(ops.block_scatter_mm.default, (rg(5, 2, 4), rg(12, 6), blocks, 4, None, None, backend))
    opcheck(ops.block_wgrad.default, (rg(5, 2, 4), rg(5, 6), blocks, plan.sorted_to_orig, plan.offsets, 3, True,
                                      backend), test_utils=("test_schema", "test_faketensor"))


def test_second_derivative_through_a_weight_gradient_is_refused():
    blocks = torch.tensor([[0, 1], [1, 2]])
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = block_gather_mm_op(x, w, None, blocks, 2, None, None, "torch")
    (gw,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gw.sum().backward()


@pytest.mark.parametrize("backend", ["triton"])
def test_weight_gradient_with_a_hostile_plan_stays_in_bounds(backend):
    """A plan that lies (offsets out of range and decreasing, pair ids past the end, negative, repeated) reads nothing
    out of bounds (the poisoned allocator shows any unwritten output) and sums, per block, exactly the listed pairs
    inside its clamped range that really chose that block."""
    _skip(backend)
    gen = torch.Generator().manual_seed(5)
    N, k, nb, g, C = 6, 2, 3, 4, 5
    P = N * k
    blocks = _blocks(N, k, nb, gen)
    h, x = torch.randn(N, k, g, generator=gen), torch.randn(N, C, generator=gen)
    order = torch.tensor([3, -1, 7, P + 5, 7, 0, 11, 2, 10**9, 5, 4, 1])
    offsets = torch.tensor([-4, 9, 2, 10**6])
    dw, db = block_wgrad_op(h, x, blocks, order, offsets, nb, True, backend)
    assert bool(torch.isfinite(dw).all()) and bool(torch.isfinite(db).all())
    want, want_b = torch.zeros(nb * g, C, dtype=torch.float64), torch.zeros(nb * g, dtype=torch.float64)
    flat = blocks.reshape(-1).tolist()
    for b in range(nb):
        lo = min(max(int(offsets[b]), 0), P)
        hi = min(max(int(offsets[b + 1]), lo), P)
        for s in range(lo, hi):
            p = int(order[s])
            if 0 <= p < P and flat[p] == b:
                want[b * g:(b + 1) * g] += h.reshape(P, g)[p].double()[:, None] * x[p // k].double()[None, :]
                want_b[b * g:(b + 1) * g] += h.reshape(P, g)[p].double()
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_b, rtol=1e-5, atol=1e-5)
