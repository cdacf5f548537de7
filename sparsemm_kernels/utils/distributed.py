"""What the layers' global selections (``selection_group``) share: the group's size, the all-gather of every rank's
rows, and this rank's share of a choice made over all of them. Nothing here is differentiable: only the choice
crosses ranks (the gates are each rank's own scores)."""

from __future__ import annotations

import torch


def group_size(group) -> int:
    """The size of a ``selection_group`` (1 when there is none, or no process group is initialised)."""
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on each) stacked along dim 0 in rank order, detached. Bool tensors travel
    as uint8 (not every backend gathers bool)."""
    send = (t.to(torch.uint8) if t.dtype == torch.bool else t.detach()).contiguous()
    parts = [torch.empty_like(send) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, send, group=group)
    out = torch.cat(parts)
    return out.bool() if t.dtype == torch.bool else out


def rank_share(keys: torch.Tensor, start: int, stop: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``keys [R, n]`` (ascending) holds this rank's rows ``[start, stop)`` as one contiguous run:
    ``(local [R, length], valid [R, length])`` - the run moved to the front as rank-local indices ``key - start``,
    ``valid`` False past its end (``local`` is then meaningless: the caller pads it)."""
    R, n = keys.shape
    # Made on the device: torch.tensor(list, device=cuda) is a blocking host-to-device copy.
    edges = torch.stack([keys.new_full((R,), start), keys.new_full((R,), stop)], 1)
    lo = torch.searchsorted(keys.contiguous(), edges)
    j = torch.arange(length, device=keys.device)[None, :]
    valid = j < (lo[:, 1:] - lo[:, :1])
    src = (lo[:, :1] + j).clamp(max=max(n - 1, 0))
    return keys.gather(1, src) - start, valid
