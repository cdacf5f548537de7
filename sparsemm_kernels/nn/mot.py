"""Mixture-of-Transformers layers: every non-embedding weight untied by modality, attention global.

Each token ``i`` of modality ``m_i`` uses ``W^{m_i}`` in every projection, norm and FFN; attention is one
softmax over the whole mixed sequence. All modality-specific matmuls of a layer share one
:class:`~sparsemm_kernels.plan.GroupPlan` (built once per forward by :class:`MoTTransformer`) and each is a
single grouped GEMM over all modalities. With ``num_modalities=1`` the same modules run plain dense ops
(``F.linear``, ``F.rms_norm``): that is the dense baseline, with the same parameter names.

The group-sorted stream: inside a block the rows are kept in the plan's group order, so the norms, the FFN
and the residual adds work on contiguous row blocks per modality (``grouped_mm``, ``grouped_rms_norm``:
per-group weights are slices, no ``weight[ids]``). Only attention needs token order: the Q/K/V GEMM reads
sorted rows and writes token order (scatter on store), the output projection reads token order and writes
sorted rows (gather on load), so no permutation pass remains. :class:`MoTTransformer` sorts once (it embeds
the tokens already sorted) and restores token order once before the LM head; every module also has a
``forward_sorted`` entry point for callers that keep the stream themselves (MoMa groups, MoD).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sparsemm_kernels.backend import prefer
from sparsemm_kernels.nn.mot_linear import init_per_modality_
from sparsemm_kernels.nn.norms import MoTLayerNorm, MoTRMSNorm
from sparsemm_kernels.ops.attention import apply_rotary, attention_mask, check_position_ids, rotary_cos_sin, sdpa
from sparsemm_kernels.ops.grouped_ffn import grouped_swiglu_ffn
from sparsemm_kernels.ops.grouped_linear import grouped_linear
from sparsemm_kernels.ops.grouped_linears import grouped_linears
from sparsemm_kernels.ops.permute import sort_rows, unsort_rows
from sparsemm_kernels.plan import GroupPlan, build_plan, check_sorted_rows, checked_ids
from sparsemm_kernels.utils.checks import check_float_tensor, check_int_tensor, check_positive_int

_NORMS = {"rms": MoTRMSNorm, "layer": MoTLayerNorm}
_PLACEMENTS = ("post", "pre")


def _modality_weight(num_modalities: int, out_features: int, in_features: int, factory: dict) -> nn.Parameter:
    return nn.Parameter(torch.empty(num_modalities, out_features, in_features, **factory))


def _check_tokens(x: torch.Tensor, modality_ids: torch.Tensor | None, num_modalities: int, dim: int) -> None:
    check_float_tensor(x, "x")
    if x.shape[-1] != dim:
        raise ValueError(f"`x` must have last dimension {dim}, got shape {tuple(x.shape)}")
    if modality_ids is None:
        if num_modalities > 1:
            raise ValueError(f"`modality_ids` is required with num_modalities={num_modalities}")
        return
    check_int_tensor(modality_ids, "modality_ids")
    if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"`modality_ids` must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(modality_ids.shape)}"
        )


def _resolve_plan(
    modality_ids, num_modalities: int, plan: GroupPlan | None, backend
) -> tuple[GroupPlan | None, torch.Tensor | None]:
    """The plan to route with (the caller's, or a new one; None for the dense one-modality path) and the ids
    the layer's norms may use without another check.

    Ids are range-checked once per forward: when the plan is built here, or when the caller's plan does not
    carry this very ``modality_ids`` tensor as its vetted ``group_ids``. Every kernel also clamps or bounds
    its indices, so even a wrong plan reads no stray memory.
    """
    if num_modalities == 1:
        return None, modality_ids
    if plan is None:
        plan = build_plan(
            modality_ids, num_modalities, backend=prefer(backend), validate=None, name="modality_ids"
        )
        return plan, modality_ids
    if not isinstance(plan, GroupPlan):
        raise TypeError(f"`plan` must be a GroupPlan, got {type(plan).__name__}")
    if plan.num_groups != num_modalities or plan.num_rows != modality_ids.numel():
        raise ValueError(
            f"`plan` routes {plan.num_rows} rows into {plan.num_groups} groups, but `modality_ids` has "
            f"{modality_ids.numel()} tokens and the layer {num_modalities} modalities"
        )
    if plan.group_ids is modality_ids:
        return plan, modality_ids
    ids = checked_ids(modality_ids, num_modalities, validate=None, name="modality_ids")
    # Record the vetted ids on the plan, so the sub-layers this plan is handed to do not check them again.
    return dataclasses.replace(plan, group_ids=ids), ids


def _only(weight: torch.Tensor) -> torch.Tensor:
    """The one modality's weights: a view whose backward is a view too (``weight[0]`` would allocate and zero a
    full-size gradient in every backward)."""
    return weight.squeeze(0)


def _sorted_input(x: torch.Tensor, plan: GroupPlan | None, num_modalities: int, dim: int) -> None:
    """Checks for a ``forward_sorted`` entry point: ``x (T, dim)`` rows in the order of ``plan``."""
    if num_modalities == 1:
        check_float_tensor(x, "x")
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"`x` must be (T, {dim}) rows, got shape {tuple(x.shape)}")
        return
    check_sorted_rows(x, plan, num_modalities, dim, "layer")


def _token_ids(plan: GroupPlan | None, modality_ids, batch_shape) -> torch.Tensor | None:
    """Token-order ids for QK-norm in ``forward_sorted``: the caller's, else the vetted ids the plan carries."""
    if plan is None:
        return modality_ids
    ids = modality_ids if modality_ids is not None else plan.group_ids
    if ids is None:
        raise ValueError("`modality_ids` is required: the plan carries no ids (build it with group_plan)")
    return ids.reshape(batch_shape)


