"""Per-token gathered blocks of a weight: the kernels of the Avg-K "gathered" strategy.

Every token ``t`` selects ``k`` blocks ``blocks[t, j]`` of ``g`` consecutive rows of a weight ``w [R, C]``
(``R = n_blocks * g``). Three kernels:

* ``gather_mm``: ``out[t, j, i] = x[t] . w[blocks[t, j] * g + i] (+ bias[...])`` - one program per (token, slot)
  and tile of rows: it loads its own weight rows (no token shares them: what suits a token that few others chose).
* ``scatter_mm``: ``out[t] = sum_{j, i} h[t, j, i] w[blocks[t, j] * g + i]`` - one program per token and tile of
  columns, summing its ``k * g`` rows in a fixed order.
* ``block_wgrad``: ``dw[b * g + i] = sum over the pairs (t, j) with blocks[t, j] = b of h[t, j, i] x[t]`` (and
  ``dbias``) - one program per block and output tile, over the block's pairs in the plan's order (pairs sorted by
  block): a dot per chunk of pairs, no atomics, bitwise reproducible.

Products accumulate in float32 (the weight gradient's dot takes its operands as stored) and results are
rounded once on store. A block id outside ``[0, n_blocks)`` reads zeros and
contributes nothing; plan entries outside ``[0, N * k)`` are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device


@triton.jit
def _block_of(blocks_ptr, p, n_blocks, LANES: tl.constexpr):
    """``(block, valid)`` of pair ``p`` as ``(LANES,)`` vectors (a block mask, not a scalar): an id outside
    ``[0, n_blocks)`` is not valid and reads block 0, masked."""
    b = tl.load(blocks_ptr + p + tl.zeros((LANES,), tl.int64)).to(tl.int64)
    ok = (b >= 0) & (b < n_blocks)
    return tl.where(ok, b, 0), ok


@triton.jit
def _gather_mm_kernel(
    x_ptr, w_ptr, bias_ptr, blocks_ptr, out_ptr,
    K, G, C, n_blocks,
    stride_xt, stride_xc, stride_wr, stride_wc,
    HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[p, i] for pair p = t * K + j and rows i of one tile. Grid: (N * K, cdiv(G, BLOCK_G))."""
    p = tl.program_id(0).to(tl.int64)
    t = p // K
    b, ok = _block_of(blocks_ptr, p, n_blocks, BLOCK_G)
    offs_i = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rmask = (offs_i < G) & ok
    rows = b * G + offs_i.to(tl.int64)
    acc = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        xv = tl.load(x_ptr + t * stride_xt + cols * stride_xc, mask=cmask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wc,
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += wv * xv[None, :]
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + p * G + offs_i, out.to(out_ptr.dtype.element_ty), mask=offs_i < G)


