"""Per-modality RMSNorm / LayerNorm: one forward and one backward kernel for both norms (plus a row-statistics
kernel for rows wider than one register block).

Pipeline: forward normalises each row with its modality's weights and saves the fp32 row statistics;
backward recomputes ``x_hat`` from them, writes ``dx`` per row and reduces ``dW`` / ``db`` per modality in
two fixed-order steps (per-program partials in registers, then ``torch.sum`` over programs) - no atomics,
so the result is bitwise reproducible. A row up to ``_FWD_MAX_BLOCK_D`` (forward) / ``_BWD_MAX_BLOCK_D``
(backward) columns is one register block; a wider one is walked in chunks of that width: the forward makes
two passes (three for LayerNorm), the backward first reduces each row (``_modality_norm_bwd_stats_kernel``)
and then runs one program per (row block, modality chunk, column chunk).

Rows are read in the original token order (no permutation): ``x`` is viewed as ``(T, H, D)``, row
``r = t * H + h`` is head ``h`` of token ``t`` and uses ``W[ids[t]]``. ``H = 1`` is the plain per-token
norm; ``H > 1`` is per-head QK-norm (``x (..., H, d_h)``, weights ``(M, d_h)``, one id per token).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import on_first_tensor_device, placeholder

# Widest row the fused kernels take (the op falls back to the torch backend beyond it).
MAX_FUSED_D = 65536
# A row up to this many columns (padded to a power of two) is one register block; a wider row is walked in
# chunks of _CHUNK_D columns: the forward in two passes (three for LayerNorm: mean, variance, normalise), the
# backward with a row-statistics kernel first. One block spilled past these (benchmarks/results/aot-*.md: the
# fp32 LayerNorm forward 32-48 B at 16384 and 2.4-4.8 KB at 65536, the backward 48-196 B at 8192 and up to
# 20 KB at 65536); chunked, none spills.
_FWD_MAX_BLOCK_D = 8192
_BWD_MAX_BLOCK_D = 4096
_CHUNK_D = 4096
# Elements of the per-program dW partial ([M_BLOCK, BLOCK_D] fp32) kept in registers, and the most modalities
# in one one-hot. Modalities beyond them are split into chunks, each program re-walking its rows for its own
# chunk. (16384 spilled 16-76 B with 64 modalities at D = 1024.)
_DW_REGISTER_BUDGET = 8192
_TILE_ELEMENTS = 4096
_MAX_M_BLOCK = 64
# The backward's fp32 weight-gradient partials (row blocks x modalities x D): fewer row blocks past this many
# entries (256 MiB; per-expert norms with hundreds of groups would otherwise need gigabytes).
_MAX_PARTIAL_ENTRIES = 1 << 26


@triton.jit
def _modality_norm_fwd_kernel(
    # inputs
    x_ptr, ids_ptr, w_ptr, b_ptr,
    # outputs
    y_ptr, mean_ptr, rstd_ptr,
    # sizes
    R, D, M, eps,
    # strides
    stride_xt, stride_xh, stride_xd, stride_wm, stride_bm,
    # modes
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS_PER_ID: tl.constexpr, CHUNKED: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``r`` of one ``BLOCK_R``-row tile (token ``t = r // H``, head ``h = r % H``, modality ``m = ids[t]``):

    RMSNorm:   ``rstd = 1 / sqrt(mean_d(x^2) + eps)``,            ``y = x * rstd * W[m]``
    LayerNorm: ``mu = mean_d(x)``, ``rstd = 1 / sqrt(mean_d((x - mu)^2) + eps)``,
               ``y = (x - mu) * rstd * W[m] + b[m]``
    Statistics in fp32; ``rstd`` (and ``mu``) stored as fp32 per row for the backward. Without CHUNKED a row
    is one ``BLOCK_D >= D`` block, read once; with CHUNKED the row is walked in ``BLOCK_D``-column chunks,
    summing into a ``(BLOCK_R, BLOCK_D)`` fp32 accumulator reduced once per pass (a fixed order).

    Grid: (cdiv(R, BLOCK_R),), R = T * H. Several rows per program keep narrow rows (QK-norm over d_h)
    from turning into one tiny program each.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tok = rows // ROWS_PER_ID
    head = rows % ROWS_PER_ID
    # Clamped so a bad id (reported by the op's asynchronous check) can never read outside `weight`.
    m = tl.load(ids_ptr + tok, mask=row_mask, other=0).to(tl.int64)
    m = tl.minimum(tl.maximum(m, 0), M - 1)
    x_row = x_ptr + tok * stride_xt + head * stride_xh  # int64 row offsets
    lanes = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column stride times D can pass 2^31

    if not CHUNKED:
        cols = lanes
        mask = row_mask[:, None] & (cols < D)[None, :]
        # fp32 right after the load: statistics need it, and the interpreter cannot do bf16 arithmetic.
        x = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, 1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=row_mask)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        w = tl.load(w_ptr + m[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w
        if HAS_BIAS:
            y += tl.load(b_ptr + m[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + lanes
            mask = row_mask[:, None] & (cols < D)[None, :]
            x = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            acc += x if not IS_RMS else x * x
        if IS_RMS:
            mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
            sq = tl.sum(acc, 1)
        else:
            mean = tl.sum(acc, 1) / D
            tl.store(mean_ptr + rows, mean, mask=row_mask)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):  # the variance about the mean: no cancellation of E[x^2] - mu^2
                cols = d0 + lanes
                mask = row_mask[:, None] & (cols < D)[None, :]
                x = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                acc += xc * xc
            sq = tl.sum(acc, 1)
        rstd = 1.0 / tl.sqrt(sq / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + lanes
            mask = row_mask[:, None] & (cols < D)[None, :]
            x = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + m[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w
            if HAS_BIAS:
                y += tl.load(b_ptr + m[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modality_norm_bwd_stats_kernel(
    # inputs
    x_ptr, dy_ptr, ids_ptr, w_ptr, mean_ptr, rstd_ptr,
    # outputs
    c1_ptr, c2_ptr,
    # sizes
    R, D, M,
    # strides
    stride_xt, stride_xh, stride_xd, stride_dyt, stride_dyh, stride_dyd, stride_wm,
    # modes
    IS_RMS: tl.constexpr, ROWS_PER_ID: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The row reductions of the backward for rows wider than one block: with ``g = W[m] * dy`` and
    ``x_hat = (x - mu) * rstd``, ``c1[r] = mean_d(g * x_hat)`` and (LayerNorm) ``c2[r] = mean_d(g)``, summed over
    ``BLOCK_D``-column chunks into a ``(BLOCK_R, BLOCK_D)`` fp32 accumulator reduced once (a fixed order).

    Grid: (cdiv(R, BLOCK_R),).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tok = rows // ROWS_PER_ID
    head = rows % ROWS_PER_ID
    m = tl.load(ids_ptr + tok, mask=row_mask, other=0).to(tl.int64)
    m = tl.minimum(tl.maximum(m, 0), M - 1)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32) if IS_RMS else tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    x_row = x_ptr + tok * stride_xt + head * stride_xh
    dy_row = dy_ptr + tok * stride_dyt + head * stride_dyh
    lanes = tl.arange(0, BLOCK_D).to(tl.int64)
    acc1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + lanes
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row[:, None] + cols[None, :] * stride_dyd, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + m[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = w * dy
        acc1 += g * tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if not IS_RMS:
            acc2 += g
    tl.store(c1_ptr + rows, tl.sum(acc1, 1) / D, mask=row_mask)
    if not IS_RMS:
        tl.store(c2_ptr + rows, tl.sum(acc2, 1) / D, mask=row_mask)


@triton.jit
def _modality_norm_bwd_kernel(
    # inputs
    x_ptr, dy_ptr, ids_ptr, w_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
    # outputs
    dx_ptr, dw_part_ptr, db_part_ptr,
    # sizes
    R, D, M, rows_per_program, num_c,
    # strides
    stride_xt, stride_xh, stride_xd, stride_dyt, stride_dyh, stride_dyd, stride_wm,
    # modes
    IS_RMS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ROWS_PER_ID: tl.constexpr, CHUNKED: tl.constexpr,
    # tiles
    M_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``[p * rows_per_program, (p+1) * rows_per_program)``, ``BLOCK_R`` per loop iteration, in order,
    columns ``[d * BLOCK_D, (d+1) * BLOCK_D)``:

    ``x_hat = (x - mu) * rstd`` (``mu = 0`` for RMSNorm), ``g = W[m] * dy``,
    RMSNorm:   ``dx = rstd * (g - x_hat * c1)``,        ``c1 = mean_d(g * x_hat)``
    LayerNorm: ``dx = rstd * (g - x_hat * c1 - c2)``,   ``c2 = mean_d(g)``
    (``c1``, ``c2`` reduced here when a row is one block, read from ``_modality_norm_bwd_stats_kernel`` with
    CHUNKED); ``dW_part[p, m] += dy * x_hat`` and ``db_part[p, m] += dy`` through a one-hot over the ``M_BLOCK``
    modalities ``[c * M_BLOCK, (c+1) * M_BLOCK)``; every program writes its whole partial slice (zeros for
    modalities it did not see), so the sum over programs needs no zero-fill. Only modality chunk 0 writes
    ``dx``; programs of other chunks load only the rows of their modalities.

    Grid: (P * C * Dc,), P = cdiv(R, rows_per_program) row blocks, C = ``num_c`` modality chunks (cdiv(M,
    M_BLOCK) for weight gradients; 1 for dx alone, whatever M), Dc = cdiv(D, BLOCK_D) column chunks (1 without
    CHUNKED); all on axis 0 (no 65535 limit). The launcher's ``num_c`` decodes the program id: a count recomputed
    here from M would disagree with a dx-only grid and leave rows unwritten.
    """
    num_d = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    p = (pid // (num_c * num_d)).to(tl.int64)
    chunk = (pid // num_d) % num_c
    m_lo = chunk * M_BLOCK
    cols = (pid % num_d).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # int64: stride times D can pass 2^31
    col_mask = cols < D
    mods = tl.arange(0, M_BLOCK)
    dw_acc = tl.zeros((M_BLOCK, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((M_BLOCK, BLOCK_D), dtype=tl.float32)

    row_start = p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, R)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        tok = rows // ROWS_PER_ID
        head = rows % ROWS_PER_ID
        in_range = rows < row_end
        m = tl.load(ids_ptr + tok, mask=in_range, other=0).to(tl.int64)
        m = tl.minimum(tl.maximum(m, 0), M - 1)
        # A row is needed by the dx pass (chunk 0) and by its own modality chunk; others load nothing.
        active = in_range & (m >= m_lo) & (m < m_lo + M_BLOCK)
        if COMPUTE_DX:  # `m * 0 + chunk`: a vector, as the interpreter rejects vector-and-scalar masks
            active = active | (in_range & (m * 0 + chunk == 0))
        mask = active[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + tok[:, None] * stride_xt + head[:, None] * stride_xh + cols[None, :] * stride_xd,
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + tok[:, None] * stride_dyt + head[:, None] * stride_dyh + cols[None, :] * stride_dyd,
                     mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=active, other=0.0)
        if IS_RMS:
            x_hat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=active, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        if COMPUTE_DX:
            if chunk == 0:
                w = tl.load(w_ptr + m[:, None] * stride_wm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g = w * dy
                if CHUNKED:
                    c1 = tl.load(c1_ptr + rows, mask=active, other=0.0)
                else:
                    c1 = tl.sum(g * x_hat, 1) / D
                if IS_RMS:
                    dx = (g - x_hat * c1[:, None]) * rstd[:, None]
                else:
                    if CHUNKED:
                        c2 = tl.load(c2_ptr + rows, mask=active, other=0.0)
                    else:
                        c2 = tl.sum(g, 1) / D
                    dx = (g - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
                tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

        # (BLOCK_R, M_BLOCK) one-hot of each row's modality within this chunk; inactive rows match none.
        onehot = ((m - m_lo)[:, None] == mods[None, :]) & active[:, None]
        hot = onehot.to(tl.float32)[:, :, None]
        if COMPUTE_DW:
            dw_acc += tl.sum(hot * (dy * x_hat)[:, None, :], 0)
        if COMPUTE_DB:
            db_acc += tl.sum(hot * dy[:, None, :], 0)

    part = p * num_c * M_BLOCK * D + (m_lo + mods).to(tl.int64)[:, None] * D + cols[None, :]
    if COMPUTE_DW:
        tl.store(dw_part_ptr + part, dw_acc, mask=col_mask[None, :])
    if COMPUTE_DB:
        tl.store(db_part_ptr + part, db_acc, mask=col_mask[None, :])


def _block_d(D: int, most: int = 1 << 30) -> int:
    """Columns per block: D padded to a power of two (at least 16) while that is at most ``most``; otherwise the
    chunk width (at most ``most``: the row is then walked in chunks)."""
    block = max(triton.next_power_of_2(D), 16)
    return block if block <= most else min(_CHUNK_D, most)


def _modalities_per_chunk(M: int, block_d: int) -> int:
    fit = 1 << max((_DW_REGISTER_BUDGET // block_d).bit_length() - 1, 0)  # largest power of two <= budget
    return max(min(triton.next_power_of_2(M), fit, _MAX_M_BLOCK), 2)


def _rows_per_tile(block_d: int, m_block: int) -> int:
    """Rows per tile: enough to fill ~4K fp32 values per program (the backward's one-hot contraction holds
    ``rows x m_block x block_d``), at least 2 and at most 64."""
    return max(2, min(64, _TILE_ELEMENTS // (block_d * m_block)))


def _num_warps(block: int) -> int:
    # One warp per 256 fp32 elements of the widest register block, 4..16 warps.
    return min(max(block // 256, 4), 16)


def _launch_options(block: int) -> dict:
    """``num_warps`` for a register block of ``block`` fp32 elements, and ``maxnreg``: the register file over
    the block's threads. Without a ``.maxnreg``, ptxas sizes these kernels for full occupancy (32 registers at 8
    warps) and spills inside the row loop (benchmarks/results/aot-*.md); with it, it takes what the code needs."""
    warps = _num_warps(block)
    return {"num_warps": warps, "maxnreg": min(255, 65536 // (32 * warps))}


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_row_blocks(R: int, device: torch.device) -> int:
    """Row blocks of the backward: each program owns a contiguous run of rows and one dW partial per modality."""
    if device.type != "cuda":
        # Interpreter: a few programs, so the cross-program reduction and uneven last block are exercised.
        return min(R, 8)
    return min(R, 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()))


@on_first_tensor_device
def modality_norm_fwd(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalise every row of ``x`` with its modality's weights.

    Args:
        x: ``(T, H, D)`` float16 | bfloat16 | float32, any strides; row ``(t, h)`` uses ``weight[ids[t]]``.
        ids: ``(T,)`` int32 | int64 contiguous, values in ``[0, M)`` (not checked here).
        weight: ``(M, D)`` same dtype as ``x``, unit stride along D; bias: optional ``(M, D)`` likewise
            (LayerNorm only).
        eps: added to the variance (mean square for RMSNorm).
        is_rms: RMSNorm when True, LayerNorm when False.

    Returns:
        ``y (T, H, D)`` contiguous in ``x``'s dtype; ``mean (T*H,) float32`` (None for RMSNorm);
        ``rstd (T*H,) float32``.
    """
    T, H, D = x.shape
    R = T * H
    y = torch.empty((T, H, D), device=x.device, dtype=x.dtype)
    rstd = torch.empty((R,), device=x.device, dtype=torch.float32)
    mean = None if is_rms else torch.empty((R,), device=x.device, dtype=torch.float32)
    if R == 0:
        return y, mean, rstd
    block_d = _block_d(D, _FWD_MAX_BLOCK_D)
    block_r = _rows_per_tile(block_d, 1)
    _modality_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, ids, weight, bias if bias is not None else placeholder(x),
        y, mean if mean is not None else rstd, rstd,
        R, D, weight.shape[0], float(eps),
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), bias.stride(0) if bias is not None else 0,
        IS_RMS=is_rms, HAS_BIAS=bias is not None, ROWS_PER_ID=H, CHUNKED=block_d < D,
        BLOCK_R=block_r, BLOCK_D=block_d, **_launch_options(block_r * block_d),
    )
    return y, mean, rstd


@on_first_tensor_device
def modality_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    is_rms: bool,
    compute_dx: bool = True,
    compute_dw: bool = True,
    compute_db: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`modality_norm_fwd`.

    Args:
        dy: ``(T, H, D)`` output gradient, any strides; x, ids, weight: as in the forward;
        mean, rstd: the forward's fp32 row statistics (``mean`` None for RMSNorm).
        compute_dx / compute_dw / compute_db: which gradients to produce (``db`` only for LayerNorm).

    Returns:
        ``dx (T, H, D)`` in ``x``'s dtype, ``dW (M, D)`` and ``db (M, D)`` in ``weight``'s dtype, each None
        when not requested. ``dW``/``db`` accumulate in fp32; a modality without rows gets exact zeros.
    """
    T, H, D = x.shape
    M = weight.shape[0]
    R = T * H
    dx = torch.empty((T, H, D), device=x.device, dtype=x.dtype) if compute_dx else None
    if R == 0 or M == 0:
        dw = weight.new_zeros((M, D)) if compute_dw else None
        db = weight.new_zeros((M, D)) if compute_db else None
        return dx, dw, db
    block_d = _block_d(D, _BWD_MAX_BLOCK_D)
    chunked = block_d < D
    d_chunks = triton.cdiv(D, block_d)
    # Modalities per chunk: all of them (padded to a power of two) unless the partial would spill registers.
    m_block = _modalities_per_chunk(M, block_d)
    block_r = _rows_per_tile(block_d, m_block)
    chunks = triton.cdiv(M, m_block) if (compute_dw or compute_db) else 1
    # Column chunks multiply the programs: fewer row blocks keep the partials (and their sum) the same size.
    programs = triton.cdiv(_num_row_blocks(R, x.device), d_chunks)
    if compute_dw or compute_db:  # each row block holds a partial of every modality: bound their memory
        programs = max(1, min(programs, _MAX_PARTIAL_ENTRIES // (chunks * m_block * D)))
    rows_per_program = triton.cdiv(R, programs)
    programs = triton.cdiv(R, rows_per_program)
    part_shape = (programs, chunks * m_block, D)
    dw_part = torch.empty(part_shape, device=x.device, dtype=torch.float32) if compute_dw else None
    db_part = torch.empty(part_shape, device=x.device, dtype=torch.float32) if compute_db else None
    strides = (x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), weight.stride(0))
    mean_arg = mean if mean is not None else rstd
    c1 = c2 = rstd  # placeholders unless the row statistics come from their own kernel
    if chunked and compute_dx:
        c1 = torch.empty((R,), device=x.device, dtype=torch.float32)
        c2 = c1 if is_rms else torch.empty((R,), device=x.device, dtype=torch.float32)
        stats_r = _rows_per_tile(block_d, 1)
        _modality_norm_bwd_stats_kernel[(triton.cdiv(R, stats_r),)](
            x, dy, ids, weight, mean_arg, rstd,
            c1, c2,
            R, D, M,
            *strides,
            IS_RMS=is_rms, ROWS_PER_ID=H,
            BLOCK_R=stats_r, BLOCK_D=block_d, **_launch_options(stats_r * block_d),
        )
    _modality_norm_bwd_kernel[(programs * chunks * d_chunks,)](
        x, dy, ids, weight, mean_arg, rstd, c1, c2,
        dx if dx is not None else placeholder(x), dw_part if dw_part is not None else placeholder(rstd),
        db_part if db_part is not None else placeholder(rstd),
        R, D, M, rows_per_program, chunks,
        *strides,
        IS_RMS=is_rms, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, ROWS_PER_ID=H,
        CHUNKED=chunked,
        M_BLOCK=m_block, BLOCK_R=block_r, BLOCK_D=block_d, **_launch_options(block_r * m_block * block_d // 2),
    )
    # Fixed-order reduction over programs: deterministic, unlike atomics.
    dw = dw_part[:, :M].sum(0).to(weight.dtype) if dw_part is not None else None
    db = db_part[:, :M].sum(0).to(weight.dtype) if db_part is not None else None
    return dx, dw, db
