"""Per-modality RMSNorm and LayerNorm on tokens in their original order (no plan, no permutation).

Token ``i`` of modality ``m_i`` is normalised over its last dim and scaled by its modality's weights:
``y_i = norm(x_i) * W[m_i] (+ b[m_i])``. The same op serves block norms (``x (..., D)``, one id per row) and
per-head QK-norm (``x (..., H, d_h)``, one id per token shared by its ``H`` heads). One autograd Function
covers both norms over the fused Triton kernels; the ``torch`` backend is the differentiable reference.
"""

from __future__ import annotations

import math

import torch

from sparsemm_kernels.backend import BackendUnavailableError, select_backend
from sparsemm_kernels.reference.norms import modality_layer_norm_ref, modality_rms_norm_ref
from sparsemm_kernels.utils.checks import (
    check_dim,
    check_float_tensor,
    check_ids_in_range,
    check_int_tensor,
    check_same_device,
    check_same_dtype,
    validation_mode,
)


class ModalityNormFunction(torch.autograd.Function):
    """Autograd for the fused per-modality norm kernels of the ``triton`` backend."""

    @staticmethod
    def forward(ctx, x, modality_ids, weight, bias, eps: float, is_rms: bool, heads: int):
        """x: any shape holding ``T * heads`` rows of ``D``, seen as ``(T, heads, D)``; modality_ids: ``(T,)``
        int32 | int64 contiguous; weight, bias: ``(M, D)`` contiguous (bias None for RMSNorm or no bias);
        is_rms: RMSNorm or LayerNorm. Returns ``x.shape`` in x's dtype."""
        from sparsemm_kernels.kernels.triton.norms import modality_norm_fwd

        x3 = x.reshape(modality_ids.shape[0], heads, x.shape[-1])  # a view whenever x's strides allow one
        y, mean, rstd = modality_norm_fwd(x3, modality_ids, weight, bias, eps, is_rms=is_rms)
        ctx.save_for_backward(x3, modality_ids, weight, mean, rstd)
        ctx.is_rms, ctx.has_bias, ctx.x_shape = is_rms, bias is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from sparsemm_kernels.kernels.triton.norms import modality_norm_bwd

        x3, modality_ids, weight, mean, rstd = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        dx, dw, db = modality_norm_bwd(
            dy.reshape(x3.shape), x3, modality_ids, weight, mean, rstd, is_rms=ctx.is_rms,
            compute_dx=need_x, compute_dw=need_w, compute_db=need_b and ctx.has_bias,
        )
        return dx.view(ctx.x_shape) if dx is not None else None, None, dw, db, None, None, None


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"`eps` must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"`eps` must be a positive finite float, got {eps}")
    return float(eps)


def _check_param(p, name: str, x: torch.Tensor, num_modalities: int | None) -> None:
    check_float_tensor(p, name)
    check_dim(p, 2, name, "(M, D), one row per modality")
    check_same_device("x", x, name, p)
    check_same_dtype("x", x, name, p)
    D = x.shape[-1]
    if p.shape[1] != D:
        raise ValueError(f"`{name}` has {p.shape[1]} columns (shape {tuple(p.shape)}) but `x` has D = {D}")
    if num_modalities is not None and p.shape[0] != num_modalities:
        raise ValueError(f"`{name}` has {p.shape[0]} rows but `weight` has M = {num_modalities}")


def _check_operands(x, modality_ids, weight, bias, eps, validate) -> float:
    check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"`x` must be (..., D) with D >= 1, got shape {tuple(x.shape)}")
    check_int_tensor(modality_ids, "modality_ids")
    check_same_device("x", x, "modality_ids", modality_ids)
    ids_shape = tuple(modality_ids.shape)
    if ids_shape != tuple(x.shape[:-1]) and (x.dim() < 2 or ids_shape != tuple(x.shape[:-2])):
        raise ValueError(
            f"`modality_ids` must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one modality per row) or "
            f"x.shape[:-2] = {tuple(x.shape[:-2])} (per head), got {ids_shape}"
        )
    _check_param(weight, "weight", x, None)
    if bias is not None:
        _check_param(bias, "bias", x, weight.shape[0])
    eps = _check_eps(eps)
    check_ids_in_range(modality_ids, weight.shape[0], "modality_ids", validation_mode(validate, modality_ids.device))
    return eps


