"""Mixture-of-Depths combine: ``out[t] = x[t] + r_i (y_i - x[t])`` where token ``t`` went through the block as
slot ``i``, ``out[t] = x[t]`` elsewhere; and its backward, each in one pass over the tokens.

Both kernels run one program per token row and find its slot in ``slot_of (T,)`` (``-1``: not selected), so every
output row, and every slot's ``dy`` row and ``dr`` entry, has exactly one writer: no atomics, and repeated runs are
bitwise identical. The router's gradient ``dr_i = <dout[t], y_i - x[t]>`` is a row reduction in float32 inside the
same pass. Loads are read as float32 and results rounded once on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import on_first_tensor_device


@triton.jit
def _slot(slot_ptr, r_ptr, t, M):
    """``(slot, selected, r)`` of token row ``t``; a slot outside ``[0, M)`` counts as not selected (and reads
    slot 0's weight, which it does not use: the launcher runs no kernel when ``M = 0``)."""
    i = tl.load(slot_ptr + t)
    ok = (i >= 0) & (i < M)
    i = tl.where(ok, i, 0).to(tl.int64)
    r = tl.where(ok, tl.load(r_ptr + i).to(tl.float32), 0.0)
    return i, ok, r


@triton.jit
def _mod_combine_fwd_kernel(
    x_ptr, y_ptr, r_ptr, slot_ptr, out_ptr,
    D, M,
    stride_x, stride_y, stride_o,
    BLOCK_D: tl.constexpr,
):
    """out[t] = x[t] + r[i] * (y[i] - x[t]) for t selected as slot i, else x[t]. Grid: (T,)."""
    t = tl.program_id(0).to(tl.int64)
    i, ok, r = _slot(slot_ptr, r_ptr, t, M)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = cols < D
        m_ok = m & ((tl.zeros((BLOCK_D,), tl.int32) + ok.to(tl.int32)) != 0)  # a block mask (not a scalar)
        x = tl.load(x_ptr + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + i * stride_y + cols, mask=m_ok, other=0.0).to(tl.float32)
        out = tl.where(ok, x + r * (y - x), x)
        tl.store(out_ptr + t * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mod_combine_bwd_kernel(
    dout_ptr, x_ptr, y_ptr, r_ptr, slot_ptr, dx_ptr, dy_ptr, dr_ptr,
    D, M,
    stride_g, stride_x, stride_y, stride_dx, stride_dy,
    BLOCK_D: tl.constexpr,
):
    """dx[t] = dout[t] (1 - r[i]) or dout[t]; dy[i] = r[i] dout[t]; dr[i] = <dout[t], y[i] - x[t]>. Grid: (T,).
    Slots no token names keep the zeros ``dy`` and ``dr`` start with."""
    t = tl.program_id(0).to(tl.int64)
    i, ok, r = _slot(slot_ptr, r_ptr, t, M)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = cols < D
        m_ok = m & ((tl.zeros((BLOCK_D,), tl.int32) + ok.to(tl.int32)) != 0)
        g = tl.load(dout_ptr + t * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t * stride_x + cols, mask=m_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + i * stride_y + cols, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.where(ok, g * (1.0 - r), g)
        tl.store(dx_ptr + t * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dy_ptr + i * stride_dy + cols, (g * r).to(dy_ptr.dtype.element_ty), mask=m_ok)
        acc += tl.where(m_ok, g * (y - x), 0.0)
    one = tl.arange(0, 1)
    dr = tl.zeros((1,), tl.float32) + tl.sum(acc, 0)
    tl.store(dr_ptr + i + one, dr.to(dr_ptr.dtype.element_ty), mask=(one + ok.to(tl.int32)) == 1)


def _block_d(D: int) -> int:
    return min(max(triton.next_power_of_2(max(D, 1)), 16), 1024)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@on_first_tensor_device
def mod_combine_fwd(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """``x (T, D)``, ``y (M, D)``, ``r (M,)``, ``slot_of (T,)`` int64 (slot of each row or -1) -> ``out (T, D)``."""
    x, y = _rows(x), _rows(y)
    T, D = x.shape
    if y.shape[0] == 0:  # no slot: nothing changes
        return x.clone(memory_format=torch.contiguous_format)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0 or D == 0:
        return out
    _mod_combine_fwd_kernel[(T,)](
        x, y, r.contiguous(), slot_of.contiguous(), out, D, y.shape[0],
        x.stride(0), y.stride(0), out.stride(0), BLOCK_D=_block_d(D), num_warps=4,
    )
    return out


@on_first_tensor_device
def mod_combine_bwd(
    dout: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, slot_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx (T, D), dy (M, D), dr (M,))`` of :func:`mod_combine_fwd`."""
    dout, x, y = _rows(dout), _rows(x), _rows(y)
    T, D = x.shape
    M = y.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dy = torch.zeros(M, D, dtype=y.dtype, device=y.device)
    dr = torch.zeros(M, dtype=r.dtype, device=r.device)
    if M == 0:
        return dout.clone(memory_format=torch.contiguous_format), dy, dr
    if T == 0 or D == 0:
        return dx, dy, dr
    _mod_combine_bwd_kernel[(T,)](
        dout, x, y, r.contiguous(), slot_of.contiguous(), dx, dy, dr, D, M,
        dout.stride(0), x.stride(0), y.stride(0), dx.stride(0), dy.stride(0), BLOCK_D=_block_d(D), num_warps=4,
    )
    return dx, dy, dr
