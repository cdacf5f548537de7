"""Per-modality RMSNorm and LayerNorm on tokens in their original order (no plan, no permutation).

Token ``i`` of modality ``m_i`` is normalised over its last dim and scaled by its modality's weights:
``y_i = norm(x_i) * W[m_i] (+ b[m_i])``. The same op serves block norms (``x (..., D)``, one id per row) and
per-head QK-norm (``x (..., H, d_h)``, one id per token shared by its ``H`` heads).

Pipeline: ``sparsemm::modality_norm`` (forward: ``y`` and the float32 row statistics) and
``sparsemm::modality_norm_bwd`` (``dx``, ``dW``, ``db`` from the statistics) are ``torch.library`` custom ops
over the fused Triton kernels (GPU), the extension's C++ kernels (``cpu`` backend: one pass over each row, in
float32/float64), or the reference for the ``torch`` backend. A second derivative is refused with an error (the
backward is a fused kernel), never returned wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsemm_kernels.backend import BackendUnavailableError, check_backend_name, select_backend
from sparsemm_kernels.kernels.cpu import group_norm_bwd_cpu, group_norm_fwd_cpu
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.reference.norms import modality_layer_norm_ref, modality_norm_bwd_ref, modality_rms_norm_ref
from sparsemm_kernels.utils.checks import (
    OFF,
    TRUSTED,
    accumulation_dtype,
    autocast_to,
    check_dim,
    check_float_tensor,
    check_ids_values,
    check_int_tensor,
    check_offsets_tensor,
    check_offsets_values,
    check_same_device,
    check_same_dtype,
    sanitized_offsets,
    validation_mode,
)


def _rows(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``(T, H, D)`` (a view whenever its strides allow) and ``ids`` as contiguous ``(T,)``."""
    heads = x.shape[-2] if ids.dim() == x.dim() - 2 else 1  # per-head ids: H rows share one id
    return x.reshape(ids.numel(), heads, x.shape[-1]), ids.reshape(-1).contiguous()


def _select(x: torch.Tensor, backend: str | None) -> str:
    name = select_backend("modality_norm", x.device, x.dtype, backend)
    if name != "triton":
        return name
    from sparsemm_kernels.kernels.triton.norms import MAX_FUSED_D

    if x.shape[-1] > MAX_FUSED_D:
        if backend == "triton":
            raise BackendUnavailableError(
                f"backend 'triton' cannot run modality_norm: `x` has D = {x.shape[-1]} > {MAX_FUSED_D}, the "
                "widest row the fused kernels hold"
            )
        return "torch"
    return name


def _resolve(x: torch.Tensor, backend: str | None) -> str | None:
    """The backend an eager call runs, as a strict name for the op (see ``backend.resolve_backend``)."""
    return backend if torch.compiler.is_compiling() else _select(x, backend)


def _norm_torch(x, ids, weight, bias, eps: float, is_rms: bool):
    """The reference, with ids clamped into the weight range (an unchecked bad id reads a valid row)."""
    ids = ids.clamp(0, weight.shape[0] - 1)
    if is_rms:
        return modality_rms_norm_ref(x, ids, weight, eps)
    return modality_layer_norm_ref(x, ids, weight, bias, eps)


