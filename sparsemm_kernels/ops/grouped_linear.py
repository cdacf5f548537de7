"""Grouped linear over row groups: ``grouped_mm`` (rows already grouped) and ``grouped_linear`` (rows in
original order, routed by a :class:`~sparsemm_kernels.plan.GroupPlan`).

Both are one autograd Function over the same three kernels: forward ``Y_g = X_g W_g^T + b_g``, dX
``dX_g = dY_g W_g`` (the forward kernel reading ``W`` untransposed), and dW ``dW_g = dY_g^T X_g`` with
``db_g = sum dY_g``. In the routed form the kernels gather rows through ``plan.sorted_to_orig`` on load and
scatter them back on store, so no permuted copy of ``x``, ``dY`` or the output exists.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import select_backend
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.reference.grouped import grouped_linear_ref, grouped_mm_ref
from sparsemm_kernels.utils.checks import (
    check_dim,
    check_float_tensor,
    check_int_tensor,
    check_offsets_values,
    check_same_device,
    check_same_dtype,
    validation_mode,
)


def _kernels(backend: str):
    if backend == "triton":
        from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm, grouped_gemm_dw

        return grouped_gemm, grouped_gemm_dw
    from sparsemm_kernels.kernels.cpu import grouped_gemm_cpu, grouped_gemm_dw_cpu

    return grouped_gemm_cpu, grouped_gemm_dw_cpu


class GroupedGemmFunction(torch.autograd.Function):
    """Autograd for the grouped GEMM kernels of the ``triton`` and ``cpu`` backends."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, rows, routed: bool, backend: str):
        """x: (T, K); weight: (G, N, K); bias: (G, N) or None; offsets: (G+1,) int64; rows: (T,) int64 or
        None; routed: x and the output are in original row order (read/written through ``rows``).
        Returns (T, N) in x's dtype."""
        gemm, _ = _kernels(backend)
        out = gemm(x, weight, offsets, bias=bias, rows=rows, gather_a=routed, scatter_c=routed)
        ctx.save_for_backward(x, weight, offsets, rows)
        ctx.routed, ctx.backend = routed, backend
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets, rows = ctx.saved_tensors
        gemm, gemm_dw = _kernels(ctx.backend)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = gemm(dy, weight, offsets, rows=rows, gather_a=ctx.routed, scatter_c=ctx.routed, transpose_w=True)
        if need_w or need_b:
            dw, db = gemm_dw(dy, x, offsets, rows=rows, gathered=ctx.routed, compute_dbias=need_b)
            dw = dw if need_w else None
        return dx, dw, db, None, None, None, None


def _check_operands(x, weight, bias):
    check_float_tensor(x, "x")
    check_dim(x, 2, "x", "(T, K)")
    check_float_tensor(weight, "weight")
    check_dim(weight, 3, "weight", "(G, N, K) with nn.Linear layout per group")
    check_same_device("x", x, "weight", weight)
    check_same_dtype("x", x, "weight", weight)
    if weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"`weight` has in_features {weight.shape[2]} (shape {tuple(weight.shape)}) but `x` has "
            f"{x.shape[1]} columns"
        )
    if bias is not None:
        check_float_tensor(bias, "bias")
        check_same_device("x", x, "bias", bias)
        check_same_dtype("x", x, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0], weight.shape[1]):
            raise ValueError(
                f"`bias` must have shape (G, N) = {(weight.shape[0], weight.shape[1])}, got {tuple(bias.shape)}"
            )


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Grouped matrix multiply over contiguous row groups.

    ::

        x (T, K)        weight (G, N, K)         out (T, N)
        [ group 0 ]  @  W[0]^T (+ bias[0])  ->   [ group 0 ]
        [ group 1 ]  @  W[1]^T (+ bias[1])  ->   [ group 1 ]
        ...

    Args:
        x: ``(T, K)`` float16 | bfloat16 | float32 | float64; rows of group ``g`` are
            ``offsets[g]:offsets[g+1]``. May be non-contiguous.
        weight: ``(G, N, K)``, same dtype and device as ``x`` (nn.Linear layout per group).
        offsets: ``(G+1,)`` int32 or int64, ``offsets[0] = 0``, non-decreasing, ``offsets[G] = T``
            (``GroupPlan.offsets``). Groups may be empty.
        bias: optional ``(G, N)``.
        backend: see :mod:`sparsemm_kernels.backend`; default: the fastest for the device.
        validate: how ``offsets`` values are checked (see :func:`sparsemm_kernels.group_plan`).

    Returns:
        ``(T, N)`` in ``x``'s dtype. Differentiable in ``x``, ``weight`` and ``bias``; the weight gradient of
        an empty group is exactly zero. fp16/bf16 accumulate in fp32; fp32 stays fp32 unless
        ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    _check_operands(x, weight, bias)
    check_int_tensor(offsets, "offsets")
    check_same_device("x", x, "offsets", offsets)
    if offsets.dim() != 1 or offsets.shape[0] != weight.shape[0] + 1:
        raise ValueError(
            f"`offsets` must be 1-D of length G+1 = {weight.shape[0] + 1} (G from `weight`), "
            f"got shape {tuple(offsets.shape)}"
        )
    offsets = offsets.to(torch.int64).contiguous()
    check_offsets_values(offsets, x.shape[0], "offsets", validation_mode(validate, x.device))
    name = select_backend("grouped_mm", x.device, x.dtype, backend)
    if name == "torch":
        return grouped_mm_ref(x, weight, offsets, bias)
    return GroupedGemmFunction.apply(x, weight, bias, offsets, None, False, name)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: GroupPlan,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[i] = x[i] @ weight[g_i]^T + bias[g_i]`` with rows in their original order.

    The kernels read row ``i`` of ``x`` through ``plan.sorted_to_orig`` and write row ``i`` of the result
    back to its original place: no permuted copy of ``x`` or of the output is made.

    Args:
        x: ``(T, K)`` float16 | bfloat16 | float32 | float64 in original row order.
        weight: ``(G, N, K)``; bias: optional ``(G, N)``.
        plan: :class:`GroupPlan` over the ``T`` rows with ``G`` groups (from :func:`group_plan`).
        backend: see :mod:`sparsemm_kernels.backend`.

    Returns:
        ``(T, N)`` in ``x``'s dtype; differentiable in ``x``, ``weight`` and ``bias``.
    """
    _check_operands(x, weight, bias)
    if not isinstance(plan, GroupPlan):
        raise TypeError(f"`plan` must be a GroupPlan (from sparsemm_kernels.group_plan), got {type(plan).__name__}")
    if plan.num_rows != x.shape[0]:
        raise ValueError(f"`plan` covers {plan.num_rows} rows but `x` has {x.shape[0]}")
    if plan.num_groups != weight.shape[0]:
        raise ValueError(f"`plan` has {plan.num_groups} groups but `weight` has {weight.shape[0]}")
    check_same_device("x", x, "plan", plan.offsets)
    name = select_backend("grouped_mm", x.device, x.dtype, backend)
    if name == "torch":
        return grouped_linear_ref(x, weight, plan.sorted_to_orig, plan.offsets, bias)
    return GroupedGemmFunction.apply(x, weight, bias, plan.offsets, plan.sorted_to_orig, True, name)
