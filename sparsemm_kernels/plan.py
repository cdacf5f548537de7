"""The plan: which rows go to which weight group. Built once on the device, reused by every layer.

A plan is a stable counting sort of per-row group ids: ``sorted_to_orig`` lists the rows group by group
(original order kept inside a group) and ``offsets`` marks where each group starts. Building one never waits
on the host: every size that must be static (rows, groups) comes from Python ints the caller already has.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparsemm_kernels.backend import select_backend
from sparsemm_kernels.utils.checks import (
    check_ids_in_range,
    check_int_tensor,
    check_positive_int,
    validation_mode,
)


@dataclass(frozen=True, eq=False)
class GroupPlan:
    """Rows sorted by group, as device tensors.

    Attributes:
        sorted_to_orig: ``(N,) int64`` original row index of each sorted position; the rows of group ``g``
            are ``sorted_to_orig[offsets[g]:offsets[g + 1]]``, in increasing original order.
        offsets: ``(G + 1,) int64`` cumulative group sizes, ``offsets[0] = 0``, ``offsets[G] = N``.
        counts: ``(G,) int64`` rows per group.
        num_groups: ``G``.
        num_rows: ``N``, the number of routed rows (the flattened ``group_ids``).
    """

    sorted_to_orig: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    num_groups: int
    num_rows: int

    @functools.cached_property
    def orig_to_sorted(self) -> torch.Tensor:
        """``(N,) int64`` inverse permutation: sorted position of each original row."""
        inv = torch.empty_like(self.sorted_to_orig)
        inv[self.sorted_to_orig] = torch.arange(self.num_rows, device=inv.device)
        return inv

    @property
    def device(self) -> torch.device:
        return self.offsets.device


def group_plan(
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> GroupPlan:
    """Sort rows by group id, stably, on the ids' device, without a host sync.

    Args:
        group_ids: integer tensor (int32 or int64) of any shape; it is flattened, so row ``i`` of the plan is
            element ``i`` of ``group_ids.reshape(-1)``. Every id must lie in ``[0, num_groups)``.
        num_groups: ``G >= 1``.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or ``None``/``"auto"`` (see
            :mod:`sparsemm_kernels.backend`).
        validate: ids are range-checked eagerly (``ValueError``) on CPU; on CUDA by default with an
            asynchronous device assertion (no host sync), eagerly with ``validate=True``, not at all with
            ``validate=False``.

    Returns:
        :class:`GroupPlan` over ``N = group_ids.numel()`` rows.
    """
    check_int_tensor(group_ids, "group_ids")
    check_positive_int(num_groups, "num_groups")
    ids = group_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n = ids.numel()
    name = select_backend("group_plan", ids.device, ids.dtype, backend)
    mode = validation_mode(validate, ids.device)
    # The C++ kernel finds bad ids itself while sorting, so the cpu backend skips the separate pass.
    if name != "cpu":
        check_ids_in_range(ids, num_groups, "group_ids", mode)
    with torch.no_grad():
        if name == "cpu":
            from sparsemm_kernels.kernels.cpu import group_plan_cpu

            sorted_to_orig, counts, offsets, first_bad = group_plan_cpu(ids, num_groups)
            if first_bad >= 0 and mode != "off":
                bad = ids[first_bad]  # CPU ids: reading one costs nothing
                raise ValueError(
                    f"`group_ids` must hold ids in [0, {num_groups}); found {int(bad)} at flat index {first_bad}"
                )
        elif name == "cuda":
            from sparsemm_kernels.kernels.cuda import group_plan_cuda

            sorted_to_orig, counts, offsets, _invalid = group_plan_cuda(ids, num_groups)
        elif name == "triton":
            from sparsemm_kernels.kernels.triton.group_plan import group_plan_triton

            sorted_to_orig, counts, offsets = group_plan_triton(ids, num_groups)
        else:
            from sparsemm_kernels.reference.plan import group_plan_ref

            sorted_to_orig, counts, offsets = group_plan_ref(ids, num_groups)
    return GroupPlan(sorted_to_orig, offsets, counts, num_groups, n)