def _modality_norm(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    mode: str,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: ``y`` the per-modality norm of ``x`` (its shape, contiguous), ``mean``/``rstd``
    the float32 row statistics the backward reuses (``(R,)``, R = rows of D; ``mean`` is ``(0,)`` for
    RMSNorm). ``ids`` has shape ``x.shape[:-1]`` or ``x.shape[:-2]`` (per head); checked per ``mode``."""
    check_ids_values(ids, weight.shape[0], "modality_ids", mode)
    name = _select(x, backend)
    if name == "torch":
        _, mean, rstd = _stats(x.reshape(-1, x.shape[-1]), eps, is_rms)
        return _norm_torch(x, ids, weight, bias, eps, is_rms).contiguous(), mean, rstd
    if name == "cpu":
        x3, flat_ids = _rows(x, ids)
        y, mean, rstd = group_norm_fwd_cpu(
            x3.reshape(-1, x.shape[-1]), weight, bias, eps, is_rms, ids=flat_ids.to(torch.int64), heads=x3.shape[1]
        )
        return y.view(x.shape), mean, rstd
    from sparsemm_kernels.kernels.triton.norms import modality_norm_fwd

    x3, flat_ids = _rows(x, ids)
    bias = bias.contiguous() if bias is not None else None
    y, mean, rstd = modality_norm_fwd(x3, flat_ids, weight.contiguous(), bias, eps, is_rms=is_rms)
    return y.view(x.shape), (mean if mean is not None else rstd.new_empty(0)), rstd


def _modality_norm_fake(x, ids, weight, bias, eps, is_rms, mode, backend):
    R = x.numel() // x.shape[-1]
    stats = x.new_empty(R, dtype=_stats_dtype(x))
    return x.new_empty(x.shape), (x.new_empty(0, dtype=stats.dtype) if is_rms else stats), stats.clone()


def _modality_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    is_rms: bool,
    has_bias: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, db)`` of :func:`modality_norm_op`; a gradient not asked for is an empty ``(0,)`` tensor."""
    name = _select(x, backend)
    if name == "torch":
        ids = ids.clamp(0, weight.shape[0] - 1)
        dx, dw, db = modality_norm_bwd_ref(dy, x, ids, weight, eps, is_rms)
    elif name == "cpu":
        x3, flat_ids = _rows(x, ids)
        D = x.shape[-1]
        dx, dw, db = group_norm_bwd_cpu(
            dy.reshape(-1, D), x3.reshape(-1, D), weight, mean, rstd, is_rms, ids=flat_ids.to(torch.int64),
            heads=x3.shape[1], need_dx=need_dx, need_dw=need_dw, need_db=need_db and has_bias,
        )
    else:
        from sparsemm_kernels.kernels.triton.norms import modality_norm_bwd

        x3, flat_ids = _rows(x, ids)
        dx, dw, db = modality_norm_bwd(
            dy.reshape(x3.shape), x3, flat_ids, weight.contiguous(), mean if not is_rms else None, rstd,
            is_rms=is_rms, compute_dx=need_dx, compute_dw=need_dw, compute_db=need_db and has_bias,
        )
    # A gradient not asked for is a fresh empty tensor (outputs of a custom op must not alias each other).
    return (
        dx.reshape(x.shape).contiguous() if need_dx else x.new_empty(0),
        dw if need_dw else x.new_empty(0),
        db if (need_db and has_bias) else x.new_empty(0),
    )


def _grads_fake(x, weight, need_dx: bool, need_dw: bool, need_db: bool):
    """The ``(dx, dW, db)`` of a norm backward op as fakes: full shapes where asked for, ``(0,)`` elsewhere."""
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else x.new_empty(0),
        weight.new_empty(weight.shape) if need_db else x.new_empty(0),
    )


def _modality_norm_bwd_fake(dy, x, ids, weight, mean, rstd, eps, is_rms, has_bias, need_dx, need_dw, need_db, backend):
    return _grads_fake(x, weight, need_dx, need_dw, need_db and has_bias)


def _norm_setup(ctx, inputs, output):
    x, ids, weight, bias, eps, is_rms, mode, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, ids, weight, mean, rstd)
    ctx.eps, ctx.is_rms, ctx.has_bias, ctx.backend = eps, is_rms, bias is not None, backend


def _norm_backward(ctx, dy, _dmean, _drstd):
    x, ids, weight, mean, rstd = ctx.saved_tensors
    need_dx, _, need_dw, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.has_bias
    dx, dw, db = modality_norm_bwd_op(
        dy, x, ids, weight, mean, rstd, ctx.eps, ctx.is_rms, ctx.has_bias, need_dx, need_dw, need_db, ctx.backend
    )
    return (dx if need_dx else None), None, (dw if need_dw else None), (db if need_db else None), None, None, None, None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward through modality_rms_norm / modality_layer_norm (MoTRMSNorm, MoTLayerNorm) is not "
        "supported: their backward is a fused kernel without a derivative of its own"
    )


def _bwd_setup(ctx, inputs, output):
    pass


modality_norm_op = Op("sparsemm::modality_norm", _modality_norm, _modality_norm_fake, _norm_setup, _norm_backward)
modality_norm_bwd_op = Op(
    "sparsemm::modality_norm_bwd", _modality_norm_bwd, _modality_norm_bwd_fake, _bwd_setup, _refuse_double_backward
)


# ---- the same norms on rows already grouped (a plan's sorted stream): group g is rows offsets[g]:offsets[g+1] ----


