"""Expert-choice routing: each expert picks its ``capacity`` highest-scoring tokens.

``expert_choice_route(scores, capacity)`` -> ``(token_idx [E, C], gates [E, C])``: the expert-major plan the
grouped GEMM consumes (group ``e`` = row ``e``, ``C`` slots each), listed in ascending token order per expert,
unused slots ``-1`` with gate 0 at the end of the row. The choice is ``sparsemm::expert_choice_indices`` (a
custom op, no gradient: an index choice has none); the gates are a differentiable gather of ``scores`` at the
chosen entries, so gradients reach the router through them. Ties go to the lower token index. No host sync:
every shape comes from the caller's Python ints (``N``, ``E``, ``capacity``).
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.utils.checks import (
    ASYNC,
    EAGER,
    MODES,
    check_dim,
    check_float_tensor,
    check_positive_int,
    check_same_device,
    check_tensor,
    validation_mode,
)

#: ``E * capacity`` slots above this are a mistake, not a model (the index and gate tensors alone would take
#: 16 bytes a slot); refused before anything is allocated.
MAX_SLOTS = 1 << 31


def check_finite_scores(scores: torch.Tensor, name: str, mode: str) -> None:
    """``ValueError`` naming ``name`` and the first non-finite entry of the 2-D ``scores`` (``mode`` eager), an
    asynchronous device assertion (``async``), nothing otherwise."""
    if mode not in (EAGER, ASYNC) or scores.numel() == 0:
        return
    finite = torch.isfinite(scores)
    if mode == ASYNC:
        torch._assert_async(finite.all(), f"`{name}` must be finite (router scores with NaN or inf)")
        return
    if not bool(finite.all()):  # sync-ok: eager mode reads on purpose
        flat = int((~finite).flatten().to(torch.uint8).argmax())  # sync-ok: eager mode
        t, e = divmod(flat, scores.shape[1])
        raise ValueError(f"`{name}` must be finite; {name}[{t}, {e}] = {float(scores[t, e])}")  # sync-ok


def _indices_torch(
    scores: torch.Tensor, token_mask: torch.Tensor | None, capacity: int, limit: torch.Tensor | None
) -> torch.Tensor:
    N, E = scores.shape
    k = min(capacity, N)
    s = scores.t()
    if token_mask is not None:  # [N] for every expert, or [N, E] per expert
        s = s.masked_fill(~(token_mask.t() if token_mask.dim() == 2 else token_mask[None, :]), float("-inf"))
    # A stable descending sort keeps equal scores in token order: ties go to the lower token index.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    eligible = s.gather(1, order) > float("-inf")  # masked tokens (and, unchecked, NaN) are never chosen
    if limit is not None:  # per-expert capacities that live on the device, each <= capacity
        eligible &= torch.arange(k, device=s.device)[None, :] < limit[:, None]
    # Chosen tokens in ascending order, the slots nobody fills (key N) at the end as -1.
    key = torch.where(eligible, order, N).sort(dim=1).values
    idx = torch.where(key < N, key, -1)
    if capacity > k:
        idx = torch.cat([idx, idx.new_full((E, capacity - k), -1)], dim=1)
    return idx


def _expert_choice_indices(
    scores: torch.Tensor,
    token_mask: torch.Tensor | None,
    capacity: int,
    limit: torch.Tensor | None,
    mode: str,
    backend: str | None,
) -> torch.Tensor:
    """``[E, capacity]`` int64: per expert the tokens of its ``capacity`` (or ``limit[e]``) highest
    ``scores[:, e]`` (``token_mask`` False never chosen; ties to the lower token), ascending, ``-1`` slots at
    the end."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    check_finite_scores(scores, "scores", mode)
    name = select_backend("expert_choice_route", scores.device, scores.dtype, backend)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.routing import expert_choice_indices_triton

        return expert_choice_indices_triton(scores, token_mask, capacity, limit)
    if name == "cpu":
        from sparsemm_kernels.kernels.cpu import expert_choice_cpu

        return expert_choice_cpu(scores, token_mask, capacity, limit)
    return _indices_torch(scores, token_mask, capacity, limit)


