"""Reference per-modality RMSNorm / LayerNorm: each token's row (or each of its heads) uses ``weight[m]``."""

from __future__ import annotations

import torch


def _gathered(param: torch.Tensor, x: torch.Tensor, modality_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``param[ids]`` shaped to broadcast against ``x``: ``(..., D)``, or ``(..., 1, D)`` for per-head ids.

    Cast before the gather, so the gather's backward (a sum over every row of a modality) runs in ``dtype``
    rather than in bf16/fp16.
    """
    rows = param.to(dtype)[modality_ids]
    return rows.unsqueeze(-2) if modality_ids.dim() == x.dim() - 2 else rows


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def modality_rms_norm_ref(
    x: torch.Tensor, modality_ids: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """``y = x / sqrt(mean_d(x^2) + eps) * weight[m]`` over the last dim of ``x``.

    ``x (..., D)`` with ``modality_ids`` of shape ``x.shape[:-1]`` (one modality per row), or ``x (..., H, D)``
    with ``modality_ids`` of shape ``x.shape[:-2]`` (every head of a token uses its modality); ``weight (M, D)``.
    Statistics in float32 (float64 for float64 input); returns ``x``'s dtype.
    """
    dt = _stats_dtype(x)
    xf = x.to(dt)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd * _gathered(weight, x, modality_ids, dt)).to(x.dtype)


def modality_layer_norm_ref(
    x: torch.Tensor,
    modality_ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``y = (x - mean_d(x)) / sqrt(var_d(x) + eps) * weight[m] + bias[m]`` (biased variance, as nn.LayerNorm).

    Shapes as :func:`modality_rms_norm_ref`; ``bias (M, D)`` or None.
    """
    dt = _stats_dtype(x)
    xf = x.to(dt)
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    y = xc * rstd * _gathered(weight, x, modality_ids, dt)
    if bias is not None:
        y = y + _gathered(bias, x, modality_ids, dt)
    return y.to(x.dtype)


def modality_norm_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    modality_ids: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`modality_rms_norm_ref` / :func:`modality_layer_norm_ref` by their closed form.

    With ``x_hat = (x - mu) * rstd`` (``mu = 0`` for RMSNorm) and ``g = W[m] * dy``:
    ``dx = rstd * (g - x_hat * mean_d(g * x_hat) [- mean_d(g)])``, ``dW[m] = sum_{rows of m} dy * x_hat``,
    ``db[m] = sum_{rows of m} dy``. Returns ``(dx, dW, db)``: ``dx`` in ``x``'s dtype, ``dW``/``db`` in
    ``weight``'s, accumulated in float32 (float64 for float64 input).
    """
    dt = _stats_dtype(x)
    xf, df = x.to(dt), dy.to(dt)
    xc = xf if is_rms else xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    x_hat = xc * rstd
    g = df * _gathered(weight, x, modality_ids, dt)
    dx = g - x_hat * (g * x_hat).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = (dx * rstd).to(x.dtype)
    # One id per row of D: per-head ids repeat over the H heads of their token.
    ids = modality_ids.reshape(-1)
    rows_per_id = x.numel() // x.shape[-1] // max(ids.numel(), 1)
    row_ids = ids.repeat_interleave(rows_per_id)
    D = x.shape[-1]
    dw = torch.zeros(weight.shape[0], D, dtype=dt, device=x.device)
    db = torch.zeros(weight.shape[0], D, dtype=dt, device=x.device)
    dw.index_add_(0, row_ids, (df * x_hat).reshape(-1, D))
    db.index_add_(0, row_ids, df.reshape(-1, D))
    return dx, dw.to(weight.dtype), db.to(weight.dtype)