def _group_of_rows(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(T,)`` group id of every sorted row, from the offsets on the device (no host read)."""
    rows = torch.arange(num_rows, device=offsets.device)
    return torch.searchsorted(offsets[1:].contiguous(), rows, right=True).clamp_(max=offsets.shape[0] - 2)


def _read_offsets(offsets: torch.Tensor, num_rows: int, mode: str) -> torch.Tensor:
    """Offsets as the kernels read them: sanitized when unchecked (clamped into [0, T], made non-decreasing, on
    the device), as the torch path and :func:`~sparsemm_kernels.grouped_mm` read them."""
    return sanitized_offsets(offsets, num_rows) if mode == OFF else offsets


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Row statistics are float32 (float64 for float64 input, so a float64 run stays exact)."""
    return accumulation_dtype(x.dtype)


def _stats(x: torch.Tensor, eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x in the statistics dtype, mean (R,) or (0,) for RMSNorm, rstd (R,))``, in one pass over ``x``."""
    xf = x.to(_stats_dtype(x))
    if is_rms:
        ms = torch.linalg.vector_norm(xf, dim=-1).square_().div_(x.shape[-1])
        mean = xf.new_empty(0)
    else:
        ms, mean = torch.var_mean(xf, dim=-1, correction=0)
    return xf, mean, torch.rsqrt(ms + eps)


def _grouped_norm_torch(x, weight, bias, offsets, eps: float, is_rms: bool, mode: str):
    """ATen: one fused unweighted norm over all rows, then each group's slice scaled by its weights (no
    ``weight[ids]`` tensor). Returns ``(y, mean, rstd)`` like the kernels."""
    bounds = _read_offsets(offsets, x.shape[0], mode).tolist()  # sync-ok: host backend
    D = x.shape[-1]
    xf, mean, rstd = _stats(x, eps, is_rms)
    x_hat = F.rms_norm(xf, (D,), None, eps) if is_rms else F.layer_norm(xf, (D,), None, None, eps)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as the fake says
    for g in range(weight.shape[0]):
        s, e = bounds[g], bounds[g + 1]
        if e > s:
            if bias is not None:
                torch.addcmul(bias[g], x_hat[s:e], weight[g], out=y[s:e])
            else:
                torch.mul(x_hat[s:e], weight[g], out=y[s:e])
    return y, mean, rstd


def _grouped_norm_bwd_torch(dy, x, weight, offsets, mean, rstd, need_dx, need_dw, need_db, mode):
    bounds = _read_offsets(offsets, x.shape[0], mode).tolist()  # sync-ok: host backend
    xf = x.to(_stats_dtype(x))
    r = rstd.to(xf.dtype)[:, None]
    x_hat = (xf if mean.numel() == 0 else xf - mean.to(xf.dtype)[:, None]) * r
    d = dy.to(x_hat.dtype)
    M, D = weight.shape
    dw = torch.zeros(M, D, dtype=x_hat.dtype, device=x.device) if need_dw else None
    db = torch.zeros(M, D, dtype=x_hat.dtype, device=x.device) if need_db else None
    g_ = torch.empty_like(d) if need_dx else None
    prod = d * x_hat if need_dw else None
    for g in range(M):
        s, e = bounds[g], bounds[g + 1]
        if e > s:
            if need_dw:
                torch.sum(prod[s:e], 0, out=dw[g])
            if need_db:
                torch.sum(d[s:e], 0, out=db[g])
            if need_dx:
                torch.mul(d[s:e], weight[g], out=g_[s:e])
    dx = None
    if need_dx:
        dx = g_ - x_hat * (g_ * x_hat).mean(-1, keepdim=True)
        if mean.numel():
            dx = dx - g_.mean(-1, keepdim=True)
        dx = (dx * r).to(x.dtype)
    return dx, (dw.to(weight.dtype) if need_dw else None), (db.to(weight.dtype) if need_db else None)


def _grouped_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    offsets: torch.Tensor,
    eps: float,
    is_rms: bool,
    mode: str,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)`` of the per-group norm of ``x (T, D)``, rows of group ``g`` at
    ``offsets[g]:offsets[g+1]`` scaled by ``weight[g]`` (``+ bias[g]``), plus ``residual`` (``x``'s shape) when
    given; statistics as in :func:`modality_norm_op`."""
    y, mean, rstd = _grouped_norm_rows(x, weight, bias, offsets, eps, is_rms, mode, backend)
    if residual is not None:  # into the op's own fresh output: a post-norm block's residual add, no new buffer
        y.add_(residual)
    return y, mean, rstd