def _batch_shape(batch_shape, num_rows: int) -> tuple[int, int]:
    if not isinstance(batch_shape, (tuple, list, torch.Size)) or len(batch_shape) != 2:
        raise TypeError(f"`batch_shape` must be (B, S), got {batch_shape!r}")
    B, S = (check_positive_int(v, "batch_shape") for v in batch_shape)
    if B * S != num_rows:
        raise ValueError(f"`batch_shape` {(B, S)} does not hold the {num_rows} rows of `x`")
    return B, S


class MoTAttention(nn.Module):
    """Modality-untied attention projections around one global attention.

    ``q, k, v = x W_{Q,K,V}^{m}`` from one three-weight grouped op (``grouped_linears``, no weight
    concatenation); optional per-head QK RMSNorm per modality; rotary embeddings from ``position_ids`` (default
    ``0..S-1``; ``rope_theta=None`` disables them); ``softmax(q k^T / sqrt(d_h) + mask) v`` over all tokens
    (grouped-query when ``n_kv_heads < n_heads``); output ``o W_O^{m}``.

    Parameters: ``wq (M, H*d_h, dim)``, ``wk, wv (M, H_kv*d_h, dim)``, ``wo (M, dim, H*d_h)``; with
    ``qk_norm``, submodules ``q_norm, k_norm`` (:class:`MoTRMSNorm`, weight ``(M, d_h)``).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        num_modalities: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope_theta: float | None = 10000.0,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (n_heads, "n_heads"), (num_modalities, "num_modalities")):
            check_positive_int(v, name)
        n_kv_heads = n_heads if n_kv_heads is None else check_positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv_heads:
            raise ValueError(f"`n_kv_heads`={n_kv_heads} must divide `n_heads`={n_heads}")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"`dim`={dim} must be divisible by `n_heads`={n_heads} (or pass head_dim)")
            head_dim = dim // n_heads
        check_positive_int(head_dim, "head_dim")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"rotary embeddings need an even `head_dim`, got {head_dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.num_modalities, self.rope_theta, self.backend = num_modalities, rope_theta, backend
        self.wq = _modality_weight(num_modalities, n_heads * head_dim, dim, factory)
        self.wk = _modality_weight(num_modalities, n_kv_heads * head_dim, dim, factory)
        self.wv = _modality_weight(num_modalities, n_kv_heads * head_dim, dim, factory)
        self.wo = _modality_weight(num_modalities, dim, n_heads * head_dim, factory)
        self.q_norm = MoTRMSNorm(head_dim, num_modalities, norm_eps, backend=backend, **factory) if qk_norm else None
        self.k_norm = MoTRMSNorm(head_dim, num_modalities, norm_eps, backend=backend, **factory) if qk_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each modality's projections initialised like ``nn.Linear``; QK-norm weights to one."""
        for w in (self.wq, self.wk, self.wv, self.wo):
            init_per_modality_(w)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        position_ids: torch.Tensor | None = None,
        plan: GroupPlan | None = None,
        span_ids: torch.Tensor | None = None,
        *,
        sorted_rows: bool = False,
        batch_shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x: ``(B, S, dim)``; modality_ids: ``(B, S)`` (None allowed with one modality).

        attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, H, S, S)``, combined with
        the causal mask when ``is_causal``; span_ids: ``(B, S)`` ints for the Transfusion hybrid mask (0 =
        text, equal positive ids = one image span, bidirectional inside); position_ids: ``(B, S)`` or ``(S,)``.
        Returns the branch output ``(B, S, dim)`` (no residual). ``sorted_rows=True`` with ``batch_shape``:
        ``x (T, dim)`` rows in ``plan`` order instead (see :meth:`forward_sorted`).
        """
        if sorted_rows:
            return self._sorted(x, plan, batch_shape, modality_ids, attn_mask, is_causal, position_ids, span_ids)
        _check_tokens(x, modality_ids, self.num_modalities, self.dim)
        if x.dim() != 3:
            raise ValueError(f"`x` must be (B, S, dim), got shape {tuple(x.shape)}")
        B, S, _ = x.shape
        plan, ids = _resolve_plan(modality_ids, self.num_modalities, plan, self.backend)
        q, k, v = self._qkv(x.reshape(B * S, self.dim), plan, "token")
        o = self._attend(q, k, v, B, S, ids, attn_mask, is_causal, position_ids, span_ids)
        return self._out(o, plan, "token").view(B, S, self.dim)

    def forward_sorted(
        self,
        x: torch.Tensor,
        plan: GroupPlan | None,
        batch_shape: tuple[int, int],
        modality_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        position_ids: torch.Tensor | None = None,
        span_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sorted-rows entry point: ``x (T, dim)`` rows in ``plan`` order (token order for one modality,
        ``plan=None``) -> the branch output ``(T, dim)`` in the same order.

        ``batch_shape = (B, S)`` with ``B * S = T`` gives the sequences attention runs over (in token order);
        ``modality_ids (B, S)`` (token order) defaults to the ids the plan was built from; the attention
        arguments are those of :meth:`forward`. The Q/K/V GEMM reads the sorted rows and writes token order,
        the output GEMM reads token order and writes sorted rows: no permutation pass. A module call, so hooks
        run as for :meth:`forward`.
        """
        return self(x, modality_ids, attn_mask, is_causal, position_ids, plan, span_ids, sorted_rows=True,
                    batch_shape=batch_shape)

    def _sorted(self, x, plan, batch_shape, modality_ids, attn_mask, is_causal, position_ids, span_ids):
        _sorted_input(x, plan, self.num_modalities, self.dim)
        B, S = _batch_shape(batch_shape, x.shape[0])
        ids = _token_ids(plan if self.num_modalities > 1 else None, modality_ids, (B, S))
        q, k, v = self._qkv(x, plan, "sorted")
        o = self._attend(q, k, v, B, S, ids, attn_mask, is_causal, position_ids, span_ids)
        return self._out(o, plan, "sorted")

    def _qkv(self, x2d: torch.Tensor, plan: GroupPlan | None, input_order: str):
        """``q (T, H d_h)``, ``k, v (T, H_kv d_h)`` in token order."""
        if plan is None:  # one modality: the three dense projections of a plain block
            return F.linear(x2d, _only(self.wq)), F.linear(x2d, _only(self.wk)), F.linear(x2d, _only(self.wv))
        # One op over the three weights (no [wq; wk; wv] concatenation per step): one read of the sorted rows, one
        # autograd node, dX summed in one buffer; q, k, v come out as separate contiguous tensors.
        return grouped_linears(x2d, (self.wq, self.wk, self.wv), plan, input_order=input_order,
                               output_order="token", backend=prefer(self.backend))

    def _out(self, o: torch.Tensor, plan: GroupPlan | None, output_order: str) -> torch.Tensor:
        if plan is None:
            return F.linear(o, _only(self.wo))
        return grouped_linear(o, self.wo, plan, input_order="token", output_order=output_order,
                              backend=prefer(self.backend))

    def _attend(self, q, k, v, B, S, ids, attn_mask, is_causal, position_ids, span_ids) -> torch.Tensor:
        """QK-norm, rotary and one global attention on token-order ``q, k, v``; ``(B * S, H * d_h)`` token order."""
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = q.view(B, S, H, dh), k.view(B, S, Hkv, dh), v.view(B, S, Hkv, dh)
        if self.q_norm is not None:  # ids were checked with the plan
            q = self.q_norm(q, ids, validate=False)
            k = self.k_norm(k, ids, validate=False)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(S, device=q.device)
            position_ids = check_position_ids(position_ids, B, S, q.device)
            cos, sin = rotary_cos_sin(position_ids, dh, self.rope_theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, causal = attention_mask(B, S, q.device, attn_mask, is_causal, span_ids)
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal)
        return o.transpose(1, 2).reshape(B * S, H * dh)


