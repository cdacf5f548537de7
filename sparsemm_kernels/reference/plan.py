"""Reference plan: a stable sort of the ids and a search for each group's first row."""

from __future__ import annotations

import torch


def group_plan_ref(ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of ``ids (N,)`` into ``num_groups`` groups.

    Returns ``(sorted_to_orig (N,), counts (G,), offsets (G+1,))``, all int64 on ``ids.device``. Uses
    ``searchsorted`` on the sorted ids rather than ``bincount``, which would sync on CUDA to size its output.
    An id outside ``[0, G)`` is sorted as the nearest valid id, as every backend does.
    """
    sorted_ids, sorted_to_orig = torch.sort(ids.to(torch.int64).clamp(0, num_groups - 1), stable=True)
    bounds = torch.arange(num_groups + 1, device=ids.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_ids, bounds)
    counts = offsets[1:] - offsets[:-1]
    return sorted_to_orig, counts, offsets