@triton.jit
def _scatter_mm_kernel(
    h_ptr, w_ptr, blocks_ptr, out_ptr,
    K, G, C, n_blocks,
    stride_wr, stride_wc, stride_ot,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[t, cols] = sum_j sum_i h[t, j, i] w[blocks[t, j] * G + i, cols]. Grid: (N, cdiv(C, BLOCK_C)).
    ``h`` is contiguous ``[N, K, G]``."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
    for j in range(0, K):
        p = t * K + j
        b, ok = _block_of(blocks_ptr, p, n_blocks, BLOCK_G)
        for i0 in range(0, G, BLOCK_G):
            offs_i = i0 + tl.arange(0, BLOCK_G)
            imask = offs_i < G
            hv = tl.load(h_ptr + p * G + offs_i, mask=imask, other=0.0).to(tl.float32)
            rows = b * G + offs_i.to(tl.int64)
            wv = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :] * stride_wc,
                         mask=(imask & ok)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += hv[:, None] * wv
    tl.store(out_ptr + t * stride_ot + cols, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _block_wgrad_kernel(
    h_ptr, x_ptr, blocks_ptr, order_ptr, offsets_ptr, dw_ptr, dbias_ptr,
    K, G, C, P,
    stride_xt, stride_xc,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dw[b * G + i, cols] = sum over the sorted pairs s in [offsets[b], offsets[b+1]) with blocks[order[s]] = b of
    h[order[s], i] * x[order[s] // K, cols]; dbias[b * G + i] the sum of h.
    Grid: (n_blocks, cdiv(G, BLOCK_G), cdiv(C, BLOCK_C)).
    ``h`` is contiguous ``[P, G]`` (P = N * K pairs); ``dw`` contiguous ``[n_blocks * G, C]``."""
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    imask = offs_i < G
    cmask = cols < C
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + b), 0), P)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + b + 1), lo), P)
    lanes = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
    dbias = tl.zeros((BLOCK_G,), tl.float32)
    for s0 in range(lo, hi, BLOCK_P):
        s = s0 + lanes
        pair = tl.load(order_ptr + s, mask=s < hi, other=-1).to(tl.int64)
        pmask = (pair >= 0) & (pair < P)
        # Only pairs that did choose block b: a plan that disagrees with the ids (or an id out of range) adds nothing.
        pmask = pmask & (tl.load(blocks_ptr + pair, mask=pmask, other=-1) == b)
        t = pair // K
        # h^T as a (BLOCK_G, BLOCK_P) tile straight from memory.
        ht = tl.load(h_ptr + pair[None, :] * G + offs_i[:, None], mask=imask[:, None] & pmask[None, :],
                     other=0.0)
        xv = tl.load(x_ptr + t[:, None] * stride_xt + cols[None, :] * stride_xc,
                     mask=pmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; see platform-notes
            ht = ht.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(ht, xv, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(ht.to(tl.float32), 1)
    rows = b * G + offs_i.to(tl.int64)
    tl.store(dw_ptr + rows[:, None] * C + cols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=imask[:, None] & cmask[None, :])
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            tl.store(dbias_ptr + rows, dbias.to(dbias_ptr.dtype.element_ty), mask=imask)


def _tiles(G: int, C: int) -> tuple[int, int]:
    """``(BLOCK_G, BLOCK_C)``: at most 64 rows of a block and a ``BLOCK_G * BLOCK_C <= 4096`` register tile."""
    block_g = min(max(triton.next_power_of_2(max(G, 1)), 16), 64)
    block_c = min(max(triton.next_power_of_2(max(C, 1)), 16), 4096 // block_g)
    return block_g, block_c


def _dot_precision(dtype: torch.dtype) -> str:
    from sparsemm_kernels.kernels.triton.grouped_gemm import _dot_precision as precision

    return precision(dtype)


@on_first_tensor_device
def gather_mm_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, blocks: torch.Tensor,
                     g: int) -> torch.Tensor:
    """``[N, k, g]``: ``x [N, C]`` times the ``g`` rows of ``w [R, C]`` (any strides) in each of the token's blocks
    ``blocks [N, k]`` (int64), plus ``bias [R]`` of those rows when given."""
    N, K = blocks.shape
    C = x.shape[1]
    out = torch.empty(N, K, g, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_g, block_c = _tiles(g, C)
    bias_arg = bias.contiguous() if bias is not None else out
    _gather_mm_kernel[(N * K, triton.cdiv(g, block_g))](
        x, w, bias_arg, blocks.contiguous(), out, K, g, C, w.shape[0] // g,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        HAS_BIAS=bias is not None, BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4,
    )
    return out


@on_first_tensor_device
def scatter_mm_triton(h: torch.Tensor, w: torch.Tensor, blocks: torch.Tensor, g: int) -> torch.Tensor:
    """``[N, C]``: per token the sum over its blocks of ``h [N, k, g]`` times the block's rows of ``w [R, C]``."""
    N, K = blocks.shape
    C = w.shape[1]
    out = torch.empty(N, C, dtype=h.dtype, device=h.device)
    if N == 0 or C == 0:
        return out
    block_g, block_c = _tiles(g, C)
    _scatter_mm_kernel[(N, triton.cdiv(C, block_c))](
        h.contiguous(), w, blocks.contiguous(), out, K, g, C, w.shape[0] // g,
        w.stride(0), w.stride(1), out.stride(0), BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4,
    )
    return out


@on_first_tensor_device
def block_wgrad_triton(h: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, order: torch.Tensor,
                       offsets: torch.Tensor, n_blocks: int,
                       with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dw [n_blocks * g, C], dbias [n_blocks * g] or None)`` from ``h [N, k, g]``, ``x [N, C]``, the blocks
    ``[N, k]`` and the plan of the pairs by block (``order [N * k]`` pair ids, ``offsets [n_blocks + 1]``)."""
    N, K, G = h.shape
    C = x.shape[1]
    h = h.to(x.dtype)  # one dot dtype
    dw = torch.empty(n_blocks * G, C, dtype=x.dtype, device=x.device)
    dbias = torch.empty(n_blocks * G, dtype=h.dtype, device=h.device) if with_bias else None
    if dw.numel() == 0 and not with_bias:
        return dw, dbias
    precision = _dot_precision(x.dtype)
    block_g, block_c = _tiles(G, C)
    # A dot tile; full-fp32 ("ieee") dots are FMA loops that need more registers: a smaller tile (no spills, AOT).
    block_p, block_g, block_c = (16, 16, 32) if precision == "ieee" else (32, min(block_g, 32), min(block_c, 64))
    _block_wgrad_kernel[(n_blocks, triton.cdiv(G, block_g), max(triton.cdiv(C, block_c), 1))](
        h.contiguous(), x, blocks.contiguous(), order.contiguous(), offsets.contiguous(), dw,
        dbias if with_bias else dw,
        K, G, C, N * K, x.stride(0), x.stride(1),
        HAS_BIAS=with_bias, BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_C=block_c,
        DOT_PRECISION=precision, UPCAST=is_interpreting() and x.dtype == torch.bfloat16, num_warps=4,
    )
    return dw, dbias
