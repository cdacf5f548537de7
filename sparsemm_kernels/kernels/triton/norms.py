"""Per-modality RMSNorm / LayerNorm: one forward and one backward kernel for both norms.

Pipeline: forward normalises each row with its modality's weights and saves the fp32 row statistics;
backward recomputes ``x_hat`` from them, writes ``dx`` per row and reduces ``dW`` / ``db`` per modality in
two fixed-order steps (per-program partials in registers, then ``torch.sum`` over programs) - no atomics,
so the result is bitwise reproducible.

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

# A row is one register block; beyond this a row no longer fits (the torch backend has no limit).
MAX_FUSED_D = 65536
# Elements of the per-program dW partial ([M_BLOCK, BLOCK_D] fp32) kept in registers, and the most modalities
# in one one-hot. Modalities beyond them are split over the second grid axis into chunks, each program
# re-walking its rows for its own chunk.
_DW_REGISTER_BUDGET = 16384
_TILE_ELEMENTS = 4096
_MAX_M_BLOCK = 64


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
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS_PER_ID: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``r`` of one ``BLOCK_R``-row tile (token ``t = r // H``, head ``h = r % H``, modality ``m = ids[t]``):

    RMSNorm:   ``rstd = 1 / sqrt(mean_d(x^2) + eps)``,            ``y = x * rstd * W[m]``
    LayerNorm: ``mu = mean_d(x)``, ``rstd = 1 / sqrt(mean_d((x - mu)^2) + eps)``,
               ``y = (x - mu) * rstd * W[m] + b[m]``
    Statistics in fp32; ``rstd`` (and ``mu``) stored as fp32 per row for the backward.

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
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column stride times D can pass 2^31
    mask = row_mask[:, None] & (cols < D)[None, :]

    # fp32 right after the load: statistics need it, and the interpreter cannot do bf16 arithmetic.
    x_ptrs = x_ptr + tok[:, None] * stride_xt + head[:, None] * stride_xh + cols[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
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


@triton.jit
def _modality_norm_bwd_kernel(
    # inputs
    x_ptr, dy_ptr, ids_ptr, w_ptr, mean_ptr, rstd_ptr,
    # outputs
    dx_ptr, dw_part_ptr, db_part_ptr,
    # sizes
    R, D, M, rows_per_program,
    # strides
    stride_xt, stride_xh, stride_xd, stride_dyt, stride_dyh, stride_dyd, stride_wm,
    # modes
    IS_RMS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ROWS_PER_ID: tl.constexpr,
    # tiles
    M_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``[pid * rows_per_program, (pid+1) * rows_per_program)``, ``BLOCK_R`` per loop iteration, in order:

    ``x_hat = (x - mu) * rstd`` (``mu = 0`` for RMSNorm), ``g = W[m] * dy``,
    RMSNorm:   ``dx = rstd * (g - x_hat * mean_d(g * x_hat))``
    LayerNorm: ``dx = rstd * (g - x_hat * mean_d(g * x_hat) - mean_d(g))``
    ``dW_part[pid, m] += dy * x_hat`` and ``db_part[pid, m] += dy`` through a one-hot over the
    ``M_BLOCK`` modalities ``[chunk * M_BLOCK, (chunk+1) * M_BLOCK)``; every program writes its whole
    partial slice (zeros for modalities it did not see), so the sum over programs needs no zero-fill.
    Only chunk 0 writes ``dx``; programs of other chunks load only the rows of their modalities.

    Grid: (P, C), P = cdiv(R, rows_per_program) row blocks, C = cdiv(M, M_BLOCK) modality chunks.
    """
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    m_lo = chunk * M_BLOCK
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: a column stride times D can pass 2^31
    col_mask = cols < D
    mods = tl.arange(0, M_BLOCK)
    dw_acc = tl.zeros((M_BLOCK, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((M_BLOCK, BLOCK_D), dtype=tl.float32)

    row_start = pid * rows_per_program
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
                c1 = tl.sum(g * x_hat, 1) / D
                if IS_RMS:
                    dx = (g - x_hat * c1[:, None]) * rstd[:, None]
                else:
                    dx = (g - x_hat * c1[:, None] - (tl.sum(g, 1) / D)[:, None]) * rstd[:, None]
                tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

        # (BLOCK_R, M_BLOCK) one-hot of each row's modality within this chunk; inactive rows match none.
        onehot = ((m - m_lo)[:, None] == mods[None, :]) & active[:, None]
        hot = onehot.to(tl.float32)[:, :, None]
        if COMPUTE_DW:
            dw_acc += tl.sum(hot * (dy * x_hat)[:, None, :], 0)
        if COMPUTE_DB:
            db_acc += tl.sum(hot * dy[:, None, :], 0)

    part = pid * tl.num_programs(1) * M_BLOCK * D + (m_lo + mods).to(tl.int64)[:, None] * D + cols[None, :]
    if COMPUTE_DW:
        tl.store(dw_part_ptr + part, dw_acc, mask=col_mask[None, :])
    if COMPUTE_DB:
        tl.store(db_part_ptr + part, db_acc, mask=col_mask[None, :])


def _block_d(D: int) -> int:
    return max(triton.next_power_of_2(D), 16)


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


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_row_blocks(R: int, device: torch.device) -> int:
    """Programs of the backward: each owns a contiguous run of rows and one dW partial per modality."""
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
    block_d = _block_d(D)
    block_r = _rows_per_tile(block_d, 1)
    _modality_norm_fwd_kernel[(triton.cdiv(R, block_r),)](
        x, ids, weight, bias if bias is not None else placeholder(x),
        y, mean if mean is not None else rstd, rstd,
        R, D, weight.shape[0], float(eps),
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), bias.stride(0) if bias is not None else 0,
        IS_RMS=is_rms, HAS_BIAS=bias is not None, ROWS_PER_ID=H,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * block_d),
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
    block_d = _block_d(D)
    # Modalities per chunk: all of them (padded to a power of two) unless the partial would spill registers.
    m_block = _modalities_per_chunk(M, block_d)
    block_r = _rows_per_tile(block_d, m_block)
    chunks = triton.cdiv(M, m_block) if (compute_dw or compute_db) else 1
    programs = _num_row_blocks(R, x.device)
    rows_per_program = triton.cdiv(R, programs)
    programs = triton.cdiv(R, rows_per_program)
    part_shape = (programs, chunks * m_block, D)
    dw_part = torch.empty(part_shape, device=x.device, dtype=torch.float32) if compute_dw else None
    db_part = torch.empty(part_shape, device=x.device, dtype=torch.float32) if compute_db else None
    _modality_norm_bwd_kernel[(programs, chunks)](
        x, dy, ids, weight, mean if mean is not None else rstd, rstd,
        dx if dx is not None else placeholder(x), dw_part if dw_part is not None else placeholder(rstd),
        db_part if db_part is not None else placeholder(rstd),
        R, D, M, rows_per_program,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2), weight.stride(0),
        IS_RMS=is_rms, COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, ROWS_PER_ID=H,
        M_BLOCK=m_block, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * m_block * block_d // 2),
    )
    # Fixed-order reduction over programs: deterministic, unlike atomics.
    dw = dw_part[:, :M].sum(0).to(weight.dtype) if dw_part is not None else None
    db = db_part[:, :M].sum(0).to(weight.dtype) if db_part is not None else None
    return dx, dw, db
