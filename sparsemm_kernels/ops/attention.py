"""Attention helpers for the MoT layers: rotary embeddings and the mask variants (causal, user, hybrid).

Attention itself is one global ``F.scaled_dot_product_attention`` over the mixed-modality sequence (flash on
GPU when the mask is plain causal); only the projections around it are modality-specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsemm_kernels.utils.checks import accumulation_dtype, check_int_tensor


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(B, S, 1, head_dim)`` for positions ``(B, S)`` (Llama-style, half-split)."""
    # float32 angles (float64 for float64 models, so a float64 run is exact to float64)
    angle_dtype = accumulation_dtype(dtype)
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=angle_dtype) / head_dim
    inv_freq = 1.0 / theta**exponents
    freqs = position_ids.to(angle_dtype)[..., None] * inv_freq  # (B, S, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, S, H, d)`` by the position angles: ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def check_position_ids(position_ids, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``position_ids`` of shape ``(S,)``, ``(1, S)`` or ``(B, S)`` (integers, on ``device``) as ``(B, S)``."""
    check_int_tensor(position_ids, "position_ids")
    if position_ids.device != device:
        raise ValueError(f"`position_ids` is on {position_ids.device} but `x` is on {device}")
    shape = tuple(position_ids.shape)
    if shape not in ((seq,), (1, seq), (batch, seq)):
        raise ValueError(f"`position_ids` must have shape (S,), (1, S) or (B, S) with B={batch}, S={seq}, got {shape}")
    return position_ids.expand(batch, seq)


def hybrid_mask(span_ids: torch.Tensor) -> torch.Tensor:
    """Transfusion mask ``(B, 1, S, S)`` bool: causal, plus bidirectional inside each image span.

    ``span_ids (B, S)``: 0 for a token outside any span (text), and the same positive id for all tokens of
    one image span. Token ``i`` may attend to ``j`` iff ``j <= i`` or both lie in the same span.
    """
    S = span_ids.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=span_ids.device).tril()
    same_span = (span_ids[:, :, None] == span_ids[:, None, :]) & (span_ids[:, :, None] > 0)
    return (causal[None] | same_span)[:, None]


def attention_mask(
    batch: int,
    seq: int,
    device: torch.device,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    span_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, bool]:
    """Combine the mask options into what SDPA takes: ``(mask or None, is_causal)``.

    A plain causal mask stays ``is_causal=True`` (the flash path); anything else becomes an explicit
    boolean mask (True = may attend) or the user's additive float mask, broadcastable to ``(B, H, S, S)``.
    """
    if span_ids is not None:
        check_int_tensor(span_ids, "span_ids")
        if tuple(span_ids.shape) != (batch, seq):
            raise ValueError(f"`span_ids` must have shape (B, S) = {(batch, seq)}, got {tuple(span_ids.shape)}")
        if not is_causal:
            raise ValueError("`span_ids` (the hybrid mask) extends a causal mask: pass is_causal=True")
        mask = hybrid_mask(span_ids)
    elif attn_mask is None:
        return None, is_causal
    elif is_causal:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    else:
        mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"`attn_mask` must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.shape[-2:] != (seq, seq):
            raise ValueError(f"`attn_mask` must end in (S, S) = {(seq, seq)}, got {tuple(attn_mask.shape)}")
        if mask is None:
            return attn_mask, False
        if attn_mask.dtype == torch.bool:
            mask = mask & attn_mask
        else:  # additive float mask: keep it, and add -inf where the causal/hybrid part forbids
            mask = attn_mask.masked_fill(~mask, float("-inf"))
    return mask, False


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` for ``q (B, H, S, d)``, ``k, v (B, H_kv, S, d)`` (grouped-query
    when ``H_kv < H``)."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
