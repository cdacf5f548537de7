"""Per-modality linear layer on tokens in their original order: plan (if not given) + grouped linear."""

from __future__ import annotations

import torch

from sparsemm_kernels.ops.grouped_linear import grouped_linear
from sparsemm_kernels.plan import GroupPlan, group_plan
from sparsemm_kernels.utils.checks import (
    check_dim,
    check_float_tensor,
    check_ids_in_range,
    check_int_tensor,
    validation_mode,
)


def modality_linear(
    x: torch.Tensor,
    modality_ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    plan: GroupPlan | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Each token uses its modality's weights: ``out[..., :] = x[...] @ weight[m]^T + bias[m]``.

    Args:
        x: ``(..., K)`` float tensor.
        modality_ids: integer tensor of shape ``x.shape[:-1]``, values in ``[0, M)``.
        weight: ``(M, N, K)``; bias: optional ``(M, N)``.
        plan: a :class:`GroupPlan` of ``modality_ids`` to reuse (build it once per forward with
            ``group_plan(modality_ids, M)`` and pass it to every layer); built here when ``None``.
        backend, validate: as in :func:`sparsemm_kernels.grouped_linear` / :func:`sparsemm_kernels.group_plan`.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    check_float_tensor(x, "x")
    check_int_tensor(modality_ids, "modality_ids")
    check_float_tensor(weight, "weight")
    check_dim(weight, 3, "weight", "(M, N, K)")
    if x.dim() < 1:
        raise ValueError("`x` must have at least one dimension (..., K)")
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"`modality_ids` must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(modality_ids.shape)}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if plan is None:
        mode = validation_mode(validate, modality_ids.device)
        check_ids_in_range(modality_ids, weight.shape[0], "modality_ids", mode)
        plan = group_plan(modality_ids, weight.shape[0], backend=backend, validate=False)
    out = grouped_linear(x2, weight, plan, bias, backend=backend)
    return out.reshape(*lead, weight.shape[1])
