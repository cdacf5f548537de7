"""Products with per-token gathered blocks of a weight: the ops of the Avg-K "gathered" strategy.

A weight ``w [R, C]`` is ``n_blocks = R / g`` blocks of ``g`` consecutive rows; token ``t`` uses its ``k`` blocks
``blocks[t, j]``. Two products and the weight gradient they share:

* ``block_gather_mm(x [N, C], w, bias, blocks)`` -> ``[N, k, g]``: ``x[t] . w[blocks[t, j] * g + i] (+ bias)``;
* ``block_scatter_mm(h [N, k, g], w, blocks)`` -> ``[N, C]``: ``sum_{j, i} h[t, j, i] w[blocks[t, j] * g + i]``;
* ``block_wgrad(h, x, ...)`` -> ``dw [R, C]`` (and ``dbias [R]``): per block, the sum over the (token, slot) pairs
  that chose it, in the order of the plan of the pairs sorted by block (``order``, ``offsets``): no atomics.

Each product's gradient in its input is the other product, and in ``w`` it is ``block_wgrad``; the plan is built in
the backward when the forward was not given one. ``triton``: one program per (token, slot) or per token, each
loading its own weight rows; ``torch``: the blocks gathered per chunk of tokens and a batched matmul, the weight
gradient an ``index_add_`` (any float dtype, the float64 reference; sequential, so reproducible, on the CPU - on
CUDA, where the triton kernels are the default, ``index_add_`` uses atomics). A block id outside ``[0, n_blocks)``
reads zeros and receives nothing. Second derivatives through a weight gradient are refused.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import select_backend
from sparsemm_kernels.ops.dispatch import Op

# The torch path gathers [tokens, k, g, C] weights per chunk: at most this many elements at once.
_TORCH_CHUNK_ELEMENTS = 1 << 24


def _valid(blocks: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    ok = (blocks >= 0) & (blocks < n_blocks)
    return torch.where(ok, blocks, 0), ok


def _chunks(N: int, per_token: int):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(per_token, 1))
    return [(s, min(s + step, N)) for s in range(0, N, step)]


def _gathered(w: torch.Tensor, safe: torch.Tensor, g: int) -> torch.Tensor:
    """``[n, k * g, C]`` rows of ``w`` per token, block by block (``safe``: ids already in range). A column-major
    ``w`` (the transpose of a contiguous ``[C, R]``, as ``w_out.t()``) is gathered along its storage rows, where each
    block is a contiguous run (2-3x faster on the CPU than a strided row gather), and returned as a strided view."""
    n, k = safe.shape
    R, C = w.shape
    if w.stride(0) == 1 and w.stride(1) != 1:
        cols = w.t().unflatten(1, (R // g, g)).index_select(1, safe.reshape(-1))  # [C, n k, g]
        return cols.reshape(C, n, k * g).permute(1, 2, 0)
    return w.unflatten(0, (R // g, g)).index_select(0, safe.reshape(-1)).reshape(n, k * g, C)


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    return select_backend("block_gather", t.device, t.dtype, backend) == "triton"


def _gather_mm_torch(x, w, bias, blocks, g):
    N, k = blocks.shape
    safe, ok = _valid(blocks, w.shape[0] // g)
    out = x.new_empty(N, k * g)
    for s, e in _chunks(N, k * g * x.shape[1]):
        out[s:e] = torch.bmm(_gathered(w, safe[s:e], g), x[s:e, :, None]).squeeze(-1)
    out = out.view(N, k, g)
    if bias is not None:
        out += _gathered(bias[:, None], safe, g).view(N, k, g)
    return out * ok[..., None].to(out.dtype)  # an invalid id read block 0: its rows count as zeros


def _scatter_mm_torch(h, w, blocks, g):
    N, k = blocks.shape
    safe, ok = _valid(blocks, w.shape[0] // g)
    hm = (h * ok[..., None].to(h.dtype)).reshape(N, 1, k * g)  # an invalid id's rows count as zeros
    out = h.new_empty(N, w.shape[1])
    for s, e in _chunks(N, k * g * w.shape[1]):
        out[s:e] = torch.bmm(hm[s:e], _gathered(w, safe[s:e], g)).squeeze(1)
    return out


def _wgrad_torch(h, x, blocks, n_blocks: int, with_bias: bool):
    N, k, g = h.shape
    C = x.shape[1]
    safe, ok = _valid(blocks, n_blocks)
    hm = h * ok[..., None].to(h.dtype)  # an invalid pair contributes nothing
    dw = x.new_zeros(n_blocks, g, C)
    for s, e in _chunks(N, k * g * C):
        outer = hm[s:e, :, :, None] * x[s:e, None, None, :]  # [n, k, g, C]
        dw.index_add_(0, safe[s:e].reshape(-1), outer.reshape(-1, g, C))
    dbias = h.new_zeros(n_blocks, g).index_add_(0, safe.reshape(-1), hm.reshape(-1, g)) if with_bias \
        else h.new_zeros(0)
    return dw.view(n_blocks * g, C), dbias.reshape(-1)


def _block_plan(blocks: torch.Tensor, n_blocks: int, order, offsets, backend):
    """``(order, offsets)`` of the pairs sorted by block: the given ones, or built now."""
    if order is not None and offsets is not None:
        return order, offsets
    from sparsemm_kernels.plan import build_plan

    plan = build_plan(_valid(blocks, n_blocks)[0].reshape(-1), n_blocks, backend=backend, validate=False,
                      name="blocks")
    return plan.sorted_to_orig, plan.offsets


# ---- the ops ----

def _block_gather_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, blocks: torch.Tensor, g: int,
                     order: torch.Tensor | None, offsets: torch.Tensor | None,
                     backend: str | None) -> torch.Tensor:
    """``[N, k, g]``: ``out[t, j, i] = x[t] . w[blocks[t, j] * g + i] + bias[blocks[t, j] * g + i]``."""
    if _use_triton(x, backend):
        from sparsemm_kernels.kernels.triton.block_gather import gather_mm_triton

        return gather_mm_triton(x, w, bias, blocks, g)
    return _gather_mm_torch(x, w, bias, blocks, g)


def _block_gather_mm_fake(x, w, bias, blocks, g, order, offsets, backend):
    return x.new_empty(blocks.shape[0], blocks.shape[1], g)


def _block_scatter_mm(h: torch.Tensor, w: torch.Tensor, blocks: torch.Tensor, g: int,
                      order: torch.Tensor | None, offsets: torch.Tensor | None,
                      backend: str | None) -> torch.Tensor:
    """``[N, C]``: ``out[t] = sum_{j, i} h[t, j, i] w[blocks[t, j] * g + i]``."""
    if _use_triton(h, backend):
        from sparsemm_kernels.kernels.triton.block_gather import scatter_mm_triton

        return scatter_mm_triton(h, w, blocks, g)
    return _scatter_mm_torch(h, w, blocks, g)


def _block_scatter_mm_fake(h, w, blocks, g, order, offsets, backend):
    return h.new_empty(blocks.shape[0], w.shape[1])


def _block_wgrad(h: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, order: torch.Tensor,
                 offsets: torch.Tensor, n_blocks: int, with_bias: bool,
                 backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dw [n_blocks * g, C], dbias [n_blocks * g] or empty)``: ``dw[b * g + i] = sum_{(t, j): blocks[t, j] = b}
    h[t, j, i] x[t]``, ``dbias`` the sums of ``h``; ``order`` / ``offsets`` the pairs sorted by block."""
    if _use_triton(x, backend):
        from sparsemm_kernels.kernels.triton.block_gather import block_wgrad_triton

        dw, dbias = block_wgrad_triton(h, x, blocks, order, offsets, n_blocks, with_bias)
        return dw, dbias if dbias is not None else h.new_zeros(0)
    return _wgrad_torch(h, x, blocks, n_blocks, with_bias)


