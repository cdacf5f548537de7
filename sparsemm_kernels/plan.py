"""The plan: which rows go to which weight group. Built once on the device, reused by every layer.

A plan is a stable counting sort of per-row group ids: ``sorted_to_orig`` lists the rows group by group
(original order kept inside a group) and ``offsets`` marks where each group starts. Building one never waits
on the host: every size that must be static (rows, groups) comes from Python ints the caller already has.

``sparsemm::group_plan`` is a ``torch.library`` custom op (opaque to ``torch.compile``, with a fake
implementation), dispatching to the ``cuda`` / ``triton`` / ``cpu`` / ``torch`` kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.utils.checks import (
    ASYNC,
    EAGER,
    check_ids_values,
    check_int_tensor,
    check_num_groups,
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
        orig_to_sorted: ``(N,) int64`` the inverse permutation: sorted position of each original row.
        trusted: True for a plan built by :func:`group_plan` (a valid permutation by construction, so ops
            skip re-checking it). A plan assembled by hand is checked by the ops that use it (see their
            ``validate`` argument).
        group_ids: the ids the plan was built from (``None`` for a hand-made plan); layers that receive this
            very tensor with the plan need not re-check its range.
    """

    sorted_to_orig: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    num_groups: int
    num_rows: int
    orig_to_sorted: torch.Tensor | None = None
    trusted: bool = False
    group_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """The device the plan's tensors live on."""
        return self.offsets.device


def _group_plan(
    ids: torch.Tensor, num_groups: int, mode: str, backend: str | None, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_to_orig, counts, offsets, orig_to_sorted)`` of flat ``ids``; ids outside ``[0, G)`` are
    checked per ``mode`` (eager ValueError / async device assertion, naming the argument ``name``) and
    otherwise sorted as the nearest valid id, so the plan is always a permutation."""
    backend_name = select_backend("group_plan", ids.device, ids.dtype, backend)
    if backend_name == "triton":
        from sparsemm_kernels.kernels.triton.group_plan import MAX_GROUPS, group_plan_triton, histogram_fits

        # Wider plans, or ones whose per-chunk histogram would not fit its memory bound, go to the torch sort,
        # unless triton was demanded.
        if num_groups > MAX_GROUPS:
            if backend == "triton":
                raise ValueError(
                    f"`num_groups` must be <= {MAX_GROUPS} for the triton group_plan, got {num_groups}"
                )
            backend_name = "torch"
        elif not histogram_fits(ids.numel(), num_groups):
            if backend == "triton":
                raise ValueError(
                    f"`{name}` with {ids.numel()} ids over {num_groups} groups is past the triton group_plan's "
                    "histogram bound (kernels.triton.group_plan.MAX_HISTOGRAM_ENTRIES); use the cuda or torch backend"
                )
            backend_name = "torch"
    if backend_name == "cuda":
        from sparsemm_kernels.kernels.cuda import group_plan_cuda

        sorted_to_orig, counts, offsets, invalid = group_plan_cuda(ids, num_groups)
        if mode == ASYNC:  # the sort counted bad ids as it went: assert on that, not on another pass
            torch._assert_async(invalid == 0, f"`{name}` has ids outside [0, {num_groups})")
        else:
            check_ids_values(ids, num_groups, name, mode)
    elif backend_name == "cpu":
        from sparsemm_kernels.kernels.cpu import group_plan_cpu

        # The C++ sort reports the first bad id as it goes: no separate pass.
        sorted_to_orig, counts, offsets, first_bad = group_plan_cpu(ids, num_groups)
        if first_bad >= 0 and mode in (EAGER, ASYNC):
            raise ValueError(
                f"`{name}` must hold ids in [0, {num_groups}); found {int(ids[first_bad])} "  # sync-ok: CPU
                f"at flat index {first_bad}"
            )
    else:
        check_ids_values(ids, num_groups, name, mode)
        if backend_name == "triton":
            sorted_to_orig, counts, offsets = group_plan_triton(ids, num_groups)
        else:
            from sparsemm_kernels.reference.plan import group_plan_ref

            sorted_to_orig, counts, offsets = group_plan_ref(ids, num_groups)
    orig_to_sorted = torch.empty_like(sorted_to_orig)
    orig_to_sorted[sorted_to_orig] = torch.arange(sorted_to_orig.numel(), device=ids.device)
    return sorted_to_orig, counts, offsets, orig_to_sorted


def _group_plan_fake(ids, num_groups, mode, backend, name):
    n = ids.numel()
    return (
        ids.new_empty(n, dtype=torch.int64),
        ids.new_empty(num_groups, dtype=torch.int64),
        ids.new_empty(num_groups + 1, dtype=torch.int64),
        ids.new_empty(n, dtype=torch.int64),
    )


group_plan_op = Op("sparsemm::group_plan", _group_plan, _group_plan_fake)


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
        num_groups: ``G``, ``1 <= G <= 2**24`` (any integer type).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or ``None``/``"auto"`` (see
            :mod:`sparsemm_kernels.backend`).
        validate: ids are range-checked eagerly (``ValueError``) on CPU; on CUDA by default with an
            asynchronous device assertion (no host sync), eagerly with ``validate=True``. With
            ``validate=False`` they are not checked, and an id outside ``[0, G)`` is grouped as the nearest
            valid id (``0`` or ``G - 1``): the plan is a permutation whatever the ids hold.

    Returns:
        :class:`GroupPlan` over ``N = group_ids.numel()`` rows, ``trusted=True``.
    """
    return build_plan(group_ids, num_groups, backend=backend, validate=validate, name="group_ids")