class MoTFeedForward(nn.Module):
    """Per-modality SwiGLU: ``(silu(x W1^{m}ᵀ) ⊙ x W3^{m}ᵀ) W2^{m}ᵀ``.

    One op, :func:`~sparsemm_kernels.grouped_swiglu_ffn`, over the modality-sorted rows: the ``W1``/``W3`` grouped
    GEMMs, the fused SwiGLU kernel, the ``W2`` grouped GEMM, one autograd node (first derivatives, as
    :func:`~sparsemm_kernels.silu_mul`). Parameters: ``w1, w3 (M, hidden, dim)``, ``w2 (M, dim, hidden)``.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_modalities: int, device=None, dtype=None, *, backend: str | None = None
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim"), (num_modalities, "num_modalities")):
            check_positive_int(v, name)
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_modalities, self.backend = dim, hidden_dim, num_modalities, backend
        self.w1 = _modality_weight(num_modalities, hidden_dim, dim, factory)
        self.w3 = _modality_weight(num_modalities, hidden_dim, dim, factory)
        self.w2 = _modality_weight(num_modalities, dim, hidden_dim, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each modality's W1, W2, W3 initialised like ``nn.Linear``."""
        for w in (self.w1, self.w3, self.w2):
            init_per_modality_(w)

    def forward(
        self, x: torch.Tensor, modality_ids: torch.Tensor | None, plan: GroupPlan | None = None, *,
        sorted_rows: bool = False,
    ) -> torch.Tensor:
        """x: ``(..., dim)``; modality_ids: ``x.shape[:-1]``. Returns ``(..., dim)``. ``sorted_rows=True``:
        ``x (T, dim)`` rows in ``plan`` order instead, ``modality_ids`` unused (see :meth:`forward_sorted`)."""
        if sorted_rows:
            return self._sorted(x, plan)
        _check_tokens(x, modality_ids, self.num_modalities, self.dim)
        plan, _ = _resolve_plan(modality_ids, self.num_modalities, plan, self.backend)
        x2 = x.reshape(-1, self.dim)
        if plan is None:
            return self._dense(x2).view(x.shape)
        return self._grouped(x2, plan, "token").view(x.shape)

    def forward_sorted(self, x: torch.Tensor, plan: GroupPlan | None) -> torch.Tensor:
        """The sorted-rows entry point: ``x (T, dim)`` rows in ``plan`` order -> ``(T, dim)`` in that order. Both
        GEMMs run on contiguous row blocks per modality (``grouped_mm``, no gather or scatter). A module call,
        so hooks run as for :meth:`forward`."""
        return self(x, None, plan, sorted_rows=True)

    def _sorted(self, x: torch.Tensor, plan: GroupPlan | None) -> torch.Tensor:
        _sorted_input(x, plan, self.num_modalities, self.dim)
        if self.num_modalities == 1:
            return self._dense(x)
        return self._grouped(x, plan, "sorted")

    def _grouped(self, x2d: torch.Tensor, plan: GroupPlan, order: str) -> torch.Tensor:
        # The whole FFN as one op over the sorted rows (no concatenated weight per step); token-order rows are
        # sorted in and out around it.
        if order == "token":
            return unsort_rows(self._grouped(sort_rows(x2d, plan), plan, "sorted"), plan)
        return grouped_swiglu_ffn(x2d, self.w1, self.w3, self.w2, plan, backend=prefer(self.backend))

    def _dense(self, x2d: torch.Tensor) -> torch.Tensor:
        # One modality: what a plain dense SwiGLU does (no fused weight, so no per-step concatenation).
        return F.linear(F.silu(F.linear(x2d, _only(self.w1))) * F.linear(x2d, _only(self.w3)), _only(self.w2))