def _block_wgrad_fake(h, x, blocks, order, offsets, n_blocks, with_bias, backend):
    rows = n_blocks * h.shape[2]
    return x.new_empty(rows, x.shape[1]), h.new_empty(rows if with_bias else 0)


def _setup_gather(ctx, inputs, output):
    x, w, bias, blocks, g, order, offsets, backend = inputs
    ctx.save_for_backward(x, w, blocks, order, offsets)
    ctx.g, ctx.backend, ctx.with_bias = g, backend, bias is not None


def _gather_backward(ctx, dout):
    x, w, blocks, order, offsets = ctx.saved_tensors
    g, backend = ctx.g, ctx.backend
    dout = dout.contiguous()
    dx = dw = dbias = None
    if ctx.needs_input_grad[0]:
        dx = block_scatter_mm_op(dout, w, blocks, g, order, offsets, backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        n_blocks = w.shape[0] // g
        order, offsets = _block_plan(blocks, n_blocks, order, offsets, backend)
        dw, db = block_wgrad_op(dout, x, blocks, order, offsets, n_blocks, ctx.with_bias, backend)
        dbias = db if ctx.with_bias else None
    return dx, dw, dbias, None, None, None, None, None


def _setup_scatter(ctx, inputs, output):
    h, w, blocks, g, order, offsets, backend = inputs
    ctx.save_for_backward(h, w, blocks, order, offsets)
    ctx.g, ctx.backend = g, backend


def _scatter_backward(ctx, dout):
    h, w, blocks, order, offsets = ctx.saved_tensors
    g, backend = ctx.g, ctx.backend
    dout = dout.contiguous()
    dh = dw = None
    if ctx.needs_input_grad[0]:
        dh = block_gather_mm_op(dout, w, None, blocks, g, order, offsets, backend)
    if ctx.needs_input_grad[1]:
        n_blocks = w.shape[0] // g
        order, offsets = _block_plan(blocks, n_blocks, order, offsets, backend)
        dw, _ = block_wgrad_op(h.contiguous(), dout, blocks, order, offsets, n_blocks, False, backend)
    return dh, dw, None, None, None, None, None


def _no_setup(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("double backward through a block weight gradient (the Avg-K gathered strategy) is not "
                       "supported")


block_gather_mm_op = Op("sparsemm::block_gather_mm", _block_gather_mm, _block_gather_mm_fake, _setup_gather,
                        _gather_backward)
block_scatter_mm_op = Op("sparsemm::block_scatter_mm", _block_scatter_mm, _block_scatter_mm_fake, _setup_scatter,
                         _scatter_backward)
block_wgrad_op = Op("sparsemm::block_wgrad", _block_wgrad, _block_wgrad_fake, _no_setup, _refuse_double_backward)
