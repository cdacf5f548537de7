"""Moving rows between tokens and expert slots without atomics: ``pick_rows`` and ``sum_rows``.

An expert-choice layer computes on ``P = E * C`` slots; slot ``p`` holds token ``index[p]`` (or nothing, -1),
and a token may sit in several slots (several experts chose it). ``pick_rows`` fills the slots from the tokens;
``sum_rows`` adds each token's slots back (the combine). Each is the other's adjoint, so each one's backward is
the other: a token's gradient is the sum of its slots' gradients taken through ``inverse`` (``[N, K]``: the
slots of token ``t``, -1 padded), in a fixed order - no scatter-add, no atomics, bitwise reproducible, and
second derivatives come for free. Every index is bounded: a value outside its range reads a zero row.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.ops.dispatch import Op


def _bounded(index: torch.Tensor, size: int) -> torch.Tensor:
    """``index`` with every value outside ``[0, size)`` (the -1 "nothing" included) sent to ``size``: the zero
    row appended by the caller."""
    return torch.where((index >= 0) & (index < size), index, size)


def _pick_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``out[p] = x[index[p]]``, zeros where ``index[p]`` is -1 (or out of range); ``x [N, D]``, ``index [P]``."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return padded.index_select(0, _bounded(index, x.shape[0]))


def _pick_rows_fake(x, index, inverse):
    return x.new_empty(index.shape[0], *x.shape[1:])


def _sum_rows(y: torch.Tensor, inverse: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k y[inverse[t, k]]`` over the valid entries, in order of ``k`` (float32 sums for 16-bit ``y``);
    ``y [P, D]``, ``inverse [N, K]``."""
    padded = torch.cat([y, y.new_zeros(1, *y.shape[1:])])
    bounded = _bounded(inverse, y.shape[0])
    # 16-bit rows add up in float32 and round once (k bf16 additions would round k times).
    acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    out = torch.zeros(inverse.shape[0], *y.shape[1:], dtype=acc, device=y.device)
    for k in range(inverse.shape[1]):  # K (experts) is a static size: a fixed summation order
        out += padded.index_select(0, bounded[:, k])
    return out.to(y.dtype)


def _sum_rows_fake(y, inverse, index):
    return y.new_empty(inverse.shape[0], *y.shape[1:])


def _setup(ctx, inputs, output):
    _, a, b = inputs
    ctx.save_for_backward(a, b)


def _pick_backward(ctx, dy):
    index, inverse = ctx.saved_tensors
    return sum_rows_op(dy, inverse, index), None, None


def _sum_backward(ctx, dy):
    inverse, index = ctx.saved_tensors
    return pick_rows_op(dy, index, inverse), None, None


pick_rows_op = Op("sparsemm::pick_rows", _pick_rows, _pick_rows_fake, _setup, _pick_backward)
sum_rows_op = Op("sparsemm::sum_rows", _sum_rows, _sum_rows_fake, _setup, _sum_backward)


def slot_inverse(index: torch.Tensor, num_rows: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_rows, E]`` int64: for the expert-major ``index [E, C]`` (token per slot, -1 empty), the buffer row
    that holds token ``t`` for expert ``e`` (``positions[e, j]``, by default ``e * C + j``), or -1. Expert choice
    puts a token at most once in an expert's row, so every write of the scatter below has its own place (the
    empty slots all land in a discarded extra row)."""
    E, C = index.shape
    device = index.device
    if positions is None:
        positions = torch.arange(E * C, device=device).view(E, C)
    inverse = torch.full((num_rows + 1, E), -1, dtype=torch.int64, device=device)
    cols = torch.arange(E, device=device).view(E, 1).expand(E, C)
    inverse.index_put_((_bounded(index, num_rows).reshape(-1), cols.reshape(-1)), positions.reshape(-1))
    return inverse[:num_rows]


def pair_rows(choice: torch.Tensor, num_groups: int, *, backend: str | None, name: str):
    """The ``N * k`` (row, choice) pairs of ``choice [N, k]`` (each a group in ``[0, num_groups)``, e.g. a token's
    experts or blocks) sorted by group: ``(plan, slots, inverse)`` with ``plan`` the :class:`GroupPlan` of the pairs
    (pair ``p = t * k + j``), ``slots [N * k]`` the row of every sorted pair and ``inverse [N, k]`` the sorted
    position of every pair - what :func:`pick_rows_op` / :func:`sum_rows_op` take. No host sync."""
    from sparsemm_kernels.plan import build_plan

    N, k = choice.shape
    plan = build_plan(choice.reshape(-1), num_groups, backend=backend, validate=False, name=name)
    slots = torch.div(plan.sorted_to_orig, k, rounding_mode="floor")
    return plan, slots, plan.orig_to_sorted.view(N, k)