def _expert_choice_indices_fake(scores, token_mask, capacity, limit, mode, backend):
    return scores.new_empty(scores.shape[1], capacity, dtype=torch.int64)


expert_choice_indices_op = Op("sparsemm::expert_choice_indices", _expert_choice_indices,
                              _expert_choice_indices_fake)


def route_indices(scores, capacity: int, token_mask, limit, mode: str, backend) -> torch.Tensor:
    """``sparsemm::expert_choice_indices`` on checked arguments: ``[E, capacity]`` int64 (see
    :func:`_expert_choice_indices`); for the layers and the other routers built on the same top-k."""
    return expert_choice_indices_op(scores, token_mask, capacity, limit, mode, check_backend_name(backend))


def expert_choice_route(
    scores: torch.Tensor,
    capacity: int,
    token_mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing: every expert takes the ``capacity`` tokens it scores highest.

    Args:
        scores: ``[N, E]`` float router scores (token x expert), e.g. ``sigmoid(x W_r^T)``; must be finite.
        capacity: ``C >= 1`` tokens per expert (may exceed ``N``: the extra slots stay empty).
        token_mask: optional ``[N]`` bool; tokens with ``False`` (padding) are never chosen.
        backend: see :mod:`sparsemm_kernels.backend`: ``triton`` (the segmented top-k kernel, the CUDA
            default for float16/bfloat16/float32), ``cpu`` (the C++ segmented top-k, the CPU default) or
            ``torch`` (two stable sorts).
        validate: checks that ``scores`` is finite: eager on CPU, an asynchronous device assertion on CUDA;
            ``True`` eager everywhere, ``False`` off (a NaN score is then never chosen).

    Returns:
        ``token_idx [E, C]`` int64: expert ``e``'s tokens in ascending order, ties broken toward the lower
        token index, unused slots (fewer than ``C`` eligible tokens) ``-1`` at the end of the row;
        ``gates [E, C]`` in ``scores``' dtype: ``scores[token_idx[e, j], e]``, 0 in unused slots,
        differentiable in ``scores`` (gradient 1 at each chosen entry through the gather).
    """
    check_float_tensor(scores, "scores")
    check_dim(scores, 2, "scores", "[N, E] (tokens x experts)")
    N, E = scores.shape
    if E == 0:
        raise ValueError("`scores` must have at least one expert column, got shape (N, 0)")
    capacity = check_positive_int(capacity, "capacity")
    if E * capacity > MAX_SLOTS:
        raise ValueError(f"`capacity` {capacity} x {E} experts is more than {MAX_SLOTS} (2**31) slots")
    if token_mask is not None:
        check_tensor(token_mask, "token_mask")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"`token_mask` must be a bool tensor, got {token_mask.dtype}")
        if tuple(token_mask.shape) != (N,):
            raise ValueError(f"`token_mask` must have shape ({N},) (one flag per row of `scores`), got "
                             f"{tuple(token_mask.shape)}")
        check_same_device("scores", scores, "token_mask", token_mask)
    return _route(scores, capacity, token_mask, None, backend, validate)


def _route(scores, capacity: int, token_mask, limit, backend, validate) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expert_choice_route` after its argument checks; ``token_mask`` may be ``[N, E]`` (per expert) and
    ``limit [E]`` int64 caps each expert's slots on the device (the layers that route inside groups)."""
    N, E = scores.shape
    backend = check_backend_name(backend)
    mode = validation_mode(validate, scores.device)
    idx = expert_choice_indices_op(scores.detach(), token_mask, capacity, limit, mode, backend)
    return idx, gather_gates(scores, idx)


def gather_gates(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``gates [E, C] = scores[idx[e, j], e]``, 0 where ``idx`` is -1; differentiable in ``scores [N, E]``."""
    N, E = scores.shape
    # Empty slots read a zero column appended after the N tokens (also right when N = 0).
    padded = torch.cat([scores.t(), scores.new_zeros(E, 1)], dim=1)
    return padded.gather(1, torch.where(idx >= 0, idx, N))
