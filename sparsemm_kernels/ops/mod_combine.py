"""The Mixture-of-Depths combine: write the block's scaled update back to the tokens that went through it.

``mod_combine(x (T, D), y (M, D), r (M,), index (M,), num_real)`` -> ``out (T, D)``: ``out = x``, except row
``index[i]`` of every slot ``i`` with ``index[i] < num_real`` becomes ``x_t + r_i (y_i - x_t)`` (slots at or past
``num_real`` are padding: they change nothing and get zero gradients). ``sparsemm::mod_combine`` and
``sparsemm::mod_combine_bwd`` are ``torch.library`` custom ops: on the ``triton`` backend one kernel each way (one
program per token row, no atomics, the router's gradient ``<dout, y - x>`` reduced in the same pass), on the
``torch`` backend gathers and an ``index_copy``. A second derivative is refused (the backward is a fused kernel).
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.utils.checks import accumulation_dtype, check_same_device


def _slot_of(index: torch.Tensor, num_rows: int, num_real: int) -> torch.Tensor:
    """``(num_rows,)`` int64: the slot of each row named by a real slot, -1 for the others (padding slots land in
    a dropped extra row, so no row has two writers)."""
    real = (index >= 0) & (index < min(num_real, num_rows))  # an index past the rows is never a target
    target = torch.where(real, index, num_rows)
    slots = torch.arange(index.shape[0], device=index.device, dtype=torch.int64)
    out = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=index.device)
    return out.index_copy(0, target, slots)[:num_rows]


def _real(index: torch.Tensor, num_real: int, num_rows: int) -> torch.Tensor:
    return ((index >= 0) & (index < min(num_real, num_rows)))[:, None]


def _combine_torch(x, y, r, index, num_real: int) -> torch.Tensor:
    rows = index.clamp(0, max(x.shape[0] - 1, 0))
    xs = x.index_select(0, rows)
    new = torch.where(_real(index, num_real, x.shape[0]), xs + r.to(x.dtype)[:, None] * (y - xs), xs)
    return x.contiguous().index_copy(0, rows, new)  # a padding slot writes back the row it read: nothing changes


def _combine_bwd_torch(dout, x, y, r, index, num_real: int):
    rows = index.clamp(0, max(x.shape[0] - 1, 0))
    real = _real(index, num_real, x.shape[0])
    g = dout.index_select(0, rows)
    rr = r.to(dout.dtype)[:, None]
    dy = torch.where(real, g * rr, 0.0).to(y.dtype)
    acc = accumulation_dtype(dout.dtype)  # the reduction as the kernel does it
    diff = y.to(acc) - x.index_select(0, rows).to(acc)
    dr = torch.where(real, g.to(acc) * diff, 0.0).sum(-1).to(r.dtype)
    dx = dout.index_copy(0, rows, torch.where(real, g * (1 - rr), g))
    return dx, dy, dr


def _mod_combine(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, index: torch.Tensor, num_real: int,
                 backend: str | None) -> torch.Tensor:
    """``out = x`` with rows ``index[i] < num_real`` replaced by ``x + r_i (y_i - x)``."""
    if select_backend("mod_combine", x.device, x.dtype, backend) == "torch":
        return _combine_torch(x, y, r, index, num_real)
    from sparsemm_kernels.kernels.triton.mod_combine import mod_combine_fwd

    return mod_combine_fwd(x, y, r, _slot_of(index, x.shape[0], num_real))


def _mod_combine_fake(x, y, r, index, num_real, backend):
    return x.new_empty(x.shape)


def _mod_combine_bwd(dout: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, index: torch.Tensor,
                     num_real: int, backend: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, dr)``: ``dx = dout (1 - r_i)`` at combined rows and ``dout`` elsewhere, ``dy_i = r_i dout``,
    ``dr_i = <dout, y_i - x>``; zeros for padding slots."""
    if select_backend("mod_combine", x.device, x.dtype, backend) == "torch":
        return _combine_bwd_torch(dout, x, y, r, index, num_real)
    from sparsemm_kernels.kernels.triton.mod_combine import mod_combine_bwd

    return mod_combine_bwd(dout, x, y, r, _slot_of(index, x.shape[0], num_real))


def _mod_combine_bwd_fake(dout, x, y, r, index, num_real, backend):
    return x.new_empty(x.shape), y.new_empty(y.shape), r.new_empty(r.shape)


def _setup(ctx, inputs, output):
    x, y, r, index, num_real, backend = inputs
    ctx.save_for_backward(x, y, r, index)
    ctx.num_real, ctx.backend = num_real, backend


def _backward(ctx, dout):
    x, y, r, index = ctx.saved_tensors
    dx, dy, dr = mod_combine_bwd_op(dout.contiguous(), x, y, r, index, ctx.num_real, ctx.backend)
    return dx, dy, dr, None, None, None


def _no_setup(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("double backward through the Mixture-of-Depths combine is not supported: its backward is a "
                       "fused kernel")


mod_combine_op = Op("sparsemm::mod_combine", _mod_combine, _mod_combine_fake, _setup, _backward)
mod_combine_bwd_op = Op("sparsemm::mod_combine_bwd", _mod_combine_bwd, _mod_combine_bwd_fake, _no_setup,
                        _refuse_double_backward)


def mod_combine(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, index: torch.Tensor, num_real: int, *,
                backend: str | None = None) -> torch.Tensor:
    """The combine of :class:`~sparsemm_kernels.nn.MixtureOfDepths` (see the module docstring): ``x (T, D)``,
    ``y (M, D)`` and ``r (M,)`` of ``x``'s dtype and device, ``index (M,)`` int64 rows of ``x`` with each row
    below ``num_real`` named at most once. Differentiable in ``x``, ``y`` and ``r`` (first derivatives)."""
    if x.dim() != 2 or y.dim() != 2 or y.shape[1] != x.shape[1] or tuple(r.shape) != (y.shape[0],) \
            or tuple(index.shape) != (y.shape[0],):
        raise ValueError(f"mod_combine takes x (T, D), y (M, D), r (M,), index (M,); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(r.shape)}, {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"`index` must be int64, got {index.dtype}")
    for name, t in (("y", y), ("r", r), ("index", index)):
        check_same_device("x", x, name, t)
    if not isinstance(num_real, int) or isinstance(num_real, bool) or not 0 <= num_real <= x.shape[0]:
        raise ValueError(f"`num_real` must be an int in [0, {x.shape[0]}] (the rows of `x`), got {num_real!r}")
    return mod_combine_op(x, y.to(x.dtype), r.to(x.dtype), index, num_real, check_backend_name(backend))