def build_plan(
    group_ids: torch.Tensor, num_groups: int, *, backend: str | None, validate: bool | None, name: str
) -> GroupPlan:
    """:func:`group_plan` with the argument named ``name`` in errors (``modality_ids`` for the MoT layers)."""
    check_int_tensor(group_ids, name)
    num_groups = check_num_groups(num_groups)
    backend = check_backend_name(backend)
    ids = group_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    mode = validation_mode(validate, ids.device)
    sorted_to_orig, counts, offsets, orig_to_sorted = group_plan_op(
        ids, num_groups, mode, backend, name
    )
    return GroupPlan(
        sorted_to_orig, offsets, counts, num_groups, ids.numel(), orig_to_sorted, trusted=True, group_ids=group_ids
    )


def _checked_ids(ids: torch.Tensor, num_groups: int, mode: str, name: str) -> torch.Tensor:
    """``ids`` checked per ``mode`` (naming ``name``) and returned clamped into ``[0, num_groups)``: the ids a
    layer then uses can index ``num_groups`` weights whatever the input held."""
    check_ids_values(ids, num_groups, name, mode)
    return ids.clamp(0, num_groups - 1)


def _checked_ids_fake(ids, num_groups, mode, name):
    return torch.empty_like(ids)


checked_ids_op = Op("sparsemm::checked_ids", _checked_ids, _checked_ids_fake)


def checked_ids(ids: torch.Tensor, num_groups: int, *, validate: bool | None, name: str) -> torch.Tensor:
    """Range-check ``ids`` (eager ``ValueError`` on CPU, asynchronous device assertion on CUDA, nothing with
    ``validate=False``) in a way ``torch.compile`` keeps: the clamped ids returned are what the caller uses."""
    return checked_ids_op(ids, num_groups, validation_mode(validate, ids.device), name)


def check_sorted_rows(x: torch.Tensor, plan, num_groups: int, dim: int, layer: str) -> None:
    """For a ``forward_sorted`` entry point: ``x (T, dim)`` float rows in the order of ``plan``, a
    :class:`GroupPlan` over ``T`` rows and ``num_groups`` groups (``layer`` names the caller in errors)."""
    from sparsemm_kernels.utils.checks import check_float_tensor

    check_float_tensor(x, "x")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"`x` must be (T, {dim}) rows in plan order, got shape {tuple(x.shape)}")
    if not isinstance(plan, GroupPlan):
        raise TypeError(f"`plan` must be a GroupPlan with num_modalities={num_groups}, got {type(plan).__name__}")
    if plan.num_groups != num_groups or plan.num_rows != x.shape[0]:
        raise ValueError(
            f"`plan` routes {plan.num_rows} rows into {plan.num_groups} groups, but `x` has {x.shape[0]} rows and "
            f"the {layer} {num_groups} modalities"
        )