def _select(x: torch.Tensor, backend: str | None) -> str:
    name = select_backend("modality_norm", x.device, x.dtype, backend)
    if name != "triton":
        return name
    from sparsemm_kernels.kernels.triton.norms import MAX_FUSED_D

    if x.shape[-1] > MAX_FUSED_D:
        if backend not in (None, "auto"):
            raise BackendUnavailableError(
                f"backend 'triton' cannot run modality_norm: `x` has D = {x.shape[-1]} > {MAX_FUSED_D}, the "
                "widest row the fused kernels hold"
            )
        return "torch"
    return name


def _apply(x, modality_ids, weight, bias, eps, is_rms) -> torch.Tensor:
    heads = x.shape[-2] if modality_ids.dim() == x.dim() - 2 else 1  # per-head ids: H rows share one id
    ids = modality_ids.reshape(-1).contiguous()
    bias = bias.contiguous() if bias is not None else None
    return ModalityNormFunction.apply(x, ids, weight.contiguous(), bias, eps, is_rms, heads)


def modality_rms_norm(
    x: torch.Tensor,
    modality_ids: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Per-modality RMSNorm: ``y = x / sqrt(mean_d(x^2) + eps) * weight[m]`` over the last dim.

    ::

        x (..., D),    modality_ids x.shape[:-1]    row i uses weight[ids[i]]        (block norm)
        x (..., H, D), modality_ids x.shape[:-2]    all H heads of token t use
                                                    weight[ids[t]]                   (QK-norm, D = d_h)

    Args:
        x: float16 | bfloat16 | float32 | float64, any strides; rows stay in their original order.
        modality_ids: int32 | int64 of shape ``x.shape[:-1]`` or ``x.shape[:-2]``, values in ``[0, M)``
            (checked eagerly on CPU, by an asynchronous device assertion on CUDA).
        weight: ``(M, D)``, same dtype and device as ``x``.
        eps: positive float added to the mean square.
        backend: see :mod:`sparsemm_kernels.backend`; default: the fastest for the device.
        validate: how the id range is checked (see :func:`sparsemm_kernels.group_plan`); ``False`` for ids
            already checked (the MoT layers check once per forward). Kernels clamp ids either way, so a bad
            id never reads outside ``weight``.

    Returns:
        ``x.shape`` in ``x``'s dtype. Statistics in float32 (float64 for float64 input). Differentiable in
        ``x`` and ``weight``; the weight gradient of a modality absent from the batch is exactly zero, and
        the triton backend reduces it without atomics (bitwise reproducible).
    """
    eps = _check_operands(x, modality_ids, weight, None, eps, validate)
    if _select(x, backend) == "torch":
        return modality_rms_norm_ref(x, modality_ids, weight, eps)
    return _apply(x, modality_ids, weight, None, eps, True)


def modality_layer_norm(
    x: torch.Tensor,
    modality_ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Per-modality LayerNorm: ``y = (x - mean_d(x)) / sqrt(var_d(x) + eps) * weight[m] + bias[m]``.

    The variance is biased (divides by ``D``), as in ``nn.LayerNorm``. Shapes, ids, dtypes and backends as in
    :func:`modality_rms_norm`; ``bias`` is ``(M, D)`` or None; ``validate`` as there.

    Returns:
        ``x.shape`` in ``x``'s dtype; differentiable in ``x``, ``weight`` and ``bias`` (exact zeros for a
        modality absent from the batch).
    """
    eps = _check_operands(x, modality_ids, weight, bias, eps, validate)
    if _select(x, backend) == "torch":
        return modality_layer_norm_ref(x, modality_ids, weight, bias, eps)
    return _apply(x, modality_ids, weight, bias, eps, False)