class MoTBlock(nn.Module):
    """A Mixture-of-Transformers block.

    ``norm_placement="post"`` (the paper's, as in Chameleon): ``h = x + attn_norm(attn(x))``,
    ``y = h + ffn_norm(ffn(h))``, each residual add done by the norm in its own output (``residual=``).
    ``"pre"``: ``h = x + attn(attn_norm(x))``, ``y = h + ffn(ffn_norm(h))``.
    Every norm, projection and FFN is per modality; the plan is shared by all of them.
    Submodules: ``attn`` (:class:`MoTAttention`), ``ffn`` (:class:`MoTFeedForward`), ``attn_norm``,
    ``ffn_norm`` (:class:`MoTRMSNorm` for ``norm="rms"``, :class:`MoTLayerNorm` for ``norm="layer"``).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        hidden_dim: int,
        num_modalities: int,
        norm: str = "rms",
        norm_placement: str = "post",
        qk_norm: bool = False,
        n_kv_heads: int | None = None,
        norm_eps: float = 1e-5,
        head_dim: int | None = None,
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
        self.dim, self.num_modalities, self.backend = dim, num_modalities, backend
        self.norm, self.norm_placement = norm, norm_placement
        self.attn = MoTAttention(
            dim, n_heads, num_modalities, n_kv_heads, head_dim, qk_norm, norm_eps, rope_theta,
            backend=backend, **factory,
        )
        self.ffn = MoTFeedForward(dim, hidden_dim, num_modalities, backend=backend, **factory)
        self.attn_norm = _NORMS[norm](dim, num_modalities, norm_eps, backend=backend, **factory)
        self.ffn_norm = _NORMS[norm](dim, num_modalities, norm_eps, backend=backend, **factory)

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None,
        plan: GroupPlan | None = None,
        *,
        sorted_rows: bool = False,
        batch_shape: tuple[int, int] | None = None,
        **attention_kwargs,
    ) -> torch.Tensor:
        """x: ``(B, S, dim)``; modality_ids: ``(B, S)``; plan: a reusable plan of ``modality_ids``;
        ``attention_kwargs`` go to :meth:`MoTAttention.forward` (attn_mask, is_causal, position_ids,
        span_ids). Returns ``(B, S, dim)``. ``sorted_rows=True`` with ``batch_shape``: ``x (T, dim)`` rows in
        ``plan`` order instead (see :meth:`forward_sorted`).

        The block sorts its rows into the plan's group order, runs the sorted stream and restores token
        order (a model that keeps the sorted stream across blocks skips both: :class:`MoTTransformer`)."""
        if sorted_rows:
            _sorted_input(x, plan, self.num_modalities, self.dim)
            return self._stream(x, plan, _batch_shape(batch_shape, x.shape[0]), modality_ids, attention_kwargs)
        _check_tokens(x, modality_ids, self.num_modalities, self.dim)
        if x.dim() != 3:
            raise ValueError(f"`x` must be (B, S, dim), got shape {tuple(x.shape)}")
        B, S, D = x.shape
        plan, ids = _resolve_plan(modality_ids, self.num_modalities, plan, self.backend)
        if plan is None:
            return self._stream(x.reshape(B * S, D), None, (B, S), ids, attention_kwargs).view(B, S, D)
        h = self._stream(sort_rows(x.reshape(B * S, D), plan), plan, (B, S), ids, attention_kwargs)
        return unsort_rows(h, plan).view(B, S, D)

    def forward_sorted(
        self,
        x: torch.Tensor,
        plan: GroupPlan | None,
        batch_shape: tuple[int, int],
        modality_ids: torch.Tensor | None = None,
        **attention_kwargs,
    ) -> torch.Tensor:
        """The sorted-rows entry point: ``x (T, dim)`` rows in ``plan`` order (token order with one modality,
        ``plan=None``) -> ``(T, dim)`` in the same order; ``batch_shape = (B, S)``, ``modality_ids`` and the
        attention arguments as in :meth:`MoTAttention.forward_sorted`. Norms, FFN and residuals run on the
        sorted rows; only attention sees token order, inside its GEMMs. A module call, so hooks run as for
        :meth:`forward`."""
        return self(x, modality_ids, plan, sorted_rows=True, batch_shape=batch_shape, **attention_kwargs)

    def _stream(self, h, plan, batch_shape, ids, attention_kwargs) -> torch.Tensor:
        def attn(t):
            return self.attn.forward_sorted(t, plan, batch_shape, ids, **attention_kwargs)

        if self.norm_placement == "post":  # the residual adds fused into the norms' outputs
            h = self.attn_norm.forward_sorted(attn(h), plan, residual=h)
            return self.ffn_norm.forward_sorted(self.ffn.forward_sorted(h, plan), plan, residual=h)
        h = h + attn(self.attn_norm.forward_sorted(h, plan))
        return h + self.ffn.forward_sorted(self.ffn_norm.forward_sorted(h, plan), plan)

    @classmethod
    def from_dense(cls, block: MoTBlock, num_modalities: int, *, backend: str | None = None) -> MoTBlock:
        """A MoT block whose every modality starts as a copy of the dense (one-modality) ``block``."""
        if not isinstance(block, MoTBlock) or block.num_modalities != 1:
            raise TypeError("`block` must be a dense block (DenseBlock or MoTBlock with num_modalities=1)")
        attn = block.attn
        ref = next(block.parameters())
        new = cls(
            block.dim, attn.n_heads, block.ffn.hidden_dim, num_modalities, block.norm, block.norm_placement,
            attn.q_norm is not None, attn.n_kv_heads, block.attn_norm.eps, attn.head_dim, attn.rope_theta,
            device=ref.device, dtype=ref.dtype, backend=backend,
        )
        dense = dict(block.named_parameters())
        with torch.no_grad():
            for name, p in new.named_parameters():
                p.copy_(dense[name].expand_as(p))
        return new


class DenseBlock(MoTBlock):
    """The dense transformer block: :class:`MoTBlock` with one modality, running plain dense ops.

    Same parameter names and shapes (a modality axis of 1); ``forward(x, modality_ids=None, ...)``.
    """

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, **kwargs) -> None:
        super().__init__(dim, n_heads, hidden_dim, 1, **kwargs)

    def forward(self, x, modality_ids=None, plan=None, **kwargs):
        """x: ``(B, S, dim)``; ``modality_ids`` and ``plan`` are accepted for interface parity and ignored
        (one modality); ``kwargs`` as :meth:`MoTBlock.forward`. Returns ``(B, S, dim)``."""
        return super().forward(x, None, None, **kwargs)


class MoTTransformer(nn.Module):
    """A small Mixture-of-Transformers language model: shared token embedding and LM head, a stack of
    :class:`MoTBlock`, a per-modality final norm. The modality plan is built **once** per forward and handed to
    every layer. ``num_modalities=1`` gives the dense model.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        hidden_dim: int,
        num_modalities: int,
        n_kv_heads: int | None = None,
        norm: str = "rms",
        norm_placement: str = "post",
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        rope_theta: float | None = 10000.0,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(vocab_size, "vocab_size")
        check_positive_int(n_layers, "n_layers")
        factory = {"device": device, "dtype": dtype}
        self.num_modalities, self.backend = num_modalities, backend
        self.embed = nn.Embedding(vocab_size, dim, **factory)
        self.layers = nn.ModuleList(
            MoTBlock(
                dim, n_heads, hidden_dim, num_modalities, norm, norm_placement, qk_norm, n_kv_heads, norm_eps,
                rope_theta=rope_theta, backend=backend, **factory,
            )
            for _ in range(n_layers)
        )
        self.norm = _NORMS[norm](dim, num_modalities, norm_eps, backend=backend, **factory)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False, **factory)

    def forward(self, tokens: torch.Tensor, modality_ids: torch.Tensor | None = None, **attention_kwargs):
        """tokens, modality_ids: ``(B, S)`` ints. Returns logits ``(B, S, vocab_size)``.

        With several modalities the rows stay in the plan's group order from the embedding (which looks up
        the tokens already sorted) to the final norm, and go back to token order once, before the LM head."""
        check_int_tensor(tokens, "tokens")
        if tokens.dim() != 2:
            raise ValueError(f"`tokens` must be (B, S), got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        dim = self.embed.embedding_dim
        if modality_ids is not None or self.num_modalities > 1:
            _check_tokens(torch.empty(B, S, dim, device="meta"), modality_ids, self.num_modalities, dim)
        plan, ids = _resolve_plan(modality_ids, self.num_modalities, None, self.backend)
        if plan is None:
            h = self.embed(tokens).view(B * S, dim)
        else:
            h = self.embed(tokens.reshape(-1).index_select(0, plan.sorted_to_orig))
        for layer in self.layers:
            h = layer.forward_sorted(h, plan, (B, S), ids, **attention_kwargs)
        h = self.norm.forward_sorted(h, plan)
        if plan is not None:
            h = unsort_rows(h, plan)
        return self.lm_head(h.view(B, S, dim))
