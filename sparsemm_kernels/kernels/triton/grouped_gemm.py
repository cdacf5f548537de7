"""Grouped GEMM over row groups: forward, dX and dW kernels, with optional gather-on-load / scatter-on-store.

Pipeline: the rows of group ``g`` are the sorted positions ``offsets[g]:offsets[g+1]``. A position ``r``
reads its A row at ``rows[r]`` when gathering (``x`` kept in original token order) and writes its C row at
``rows[r]`` when scattering, so no permuted copy of ``x`` or of the output is ever made.

* ``grouped_gemm``    ``C[r] = A[r] @ B_g + bias_g`` with ``B_g = W[g]^T`` (forward) or ``W[g]`` (dX).
* ``grouped_gemm_dw`` ``dW[g] = dY_g^T @ X_g`` and ``dbias[g] = sum_r dY_g[r]``, a per-group reduction
  (no atomics: each program owns one ``dW`` tile and walks its group's rows in order).

Scheduling without a host sync: the number of row tiles depends on the group sizes, which live on the device.
The grid is sized by the bound ``sum_g ceil(c_g / BM) <= (T + G*(BM-1)) // BM``; each program finds its
group by a prefix sum of per-group tile counts computed in registers, and surplus programs do no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.kernels.triton.configs import (
    grouped_gemm_configs,
    grouped_gemm_dw_configs,
    prune_grouped_gemm_configs,
    prune_grouped_gemm_dw_configs,
)
from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device, placeholder


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _locate_row_tile(offsets_ptr, tile, T, G, G_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map global row-tile index ``tile`` to ``(g, first_row, group_end)``; ``first_row == group_end`` if none.

    Group bounds are read as ``b[0] = 0``, ``b[G] = T``, ``b[g] = clamp(offsets[g], 0, T)`` made
    non-decreasing by a running maximum: valid offsets are unchanged, and any others (a hand-made plan under
    ``validate=False``) still give groups that split ``[0, T)`` exactly, so no position outside it is touched
    and the tile count never exceeds the grid.
    """
    gidx = tl.arange(0, G_POW2)
    in_range = gidx < G
    lo = tl.load(offsets_ptr + gidx, mask=in_range & (gidx > 0), other=0).to(tl.int64)
    hi = tl.load(offsets_ptr + gidx + 1, mask=gidx < G - 1, other=T).to(tl.int64)
    starts = tl.associative_scan(tl.minimum(tl.maximum(lo, 0), T), 0, _max_combine)
    ends = tl.maximum(starts, tl.minimum(tl.maximum(hi, 0), T))
    tiles = tl.where(in_range, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_incl = tl.cumsum(tiles, 0)
    # Groups whose tiles all come before `tile`; equals G_POW2 >= G for a surplus program.
    g = tl.sum((tiles_incl <= tile).to(tl.int32), 0)
    sel = gidx == g
    group_start = tl.sum(tl.where(sel, starts, 0), 0)
    group_end = tl.sum(tl.where(sel, ends, 0), 0)
    first_tile = tl.sum(tl.where(sel, tiles_incl - tiles, 0), 0)
    first_row = group_start + (tile - first_tile) * BLOCK_M
    first_row = tl.where(g < G, first_row, group_end)
    # Surplus programs load nothing but still form pointers: keep their group index in range.
    return tl.minimum(g, G - 1), first_row, group_end


@triton.jit
def _group_bounds(offsets_ptr, g, T, G):
    """``[start, end)`` of group ``g`` clamped into ``[0, T]`` (``b[0] = 0``, ``b[G] = T``, ``end >= start``):
    whatever ``offsets`` holds, a program reads only positions that exist."""
    start = tl.load(offsets_ptr + g).to(tl.int64)
    end = tl.load(offsets_ptr + g + 1).to(tl.int64)
    start = tl.where(g == 0, 0, tl.minimum(tl.maximum(start, 0), T))
    end = tl.where(g == G - 1, T, tl.minimum(tl.maximum(end, 0), T))
    return start, tl.maximum(start, end)


@triton.autotune(configs=grouped_gemm_configs(),
                 key=["K", "J", "stride_ak", "stride_bk", "GATHER_A", "SCATTER_C", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_grouped_gemm_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _grouped_gemm_kernel(
    # inputs
    a_ptr, b_ptr, bias_ptr, offsets_ptr, rows_ptr,
    # output
    c_ptr,
    # sizes
    T, K, J, G,
    # strides
    stride_am, stride_ak, stride_bg, stride_bk, stride_bj, stride_bias_g, stride_bias_j, stride_cm, stride_cj,
    # modes
    HAS_BIAS: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, G_POW2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """C[c_r, j] = sum_k A[a_r, k] * B[g, k, j] + bias[g, j] for sorted positions r of group g.

    Positions lie in ``[0, T)``; a gathered / scattered row ``rows[r]`` outside ``[0, T)`` is masked (its
    position neither reads nor writes), so a corrupt plan never reaches memory outside A, C or ``rows``.

    Grid: (num_row_tiles_bound * cdiv(J, BLOCK_J),), swizzled in GROUP_M row-tile bands for L2 reuse.
    """
    pid = tl.program_id(0)
    num_m_tiles = tl.minimum((T + G * (BLOCK_M - 1)) // BLOCK_M, T)
    num_j_tiles = tl.cdiv(J, BLOCK_J)
    band = GROUP_M * num_j_tiles
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    tile_m = first_m + (pid % band) % band_m
    tile_j = (pid % band) // band_m

    g, first_row, group_end = _locate_row_tile(offsets_ptr, tile_m, T, G, G_POW2, BLOCK_M)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_mask = offs_m < group_end
    if GATHER_A or SCATTER_C:
        rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        row_mask = row_mask & (rows >= 0) & (rows < T)
    a_rows = rows if GATHER_A else offs_m
    c_rows = rows if SCATTER_C else offs_m

    offs_j = (tile_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    j_mask = offs_j < J
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # int64: a K stride times K can pass 2^31
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg + offs_k[:, None] * stride_bk + offs_j[None, :] * stride_bj
    # Pointer steps in int64 (BLOCK_K times a K stride can pass 2^31); a stride of 1 arrives as a constexpr.
    a_step = tl.full((), BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full((), BLOCK_K, tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    k_tiles = tl.where(first_row < group_end, tl.cdiv(K, BLOCK_K), 0)
    for kt in range(0, k_tiles):
        if EVEN_K:  # no K mask: the common model sizes are multiples of the tile
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=j_mask[None, :], other=0.0)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & j_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; see platform-notes
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_BIAS:
        bias = tl.load(bias_ptr + g.to(tl.int64) * stride_bias_g + offs_j * stride_bias_j, mask=j_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_j[None, :] * stride_cj
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & j_mask[None, :])


@triton.autotune(configs=grouped_gemm_dw_configs(),
                 key=["N", "K", "GATHER_DY", "GATHER_X", "HAS_DBIAS", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_grouped_gemm_dw_configs})
@triton.jit
def _grouped_gemm_dw_kernel(
    # inputs
    dy_ptr, x_ptr, offsets_ptr, rows_ptr,
    # outputs
    dw_ptr, dbias_ptr,
    # sizes
    T, N, K, G,
    # strides
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwg, stride_dwn, stride_dwk, stride_dbias_g,
    # modes
    GATHER_DY: tl.constexpr, GATHER_X: tl.constexpr, HAS_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dW[g, n, k] = sum_r dY[r_dy, n] * X[r_x, k] over the positions r of group g; dbias[g, n] = sum_r dY[r_dy, n],
    with ``r_dy = rows[r]`` when GATHER_DY (dY in original row order) else ``r``, and ``r_x`` likewise.

    Group bounds are clamped into ``[0, T]`` and a gathered row outside ``[0, T)`` is masked (see
    ``_group_bounds``). Grid: (cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K), G). An empty group stores zeros.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    tile_n = pid // num_k_tiles
    tile_k = pid % num_k_tiles
    row_start, row_end = _group_bounds(offsets_ptr, g, T, G)

    offs_n = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (tile_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_mask = offs_n < N
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < row_end
        if GATHER_DY or GATHER_X:
            r = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
            row_mask = row_mask & (r >= 0) & (r < T)
        r_dy = r if GATHER_DY else offs_m.to(tl.int64)
        r_x = r if GATHER_X else offs_m.to(tl.int64)
        dy = tl.load(dy_ptr + r_dy[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        x = tl.load(x_ptr + r_x[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            dbias += tl.sum(dy.to(tl.float32), 0)

    dw_ptrs = dw_ptr + g * stride_dwg + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if HAS_DBIAS:
        if tile_k == 0:
            tl.store(dbias_ptr + g * stride_dbias_g + offs_n, dbias.to(dbias_ptr.dtype.element_ty), mask=n_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays full fp32 unless the user allowed TF32 for matmuls, as torch.mm does.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not is_interpreting():
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


@on_first_tensor_device
def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    gather_a: bool = False,
    scatter_c: bool = False,
    transpose_w: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped product of row groups of ``a`` with per-group matrices of ``w``.

    Args:
        a: ``(T, K)`` rows in sorted order, or in original order with ``gather_a`` (read through ``rows``).
        w: ``(G, N, K)`` nn.Linear layout per group. ``transpose_w=False``: ``C = A @ W[g]^T`` (A has K
            columns, C has N). ``transpose_w=True``: ``C = A @ W[g]`` (A has N columns, C has K): the dX pass.
        offsets: ``(G+1,) int64``, group ``g`` is sorted positions ``offsets[g]:offsets[g+1]``, ending at T.
            Values are clamped in the kernel (see ``_locate_row_tile``), never trusted.
        bias: optional ``(G, J)``, any strides, added to group ``g``'s rows.
        rows: ``(T,) int64`` original row of each sorted position (``GroupPlan.sorted_to_orig``); a value
            outside ``[0, T)`` masks its position.
        out: optional ``(T, J)`` buffer written in place (every element is written when ``rows`` is a
            permutation; pass zeros when it may not be).

    Returns:
        ``(T, J)`` in ``a``'s dtype (``J = N``, or ``K`` with ``transpose_w``).
    """
    T = a.shape[0]
    G = w.shape[0]
    if transpose_w:
        K, J, stride_bk, stride_bj = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    else:
        K, J, stride_bk, stride_bj = w.shape[2], w.shape[1], w.stride(2), w.stride(1)
    if out is None:
        out = torch.empty((T, J), device=a.device, dtype=a.dtype)
    if T == 0 or J == 0:
        return out
    grid = lambda meta: (  # noqa: E731
        min((T + G * (meta["BLOCK_M"] - 1)) // meta["BLOCK_M"], T) * triton.cdiv(J, meta["BLOCK_J"]),
    )
    _grouped_gemm_kernel[grid](
        a, w, bias if bias is not None else placeholder(a), offsets, rows if rows is not None else offsets,
        out,
        T, K, J, G,
        a.stride(0), a.stride(1), w.stride(0), stride_bk, stride_bj,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GATHER_A=gather_a, SCATTER_C=scatter_c,
        G_POW2=max(triton.next_power_of_2(G), 2),
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=is_interpreting() and a.dtype == torch.bfloat16,
    )
    return out


@on_first_tensor_device
def grouped_gemm_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    gathered: bool = False,
    compute_dbias: bool = False,
    gather_dy: bool | None = None,
    gather_x: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group weight (and bias) gradients.

    Args:
        dy: ``(T, N)`` output gradient; x: ``(T, K)`` forward input; both in sorted order, or in original
            order read through ``rows`` when ``gathered`` (``gather_dy`` / ``gather_x`` set it per operand).
        offsets: ``(G+1,) int64`` group bounds over sorted positions.

    Returns:
        ``dW (G, N, K)`` and ``dbias (G, N)`` (or None), in ``dy``'s dtype, accumulated in float32.
        Empty groups get exact zeros.
    """
    G = offsets.shape[0] - 1
    N, K = dy.shape[1], x.shape[1]
    dw = torch.empty((G, N, K), device=dy.device, dtype=dy.dtype)
    dbias = torch.empty((G, N), device=dy.device, dtype=dy.dtype) if compute_dbias else None
    if G == 0 or N == 0 or K == 0:
        if dbias is not None:
            dbias.zero_()
        return dw.zero_(), dbias
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), G)  # noqa: E731
    _grouped_gemm_dw_kernel[grid](
        dy, x, offsets, rows if rows is not None else offsets,
        dw, dbias if dbias is not None else placeholder(dw),
        dy.shape[0], N, K, G,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        dbias.stride(0) if dbias is not None else 0,
        GATHER_DY=gathered if gather_dy is None else gather_dy, GATHER_X=gathered if gather_x is None else gather_x,
        HAS_DBIAS=compute_dbias,
        DOT_PRECISION=_dot_precision(dy.dtype), UPCAST=is_interpreting() and dy.dtype == torch.bfloat16,
    )
    return dw, dbias
