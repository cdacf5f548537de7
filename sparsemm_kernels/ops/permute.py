"""Reordering rows between token order and a plan's group order: ``sort_rows`` and ``unsort_rows``.

A group-sorted stream (every per-group op on contiguous row blocks) permutes once on the way in and once
on the way out. ``sparsemm::permute_rows`` is one ``index_select`` whose backward is the inverse
``index_select`` - no scatter-add, no zero-fill - and which is its own kind of op, so second derivatives
come for free.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import MODES, OFF, TRUSTED, check_permutation_values, check_tensor, validation_mode


def _permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, mode: str) -> torch.Tensor:
    """``x[index]`` along dim 0 (``index`` a permutation of the rows, ``inverse`` its inverse)."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    check_permutation_values(index, "plan.sorted_to_orig", mode)
    if mode == OFF:  # unchecked: an out-of-range index reads row 0 or the last row, never past the tensor
        index = index.clamp(0, max(x.shape[0] - 1, 0))
    return x.index_select(0, index)


def _permute_rows_fake(x, index, inverse, mode):
    return x.new_empty(index.shape[0], *x.shape[1:])


def _setup(ctx, inputs, output):
    _, index, inverse, mode = inputs
    ctx.save_for_backward(index, inverse)
    ctx.mode = OFF if mode == OFF else TRUSTED


def _backward(ctx, dy):
    index, inverse = ctx.saved_tensors
    return permute_rows_op(dy, inverse, index, ctx.mode), None, None, None


permute_rows_op = Op("sparsemm::permute_rows", _permute_rows, _permute_rows_fake, _setup, _backward)


def _permute(x: torch.Tensor, plan: GroupPlan, to_sorted: bool, validate) -> torch.Tensor:
    check_tensor(x, "x")
    if not isinstance(plan, GroupPlan):
        raise TypeError(f"`plan` must be a GroupPlan (from sparsemm_kernels.group_plan), got {type(plan).__name__}")
    if x.dim() < 1 or x.shape[0] != plan.num_rows:
        raise ValueError(f"`x` must have the plan's {plan.num_rows} rows along dim 0, got shape {tuple(x.shape)}")
    inverse = plan.orig_to_sorted
    if inverse is None:  # a hand-made plan: its inverse, from one sort
        inverse = torch.argsort(plan.sorted_to_orig)
    index, inverse = (plan.sorted_to_orig, inverse) if to_sorted else (inverse, plan.sorted_to_orig)
    if x.device != index.device:
        raise ValueError(f"`plan` is on {index.device} but `x` is on {x.device}")
    mode = TRUSTED if plan.trusted else validation_mode(validate, x.device)
    return permute_rows_op(x, index, inverse, mode)


def sort_rows(x: torch.Tensor, plan: GroupPlan, *, validate: bool | None = None) -> torch.Tensor:
    """Rows of ``x (T, ...)`` from token order into the plan's group order: ``x[plan.sorted_to_orig]``.

    Differentiable (backward: :func:`unsort_rows` of the gradient). ``validate`` applies to a hand-made plan
    (``plan.trusted`` False), as in :func:`sparsemm_kernels.grouped_linear`.
    """
    return _permute(x, plan, True, validate)


def unsort_rows(x: torch.Tensor, plan: GroupPlan, *, validate: bool | None = None) -> torch.Tensor:
    """Rows of ``x (T, ...)`` from the plan's group order back to token order: ``x[plan.orig_to_sorted]``."""
    return _permute(x, plan, False, validate)
