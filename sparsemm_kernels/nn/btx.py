"""Branch-Train-MiX: merge dense models trained apart into one token-choice MoE.

Every layer's FFN becomes a :class:`~sparsemm_kernels.nn.TokenChoiceMoE` whose expert ``j`` is model ``j``'s FFN
of that layer; every other parameter (attention, norms, embedding, LM head) is the element-wise mean of the
models'; the routers are new. The block class is not copied: a :class:`~sparsemm_kernels.nn.MoTBlock` takes any
FFN module that has the ``forward_sorted`` entry point.
"""

from __future__ import annotations

import copy

import torch

from sparsemm_kernels.nn.mot import MoTTransformer
from sparsemm_kernels.nn.token_choice import TokenChoiceMoE


def _architecture(model: MoTTransformer) -> list:
    """What must match for two models to merge: parameter names and shapes, and each block's settings."""
    params = [(name, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]
    blocks = [(b.norm, b.norm_placement, b.attn.n_heads, b.attn.n_kv_heads, b.attn.head_dim, b.attn.rope_theta,
               b.attn.q_norm is not None, b.attn_norm.eps) for b in model.layers]
    return [params, blocks]


def btx_merge(dense_models, top_k: int = 2, lb_coef: float = 0.01) -> MoTTransformer:
    """Merge ``N >= 1`` dense :class:`~sparsemm_kernels.nn.MoTTransformer` models (``num_modalities=1``) of one
    architecture into a token-choice MoE model.

    Returns a new model with the same forward signature: layer ``i``'s ``ffn`` is a :class:`TokenChoiceMoE` with
    ``N`` experts (expert ``j`` = model ``j``'s layer-``i`` FFN, ``top_k`` clamped to ``N``, ``lb_coef``), every other
    parameter the mean of the ``N`` models', routers freshly initialised (``nn.Linear``'s init). After a training
    forward, ``sum(layer.ffn.aux_loss for layer in model.layers)`` is the load-balancing loss. ``ValueError`` naming
    ``dense_models`` for an empty list, a model that is not dense or not a ``MoTTransformer``, or models that differ
    (parameter names, shapes, dtypes or block settings).
    """
    models = list(dense_models) if isinstance(dense_models, (list, tuple)) else None
    if not models:
        raise ValueError("`dense_models` must be a non-empty list of dense MoTTransformer models")
    for j, m in enumerate(models):
        if not isinstance(m, MoTTransformer) or m.num_modalities != 1:
            raise ValueError(f"`dense_models`[{j}] must be a dense MoTTransformer (num_modalities=1), got "
                             f"{type(m).__name__}" + (f" with {m.num_modalities} modalities"
                                                      if isinstance(m, MoTTransformer) else ""))
        if any(not isinstance(layer.ffn, type(models[0].layers[0].ffn)) for layer in m.layers):
            raise ValueError(f"`dense_models`[{j}] has a layer whose FFN is not a dense MoTFeedForward")
    reference = _architecture(models[0])
    for j, m in enumerate(models[1:], start=1):
        if _architecture(m) != reference:
            raise ValueError(f"`dense_models`[{j}] differs from `dense_models`[0] in architecture (parameter names, "
                             "shapes, dtypes or block settings): only models of one architecture merge")
    N = len(models)
    merged = copy.deepcopy(models[0])
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if ".ffn." not in name:
                p.copy_(torch.stack([ps[name].to(p.device) for ps in params]).mean(0))  # models may sit on other GPUs
        for i, layer in enumerate(merged.layers):
            dense_ffn = layer.ffn
            w = dense_ffn.w1
            moe = TokenChoiceMoE(dense_ffn.dim, dense_ffn.hidden_dim, N, top_k=min(top_k, N), lb_coef=lb_coef,
                                 device=w.device, dtype=w.dtype, backend=dense_ffn.backend)
            for name in ("w1", "w3", "w2"):  # expert j = model j's FFN of this layer ([1, ...] -> row j)
                rows = [getattr(m.layers[i].ffn, name).to(w.device) for m in models]
                getattr(moe, name).copy_(torch.cat(rows, dim=0))
            layer.ffn = moe
    return merged
