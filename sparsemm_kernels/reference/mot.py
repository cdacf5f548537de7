"""Reference Mixture-of-Transformers block, written the way the published MoT code is: boolean masks and a
loop over modalities (``x[ids == m]`` ... ``out[ids == m] = y``).

It reads the parameters of a :class:`sparsemm_kernels.nn.MoTBlock`, runs in any dtype (tests use float64) and
is differentiable. It is the tests' oracle and the "reference-style" baseline of the benchmarks; it syncs
with the host at every mask, which is exactly the cost the package removes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_modality(fn, x: torch.Tensor, ids: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """``out[ids == m] = fn(m, x[ids == m])`` for every modality ``m`` (``ids`` indexes x's leading dims)."""
    out = None
    for m in range(num_modalities):
        mask = ids == m
        y = fn(m, x[mask])
        if out is None:
            out = y.new_zeros(*ids.shape, *y.shape[1:])  # y's dtype: autocast may have changed it
        out = out.index_put((mask,), y)
    return out


def _norm(norm_module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    w, eps = norm_module.weight, norm_module.eps
    bias = getattr(norm_module, "bias", None)
    if norm_module.__class__.__name__ == "MoTLayerNorm":
        return per_modality(lambda m, xm: F.layer_norm(xm, xm.shape[-1:], w[m], None if bias is None else bias[m], eps),
                            x, ids, w.shape[0])
    return per_modality(lambda m, xm: F.rms_norm(xm, xm.shape[-1:], w[m], eps), x, ids, w.shape[0])


def _linear(w: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return per_modality(lambda m, xm: xm @ w[m].t(), x, ids, w.shape[0])


def _rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    cos, sin = ang.cos().to(x.dtype)[..., None, :], ang.sin().to(x.dtype)[..., None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _allowed(B: int, S: int, device, is_causal: bool, span_ids, attn_mask):
    """Boolean ``(B, 1, S, S)`` mask (True = may attend) and an additive float mask, or None."""
    allowed = torch.ones(B, 1, S, S, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= torch.ones(S, S, dtype=torch.bool, device=device).tril()
    if span_ids is not None:
        for b in range(B):
            for i in range(S):
                if span_ids[b, i] > 0:
                    allowed[b, 0, i] |= span_ids[b] == span_ids[b, i]
    additive = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            additive = attn_mask
    return allowed, additive


def mot_attention_ref(attn, x, ids, attn_mask=None, is_causal=True, position_ids=None, span_ids=None,
                      math_attention=True):
    """The MoTAttention branch: per-modality projections (masks + loop), one global attention."""
    B, S, _ = x.shape
    H, Hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = _linear(attn.wq, x, ids).view(B, S, H, dh)
    k = _linear(attn.wk, x, ids).view(B, S, Hkv, dh)
    v = _linear(attn.wv, x, ids).view(B, S, Hkv, dh)
    if attn.q_norm is not None:
        q, k = _norm(attn.q_norm, q, ids), _norm(attn.k_norm, k, ids)
    if attn.rope_theta is not None:
        pos = torch.arange(S, device=x.device) if position_ids is None else position_ids
        pos = pos.expand(B, S)
        q, k = _rotary(q, pos, attn.rope_theta), _rotary(k, pos, attn.rope_theta)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    if math_attention:
        allowed, additive = _allowed(B, S, x.device, is_causal, span_ids, attn_mask)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if additive is not None:
            scores = scores + additive
        o = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
    o = o.transpose(1, 2).reshape(B, S, H * dh)
    return _linear(attn.wo, o, ids)


def mot_feed_forward_ref(ffn, x, ids):
    """Per-modality SwiGLU with masks and a loop."""
    return per_modality(
        lambda m, xm: (F.silu(xm @ ffn.w1[m].t()) * (xm @ ffn.w3[m].t())) @ ffn.w2[m].t(), x, ids, ffn.w1.shape[0]
    )


def mot_block_ref(block, x, ids, math_attention=True, **attention_kwargs):
    """A :class:`~sparsemm_kernels.nn.MoTBlock` forward in the published-code style (post or pre norm)."""
    if ids is None:
        ids = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)

    def attn(h):
        return mot_attention_ref(block.attn, h, ids, math_attention=math_attention, **attention_kwargs)

    if block.norm_placement == "post":
        h = x + _norm(block.attn_norm, attn(x), ids)
        return h + _norm(block.ffn_norm, mot_feed_forward_ref(block.ffn, h, ids), ids)
    h = x + attn(_norm(block.attn_norm, x, ids))
    return h + mot_feed_forward_ref(block.ffn, _norm(block.ffn_norm, h, ids), ids)
