"""MoMa and expert-choice MoE language models: dense shared attention, modality-aware experts in every FFN.

``MoMaBlock`` = the dense block of :class:`~sparsemm_kernels.nn.DenseBlock` (attention, norms) with its FFN
replaced by :class:`~sparsemm_kernels.nn.MoMaFeedForward`; ``MoMaTransformer`` stacks them with a shared
embedding and LM head and builds the modality plan **once** per forward for every layer. One group of experts
(``experts_per_modality=(8,)``) is the expert-choice MoE of MoMa Table 2 ("MoE-8x"): no modality ids needed.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsemm_kernels.nn.mod import MixtureOfDepths
from sparsemm_kernels.nn.moe import MoMaFeedForward
from sparsemm_kernels.nn.mot import _NORMS, _PLACEMENTS, MoTAttention, _resolve_plan
from sparsemm_kernels.utils.checks import check_float_tensor, check_int_tensor, check_positive_int


def _block(layer: nn.Module) -> MoMaBlock:
    return layer.block if isinstance(layer, MixtureOfDepths) else layer


class MoMaBlock(nn.Module):
    """Dense attention and norms around a :class:`MoMaFeedForward`.

    ``post``: ``h = x + norm(attn(x)); out = h + norm(moma(h))`` (the MoT/Chameleon layout); ``pre``:
    ``h = x + attn(norm(x)); out = h + moma(norm(h))``. Arguments as :class:`~sparsemm_kernels.nn.MoTBlock`
    (one modality for attention and norms) plus the :class:`MoMaFeedForward` ones.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        hidden_dim: int,
        experts_per_modality=(4, 4),
        capacity_factor: float = 1.0,
        gate: str = "sigmoid",
        aux_router: bool = False,
        norm: str = "rms",
        norm_placement: str = "post",
        qk_norm: bool = False,
        n_kv_heads: int | None = None,
        norm_eps: float = 1e-5,
        rope_theta: float | None = 10000.0,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"`norm` must be one of {sorted(_NORMS)}, got {norm!r}")
        if norm_placement not in _PLACEMENTS:
            raise ValueError(f"`norm_placement` must be one of {_PLACEMENTS}, got {norm_placement!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.norm_placement = dim, norm_placement
        self.attn = MoTAttention(dim, n_heads, 1, n_kv_heads=n_kv_heads, qk_norm=qk_norm, norm_eps=norm_eps,
                                 rope_theta=rope_theta, backend=backend, **factory)
        self.attn_norm = _NORMS[norm](dim, 1, norm_eps, backend=backend, **factory)
        self.ffn_norm = _NORMS[norm](dim, 1, norm_eps, backend=backend, **factory)
        self.ffn = MoMaFeedForward(dim, hidden_dim, experts_per_modality, capacity_factor, gate, aux_router,
                                   backend=backend, **factory)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None, plan=None, token_mask=None,
                **attention_kwargs):
        """x: ``(B, S, dim)``; modality_ids: ``(B, S)`` (None with one group of experts); plan: a reusable
        ``group_plan`` of the ids; token_mask: ``(B, S)`` bool, tokens the experts may not choose (padding, as
        :class:`~sparsemm_kernels.nn.MixtureOfDepths` passes); ``attention_kwargs`` as
        :meth:`MoTAttention.forward`. Returns ``(B, S, dim)``."""
        check_float_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must be (B, S, {self.dim}), got shape {tuple(x.shape)}")
        if modality_ids is None:
            if self.ffn.num_modalities > 1:
                raise ValueError("`modality_ids` are required with several groups of experts")
            modality_ids = torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)

        def attn(t):
            return self.attn(t, None, **attention_kwargs)

        if self.norm_placement == "post":
            h = x + self.attn_norm(attn(x))
            return h + self.ffn_norm(self.ffn(h, modality_ids, plan, token_mask))
        h = x + attn(self.attn_norm(x))
        return h + self.ffn(self.ffn_norm(h), modality_ids, plan, token_mask)


class MoMaTransformer(nn.Module):
    """A MoMa (or, with one group, expert-choice MoE) language model: shared embedding and LM head, a stack of
    :class:`MoMaBlock`, a dense final norm. The modality plan is built once per forward and handed to every
    layer. ``aux_loss``: the sum of the layers' auxiliary-router losses of the last training forward (None
    without ``aux_router``).

    ``mod_capacity`` (a float in (0, 1], default None: no MoD) makes it MoMa + Mixture-of-Depths as in the MoMa
    paper: every ``mod_every``-th layer from layer 0 is a :class:`~sparsemm_kernels.nn.MixtureOfDepths` around its
    block, batch-level, before the modality split (the block builds the plan of the tokens it gets).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        hidden_dim: int,
        experts_per_modality=(4, 4),
        capacity_factor: float = 1.0,
        gate: str = "sigmoid",
        aux_router: bool = False,
        n_kv_heads: int | None = None,
        norm: str = "rms",
        norm_placement: str = "post",
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope_theta: float | None = 10000.0,
        device=None,
        dtype=None,
        *,
        mod_capacity: float | None = None,
        mod_every: int = 2,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(n_layers, "n_layers")
        check_positive_int(mod_every, "mod_every")
        if mod_capacity is not None and not isinstance(mod_capacity, float):
            raise TypeError(f"`mod_capacity` must be a float in (0, 1] or None, got {type(mod_capacity).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.backend = backend
        self.embed = nn.Embedding(vocab_size, dim, **factory)
        layers = []
        for i in range(n_layers):
            block = MoMaBlock(dim, n_heads, hidden_dim, experts_per_modality, capacity_factor, gate, aux_router, norm,
                              norm_placement, qk_norm, n_kv_heads, norm_eps, rope_theta, backend=backend, **factory)
            if mod_capacity is not None and i % mod_every == 0:
                block = MixtureOfDepths(block, dim, mod_capacity, batch_level=True, backend=backend, **factory)
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        self.num_modalities = _block(self.layers[0]).ffn.num_modalities
        self.norm = _NORMS[norm](dim, 1, norm_eps, backend=backend, **factory)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False, **factory)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The sum over layers of the auxiliary-router losses of the last training forward (None when no layer
        has one)."""
        losses = [_block(layer).ffn.aux_loss for layer in self.layers if _block(layer).ffn.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def forward(self, tokens: torch.Tensor, modality_ids: torch.Tensor | None = None, **attention_kwargs):
        """tokens, modality_ids: ``(B, S)`` ints (ids optional with one group). Returns logits
        ``(B, S, vocab_size)``."""
        check_int_tensor(tokens, "tokens")
        if tokens.dim() != 2:
            raise ValueError(f"`tokens` must be (B, S), got shape {tuple(tokens.shape)}")
        plan = None
        if self.num_modalities > 1:
            if modality_ids is None or tuple(modality_ids.shape) != tuple(tokens.shape):
                got = None if modality_ids is None else tuple(modality_ids.shape)
                raise ValueError(f"`modality_ids` must have the shape of `tokens` {tuple(tokens.shape)}, got {got}")
            # checked once here; the layers see the plan's own ids and do not check them again
            plan, modality_ids = _resolve_plan(modality_ids, self.num_modalities, None, self.backend)
        h = self.embed(tokens)
        for layer in self.layers:
            if isinstance(layer, MixtureOfDepths):  # its block sees a subset of the tokens: it plans them itself
                h = layer(h, modality_ids, **attention_kwargs)
            else:
                h = layer(h, modality_ids, plan, **attention_kwargs)
        return self.lm_head(self.norm(h))