def _grouped_norm_rows(x, weight, bias, offsets, eps, is_rms, mode, backend):
    check_offsets_values(offsets, x.shape[0], "offsets", mode)
    name = _select(x, backend)
    if name == "torch":
        return _grouped_norm_torch(x, weight, bias, offsets, eps, is_rms, mode)
    if name == "cpu":
        return group_norm_fwd_cpu(x, weight, bias, eps, is_rms, offsets=_read_offsets(offsets, x.shape[0], mode))
    from sparsemm_kernels.kernels.triton.norms import modality_norm_fwd

    ids = _group_of_rows(_read_offsets(offsets, x.shape[0], mode), x.shape[0])
    bias = bias.contiguous() if bias is not None else None
    y, mean, rstd = modality_norm_fwd(x.unsqueeze(1), ids, weight.contiguous(), bias, eps, is_rms=is_rms)
    return y.view(x.shape), (mean if mean is not None else rstd.new_empty(0)), rstd


def _grouped_norm_fake(x, weight, bias, residual, offsets, eps, is_rms, mode, backend):
    stats = x.new_empty(x.shape[0], dtype=_stats_dtype(x))
    return x.new_empty(x.shape), (x.new_empty(0, dtype=stats.dtype) if is_rms else stats), stats.clone()


def _grouped_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    is_rms: bool,
    has_bias: bool,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    mode: str,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, db)`` of :func:`grouped_norm_op`; a gradient not asked for is an empty ``(0,)`` tensor."""
    need_db = need_db and has_bias
    name = _select(x, backend)
    if name == "torch":
        dx, dw, db = _grouped_norm_bwd_torch(dy, x, weight, offsets, mean, rstd, need_dx, need_dw, need_db, mode)
    elif name == "cpu":
        dx, dw, db = group_norm_bwd_cpu(
            dy, x, weight, mean, rstd, is_rms, offsets=_read_offsets(offsets, x.shape[0], mode), need_dx=need_dx,
            need_dw=need_dw, need_db=need_db,
        )
    else:
        from sparsemm_kernels.kernels.triton.norms import modality_norm_bwd

        ids = _group_of_rows(_read_offsets(offsets, x.shape[0], mode), x.shape[0])
        dx, dw, db = modality_norm_bwd(
            dy.reshape(x.shape[0], 1, x.shape[1]), x.unsqueeze(1), ids, weight.contiguous(),
            mean if not is_rms else None, rstd, is_rms=is_rms, compute_dx=need_dx, compute_dw=need_dw,
            compute_db=need_db,
        )
    return (
        dx.reshape(x.shape).contiguous() if need_dx else x.new_empty(0),
        dw if need_dw else x.new_empty(0),
        db if need_db else x.new_empty(0),
    )


def _grouped_norm_bwd_fake(
    dy, x, weight, offsets, mean, rstd, eps, is_rms, has_bias, need_dx, need_dw, need_db, mode, backend
):
    return _grads_fake(x, weight, need_dx, need_dw, need_db and has_bias)


def _grouped_setup(ctx, inputs, output):
    x, weight, bias, residual, offsets, eps, is_rms, mode, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, offsets, mean, rstd)
    ctx.eps, ctx.is_rms, ctx.has_bias, ctx.backend = eps, is_rms, bias is not None, backend
    ctx.mode = OFF if mode == OFF else TRUSTED


def _grouped_backward(ctx, dy, _dmean, _drstd):
    x, weight, offsets, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.has_bias
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        dx, dw, db = grouped_norm_bwd_op(
            dy, x, weight, offsets, mean, rstd, ctx.eps, ctx.is_rms, ctx.has_bias, need_dx, need_dw, need_db,
            ctx.mode, ctx.backend,
        )
    return ((dx if need_dx else None), (dw if need_dw else None), (db if need_db else None),
            (dy if need_dr else None), None, None, None, None, None)


grouped_norm_op = Op("sparsemm::grouped_norm", _grouped_norm, _grouped_norm_fake, _grouped_setup, _grouped_backward)
grouped_norm_bwd_op = Op(
    "sparsemm::grouped_norm_bwd", _grouped_norm_bwd, _grouped_norm_bwd_fake, _bwd_setup, _refuse_double_backward
)


def check_eps(eps) -> float:
    """``eps`` as a float: a positive finite number (``TypeError``/``ValueError`` naming ``eps`` otherwise)."""
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
    if p.shape[0] == 0 and x.numel():  # no weights to scale the rows with (a kernel would read before `weight`)
        raise ValueError(f"`{name}` has no rows (M = 0) but `x` has rows to normalise")


def _check_operands(x, modality_ids, weight, bias, eps) -> float:
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
    return check_eps(eps)


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
    return _modality_norm_call(x, modality_ids, weight, None, eps, True, backend, validate)


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
    return _modality_norm_call(x, modality_ids, weight, bias, eps, False, backend, validate)


def _modality_norm_call(x, modality_ids, weight, bias, eps, is_rms: bool, backend, validate) -> torch.Tensor:
    # Under autocast a norm runs in float32, as torch's own layer_norm does.
    x, weight, bias = autocast_to(x, weight, bias, policy="fp32")
    eps = _check_operands(x, modality_ids, weight, bias, eps)
    backend = _resolve(x, check_backend_name(backend))
    mode = validation_mode(validate, modality_ids.device)
    y, _, _ = modality_norm_op(x, modality_ids, weight, bias, eps, is_rms, mode, backend)
    return y


def _grouped_norm_call(
    x, weight, bias, offsets, eps, is_rms: bool, backend, validate, trusted=False, residual=None
) -> torch.Tensor:
    x, weight, bias, residual = autocast_to(x, weight, bias, residual, policy="fp32")
    check_float_tensor(x, "x")
    check_dim(x, 2, "x", "(T, D), rows grouped by `offsets`")
    if x.shape[-1] == 0:
        raise ValueError(f"`x` must have D >= 1, got shape {tuple(x.shape)}")
    _check_param(weight, "weight", x, None)
    if bias is not None:
        _check_param(bias, "bias", x, weight.shape[0])
    if residual is not None:
        check_float_tensor(residual, "residual")
        check_same_device("x", x, "residual", residual)
        check_same_dtype("x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"`residual` must have the shape of `x` {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_offsets_tensor(offsets, weight.shape[0], x)
    eps = check_eps(eps)
    backend = _resolve(x, check_backend_name(backend))
    mode = TRUSTED if trusted else validation_mode(validate, x.device)
    offsets = offsets.to(torch.int64).contiguous()
    y, _, _ = grouped_norm_op(x, weight, bias, residual, offsets, eps, is_rms, mode, backend)
    return y


def plan_norm(x, weight, bias, plan, eps, is_rms: bool, backend, residual=None) -> torch.Tensor:
    """:func:`grouped_rms_norm` (``is_rms``) / :func:`grouped_layer_norm` over ``plan.offsets``, for layers that
    hold a plan: one built by ``group_plan`` (``plan.trusted``) has valid offsets and is not re-checked."""
    return _grouped_norm_call(x, weight, bias, plan.offsets, eps, is_rms, backend, None, trusted=plan.trusted,
                              residual=residual)


def grouped_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Per-group RMSNorm of rows already grouped (a plan's sorted stream), the norm beside :func:`grouped_mm`:
    rows ``offsets[g]:offsets[g+1]`` of ``x (T, D)`` get ``x / sqrt(mean_d(x^2) + eps) * weight[g]``.
    With ``residual`` (``x``'s shape, dtype and device) the result is ``residual + norm(x)``, added in the op's
    own output buffer (a post-norm block's residual add without a second activation-sized buffer); its gradient
    is the output's.

    On the ``cpu`` backend (the CPU default for float32/float64) one C++ pass per row, forward and backward; on the
    ``torch`` backend one fused unweighted norm covers all rows, then each group's slice is scaled by its weights
    (no ``weight[ids]`` tensor); the weight gradient is a per-slice sum.
    ``offsets`` as in :func:`grouped_mm` (``validate`` likewise); ``weight (G, D)``. Returns ``x.shape`` in
    ``x``'s dtype (float32 under autocast); differentiable in ``x`` and ``weight`` (first derivatives).
    """
    return _grouped_norm_call(x, weight, None, offsets, eps, True, backend, validate, residual=residual)


def grouped_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Per-group LayerNorm of rows already grouped: ``(x - mean) / sqrt(var + eps) * weight[g] + bias[g]`` for
    the rows ``offsets[g]:offsets[g+1]`` (biased variance). As :func:`grouped_rms_norm` (``residual`` too);
    ``bias (G, D)`` or None.
    """
    return _grouped_norm_call(x, weight, bias, offsets, eps, False, backend, validate, residual=residual)
