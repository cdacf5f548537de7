"""Per-modality linear layer on tokens in their original order: plan (if not given) + grouped linear."""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import prefer
from sparsemm_kernels.ops.grouped_linear import grouped_linear
from sparsemm_kernels.plan import GroupPlan, build_plan
from sparsemm_kernels.utils.checks import autocast_to, check_dim, check_float_tensor, check_int_tensor


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
        backend, validate: as in :func:`sparsemm_kernels.grouped_linear` / :func:`sparsemm_kernels.group_plan`
            (``backend="cuda"`` names the plan's kernel, the GEMM then chooses automatically; ``validate``
            applies to ``modality_ids`` when the plan is built here, to a hand-made plan else).

    Returns:
        ``(..., N)`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``).
    """
    x, weight, bias = autocast_to(x, weight, bias)
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
    x2 = x.reshape(lead.numel(), x.shape[-1])  # explicit row count: K may be 0
    if plan is None:
        plan = build_plan(modality_ids, weight.shape[0], backend=backend, validate=validate, name="modality_ids")
    # "cuda" names the plan's kernel (the GEMM has none): the GEMM then takes the automatic choice.
    gemm_backend = prefer(backend) if backend == "cuda" else backend
    out = grouped_linear(x2, weight, plan, bias, backend=gemm_backend, validate=validate)
    return out.reshape(*lead, weight.shape[1])
