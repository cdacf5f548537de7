"""SwiGLU activation ``y = silu(a) * b``: one forward and one backward kernel, for the gate ``a`` and the up
projection ``b`` as two tensors (``silu_mul_*``) or as the two halves of one ``(..., 2H)`` buffer
(``swiglu_*``, the same kernels on column views).

The backward writes ``da`` and ``db`` in one pass, recomputing the sigmoid from the saved inputs (keeping
them rather than ``sigmoid(a)`` or ``y`` costs no extra activation memory).

Both kernels view the leading dimensions as ``R`` rows: a row stride is honoured (a column slice of a wider
buffer runs without a copy); a last dimension that is not unit-stride is made contiguous by the launcher.
Loads are converted to float32 at once (the interpreter has no bf16 arithmetic; on the GPU it is the
precision we want anyway) and results are rounded once, on store, to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device


@triton.jit
def _sigmoid(a):
    # For a < -88 exp(-a) overflows fp32 to inf and 1 / inf = 0: the correct limit, never NaN.
    return 1.0 / (1.0 + tl.exp(-a))


@triton.jit
def _silu_mul_fwd_kernel(
    # inputs
    a_ptr, b_ptr,
    # output
    y_ptr,
    # sizes
    R, H,
    # row strides, in elements (columns are unit-stride)
    stride_ar, stride_br, stride_yr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """y[r, j] = silu(a[r, j]) * b[r, j], silu(a) = a * sigmoid(a).

    Grid: (cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)).
    """
    # int64 rows: R * 2H passes 2^31 at realistic sizes (e.g. 400k tokens x 2 x 2816 in one MoT FFN call).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_br + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = a * _sigmoid(a) * b
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    # inputs
    a_ptr, b_ptr, dy_ptr,
    # outputs
    da_ptr, db_ptr,
    # sizes
    R, H,
    # row strides, in elements (columns are unit-stride)
    stride_ar, stride_br, stride_dyr, stride_dar, stride_dbr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """With s = sigmoid(a): da = dy * b * s * (1 + a * (1 - s)), db = dy * a * s.

    (d silu(a) / da = s + a * s * (1 - s).) Grid: (cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_br + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * (a * s)
    tl.store(da_ptr + rows[:, None] * stride_dar + cols[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + rows[:, None] * stride_dbr + cols[None, :], db.to(db_ptr.dtype.element_ty), mask=mask)


def _tiles(H: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)`` for rows of ``H`` output columns.

    GPU: 4096 elements per program (16 per thread at 8 warps: enough loads in flight for a memory-bound
    kernel), up to 1024 columns wide, so 2816 = 3 x 1024 - 256 wastes few lanes and a narrow H gets many
    rows per program. Interpreter: 256-element tiles at most 16 wide, so small test shapes cross both the
    row and the column tile edges.
    """
    if is_interpreting():
        block_h = min(max(triton.next_power_of_2(H), 4), 16)
        return 256 // block_h, block_h, 4
    block_h = min(max(triton.next_power_of_2(H), 16), 1024)
    return 4096 // block_h, block_h, 8


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as ``(R, cols)`` with a unit column stride: a view when the layout allows, else a copy."""
    t = t.reshape(-1, cols)
    if cols > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


@on_first_tensor_device
def silu_mul_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``a, b (..., H)`` float16 | bfloat16 | float32 of one shape, any row strides (a
    column slice of a wider buffer runs without a copy). Returns ``(..., H)`` contiguous in ``a``'s dtype,
    computed in float32."""
    H = a.shape[-1]
    y = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    if y.numel() == 0:
        return y
    a2, b2 = _rows(a, H), _rows(b, H)
    R = a2.shape[0]
    block_r, block_h, num_warps = _tiles(H)
    grid = (triton.cdiv(R, block_r), triton.cdiv(H, block_h))
    _silu_mul_fwd_kernel[grid](
        a2, b2,
        y,
        R, H,
        a2.stride(0), b2.stride(0), H,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y


@on_first_tensor_device
def silu_mul_bwd(
    a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, da: torch.Tensor | None = None, db: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`silu_mul_fwd`: ``(da, db)``, each ``a.shape`` in ``a``'s dtype, computed in float32.

    ``da`` / ``db`` may be given as ``(..., H)`` buffers with unit column stride (e.g. the two halves of one
    ``(..., 2H)`` gradient) and are written in place; otherwise they are allocated contiguous.
    """
    H = a.shape[-1]
    da = torch.empty(a.shape, device=a.device, dtype=a.dtype) if da is None else da
    db = torch.empty(a.shape, device=a.device, dtype=a.dtype) if db is None else db
    if a.numel() == 0:
        return da, db
    a2, b2, d2 = _rows(a, H), _rows(b, H), _rows(dy, H)
    da2, db2 = da.view(-1, H), db.view(-1, H)  # views: the kernel must write into the caller's buffers
    if H > 1 and (da2.stride(1) != 1 or db2.stride(1) != 1):
        raise ValueError("`da` and `db` must have a unit column stride")
    R = a2.shape[0]
    block_r, block_h, num_warps = _tiles(H)
    grid = (triton.cdiv(R, block_r), triton.cdiv(H, block_h))
    _silu_mul_bwd_kernel[grid](
        a2, b2, d2,
        da2, db2,
        R, H,
        a2.stride(0), b2.stride(0), d2.stride(0), da2.stride(0), db2.stride(0),
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return da, db


def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :H]) * gate_up[..., H:]``: :func:`silu_mul_fwd` on the two halves (no copy)."""
    H = gate_up.shape[-1] // 2
    return silu_mul_fwd(gate_up[..., :H], gate_up[..., H:])


def swiglu_bwd(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_fwd`: ``d_gate_up (..., 2H)`` contiguous, ``[da | db]`` written in one pass."""
    H = gate_up.shape[-1] // 2
    dgate_up = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
    silu_mul_bwd(gate_up[..., :H], gate_up[..., H:], dy, dgate_up[..., :H], dgate_up[..., H:])
    return dgate_up
