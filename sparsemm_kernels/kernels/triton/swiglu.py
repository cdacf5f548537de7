"""SwiGLU activation on a fused gate/up projection: forward and backward kernels.

Pipeline: one grouped GEMM writes ``gate_up = x [W1; W3]^T`` of shape ``(..., 2H)`` (the gate ``a`` in the
first H columns, the up projection ``b`` in the last H); ``swiglu_fwd`` computes ``y = silu(a) * b`` and
``swiglu_bwd`` writes ``d_gate_up = [da | db]`` in one pass, recomputing the sigmoid from the saved
``gate_up`` (keeping the input rather than ``sigmoid(a)`` or ``y`` costs no extra activation memory).

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
def _swiglu_fwd_kernel(
    # input
    gate_up_ptr,
    # output
    y_ptr,
    # sizes
    R, H,
    # row strides, in elements (columns are unit-stride)
    stride_gr, stride_yr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """y[r, j] = silu(a) * b with a = gate_up[r, j], b = gate_up[r, H + j], silu(a) = a * sigmoid(a).

    Grid: (cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)).
    """
    # int64 rows: R * 2H passes 2^31 at realistic sizes (e.g. 400k tokens x 2 x 2816 in one MoT FFN call).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a_ptrs = gate_up_ptr + rows[:, None] * stride_gr + cols[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    y = a * _sigmoid(a) * b
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    # inputs
    gate_up_ptr, dy_ptr,
    # output
    dgate_up_ptr,
    # sizes
    R, H,
    # row strides, in elements (columns are unit-stride)
    stride_gr, stride_dyr, stride_dgr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """With s = sigmoid(a): da = dy * b * s * (1 + a * (1 - s)) into column j, db = dy * a * s into H + j.

    (d silu(a) / da = s + a * s * (1 - s).) Grid: (cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    a_ptrs = gate_up_ptr + rows[:, None] * stride_gr + cols[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * (a * s)
    da_ptrs = dgate_up_ptr + rows[:, None] * stride_dgr + cols[None, :]
    tl.store(da_ptrs, da.to(dgate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(da_ptrs + H, db.to(dgate_up_ptr.dtype.element_ty), mask=mask)


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
def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :H]) * gate_up[..., H:]``.

    Args:
        gate_up: ``(..., 2H)`` float16 | bfloat16 | float32, on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            any row stride.

    Returns:
        ``(..., H)`` contiguous, in ``gate_up``'s dtype; computed in float32.
    """
    H = gate_up.shape[-1] // 2
    y = torch.empty((*gate_up.shape[:-1], H), device=gate_up.device, dtype=gate_up.dtype)
    if y.numel() == 0:
        return y
    g = _rows(gate_up, 2 * H)
    R = g.shape[0]
    block_r, block_h, num_warps = _tiles(H)
    grid = (triton.cdiv(R, block_r), triton.cdiv(H, block_h))
    _swiglu_fwd_kernel[grid](
        g,
        y,
        R, H,
        g.stride(0), H,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y


@on_first_tensor_device
def swiglu_bwd(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`swiglu_fwd` with respect to ``gate_up``.

    Args:
        gate_up: ``(..., 2H)`` the forward input (any row stride); dy: ``(..., H)`` any float dtype and layout.

    Returns:
        ``d_gate_up (..., 2H)`` contiguous, in ``gate_up``'s dtype: ``[da | db]``, computed in float32.
    """
    H = gate_up.shape[-1] // 2
    dgate_up = torch.empty(gate_up.shape, device=gate_up.device, dtype=gate_up.dtype)
    if dgate_up.numel() == 0:
        return dgate_up
    g = _rows(gate_up, 2 * H)
    d = _rows(dy, H)
    R = g.shape[0]
    block_r, block_h, num_warps = _tiles(H)
    grid = (triton.cdiv(R, block_r), triton.cdiv(H, block_h))
    _swiglu_bwd_kernel[grid](
        g, d,
        dgate_up,
        R, H,
        g.stride(0), d.stride(0), 2 * H,
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return dgate_up
