"""Mixture-of-Depths routing: which tokens go through a block, as a top-k with sorted output.

``mod_route(router_logits [B, S], capacity)`` -> ``[B, C]`` positions: each sequence's ``C`` highest logits in
ascending position order, ties to the lower position; ``batch_level=True`` -> the top ``C`` over the whole batch as
ascending flat indices ``b * S + s``. Both are expert-choice routing with the roles renamed (a sequence, or the
batch, is an "expert" that picks its tokens), so they run on the same segmented top-k kernels
(``sparsemm::expert_choice_indices``: Triton, C++ on the CPU, the torch sort), which already write the ascending,
tie-stable order MoD needs. No host sync: ``C`` comes from Python ints.
"""

from __future__ import annotations

import math

import torch

from sparsemm_kernels.ops.routing import check_finite_scores, route_indices
from sparsemm_kernels.utils.checks import (
    ASYNC,
    EAGER,
    OFF,
    check_dim,
    check_float_tensor,
    check_same_device,
    check_tensor,
    validation_mode,
)


def mod_capacity(capacity, length: int) -> int:
    """Tokens kept out of ``length``: ``ceil(capacity * length)`` for a float ``capacity`` in (0, 1], the int
    itself for an int in ``[1, length]`` (``ValueError`` naming ``capacity`` otherwise)."""
    if isinstance(capacity, bool):
        raise TypeError("`capacity` must be a float in (0, 1] or an int, got bool")
    if isinstance(capacity, int):
        if not 1 <= capacity <= max(length, 1):
            raise ValueError(f"`capacity` as an int must be in [1, {length}] (the tokens it chooses from), "
                             f"got {capacity}")
        return min(capacity, length)
    if isinstance(capacity, float):
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"`capacity` as a float must be in (0, 1], got {capacity}")
        return min(max(math.ceil(capacity * length), 1), length)
    raise TypeError(f"`capacity` must be a float in (0, 1] or an int, got {type(capacity).__name__}")


def mod_route(
    router_logits: torch.Tensor,
    capacity,
    batch_level: bool = False,
    token_mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Mixture-of-Depths routing: the tokens with the highest router logits, in their original order.

    Args:
        router_logits: ``[B, S]`` float (one logit per token); must be finite.
        capacity: a float in (0, 1] (``C = ceil(capacity * S)``, or ``ceil(capacity * B * S)`` batch-level) or an
            int ``C`` with ``1 <= C <= S`` (``B * S`` batch-level).
        batch_level: pick over the whole batch (MoMa's MoD) instead of per sequence.
        token_mask: optional ``[B, S]`` bool; ``False`` tokens (padding) are never chosen.
        backend: the routing kernels' backend (see :func:`~sparsemm_kernels.expert_choice_route`).
        validate: the finiteness check of ``router_logits``: eager on CPU, an asynchronous device assertion on
            CUDA; ``False`` off (a NaN logit is then never chosen).

    Returns:
        per sequence: ``[B, C]`` int64 positions, ascending in each row, ties to the lower position;
        ``batch_level``: ``[C]`` int64 flat indices ``b * S + s``, ascending. When masking leaves fewer than ``C``
        eligible tokens the remaining entries are ``-1``, at the end. No gradient (an index choice has none:
        a MoD layer's router learns through the weight it scales the block's update by).
    """
    check_float_tensor(router_logits, "router_logits")
    check_dim(router_logits, 2, "router_logits", "[B, S] (one logit per token)")
    if not isinstance(batch_level, bool):
        raise TypeError(f"`batch_level` must be a bool, got {type(batch_level).__name__}")
    B, S = router_logits.shape
    if B == 0 or S == 0:
        raise ValueError(f"`router_logits` must hold at least one token, got shape {(B, S)}")
    if token_mask is not None:
        check_tensor(token_mask, "token_mask")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"`token_mask` must be a bool tensor, got {token_mask.dtype}")
        if tuple(token_mask.shape) != (B, S):
            raise ValueError(f"`token_mask` must have the shape of `router_logits` {(B, S)}, got "
                             f"{tuple(token_mask.shape)}")
        check_same_device("router_logits", router_logits, "token_mask", token_mask)
    C = mod_capacity(capacity, B * S if batch_level else S)
    logits = router_logits.detach()
    mode = validation_mode(validate, logits.device)
    if mode == EAGER and torch.compiler.is_compiling():  # a traced graph cannot raise on a value: assert instead
        mode = ASYNC
    check_finite_scores(logits, "router_logits", mode)
    if batch_level:  # one "expert" choosing among all B * S tokens
        mask = token_mask.reshape(B * S) if token_mask is not None else None
        return route_indices(logits.reshape(B * S, 1), C, mask, None, OFF, backend)[0]
    # every sequence an "expert" choosing among its S tokens: scores [S, B]
    mask = token_mask.t() if token_mask is not None else None
    return route_indices(logits.t(), C, mask, None, OFF, backend)
