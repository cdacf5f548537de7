"""Mixture-of-Depths: a router picks the tokens that go through a block; the rest skip it.

``out_i = x_i + r_i * (block(X_sel)_i - x_i)`` for the selected tokens, ``x_i`` for the others, with ``r = sigma(x
w_r)`` (or the raw logit). The block runs **once** on the selected tokens, kept in their original order with their
original positions and modality ids, so a wrapped :class:`~sparsemm_kernels.nn.MoTBlock`'s causal mask and rotary
embeddings see the right positions. A selection is a ``[R, L]`` table of flat token indices ``b * S + s``, gathered
in one ``index_select`` and written back in one ``index_copy`` (each real token once; no atomics):

* per sequence: ``R = B`` rows of ``C`` tokens each;
* batch level (MoMa's MoD): the ``C`` tokens of the whole batch as **one** row, sequences one after another,
  with an attention mask that keeps each sequence to itself (varlen attention in one call: no padding, so the
  block's projections and FFN do exactly the selected tokens' work, and a batch-level expert choice inside the
  block sees exactly the batch's selected tokens);
* causal routing (decoding): ``R = B`` rows of ``S`` slots, each sequence's chosen tokens first, then padding
  slots that read a zero row, come after every real token (so a causal block never lets a real token see them),
  are masked out of blocks that take a ``token_mask``, and write nothing back.

No loop over sequences, no host sync.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.nn.moe import router_logits
from sparsemm_kernels.ops.mod_combine import mod_combine
from sparsemm_kernels.ops.mod_routing import mod_capacity, mod_route
from sparsemm_kernels.utils.checks import check_float_tensor, check_int_tensor
from sparsemm_kernels.utils.distributed import all_gather_rows, group_size, rank_share

_ACTIVATIONS = ("sigmoid", None)
_AUX = ("bce", "predictor")


class MixtureOfDepths(nn.Module):
    """Route the top tokens of each sequence (or of the batch) through ``block``; the others skip it.

    Args:
        block: any module called as ``block(x_sel, modality_ids_sel, position_ids=position_ids_sel, **kwargs)``
            returning the shape of ``x_sel (B, L, dim)`` (a :class:`~sparsemm_kernels.nn.MoTBlock`, a
            :class:`~sparsemm_kernels.nn.MoMaBlock`, ...).
        dim: the model width.
        capacity: the tokens kept: a float in (0, 1] (a fraction of each sequence, or of the batch) or an int.
        router_activation: ``"sigmoid"`` (``r = sigma(logit)``) or None (``r = logit``).
        batch_level: pick over the whole batch (MoMa + MoD) instead of per sequence.
        aux: how causal decoding predicts the choice: ``"bce"`` (the router's own ``sigma(logit)`` trained with
            binary cross-entropy against the top-k membership) or ``"predictor"`` (a small MLP on detached inputs,
            ``sigma(silu(x A1^T) A2^T)``, trained the same way; the main router is untouched by it).
        backend: a preference for the routing and combine kernels (see :mod:`sparsemm_kernels.backend`).
        selection_group: with ``batch_level``, None (default: the batch of this call, per rank under
            torch.distributed, as MoMa trained) or a process group: the top tokens of every rank's batch together
            (the logits all-gathered, which needs the same ``[B, S]`` on every rank); each rank runs its own share,
            padded to a static bound. An attribute, settable after construction.

    Parameters: ``router`` (``nn.Linear(dim, 1, bias=False)``), with ``aux="predictor"`` ``predictor``
    (``nn.Sequential(Linear(dim, dim // 2), SiLU, Linear(dim // 2, 1))``, no biases).

    Attributes: ``aux_loss`` (set by every training forward that routes by top-k, else None);
    ``causal_routing`` (False: route by top-k; True: a token goes through iff its predicted probability is
    above 0.5, never calling top-k, so one decoding token (``S = 1``) works).
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        capacity=0.125,
        router_activation: str | None = "sigmoid",
        batch_level: bool = False,
        aux: str = "bce",
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        selection_group=None,
    ) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"`block` must be an nn.Module, got {type(block).__name__}")
        if router_activation not in _ACTIVATIONS:
            raise ValueError(f"`router_activation` must be 'sigmoid' or None, got {router_activation!r}")
        if aux not in _AUX:
            raise ValueError(f"`aux` must be one of {_AUX}, got {aux!r}")
        if not isinstance(batch_level, bool):
            raise TypeError(f"`batch_level` must be a bool, got {type(batch_level).__name__}")
        mod_capacity(capacity, 1 << 30)  # its type and range, before any input is seen
        factory = {"device": device, "dtype": dtype}
        self.block, self.dim, self.capacity = block, dim, capacity
        self.router_activation, self.batch_level, self.aux = router_activation, batch_level, aux
        self.router = nn.Linear(dim, 1, bias=False, **factory)
        self.predictor = None
        if aux == "predictor":
            hidden = max(dim // 2, 1)
            self.predictor = nn.Sequential(nn.Linear(dim, hidden, bias=False, **factory), nn.SiLU(),
                                           nn.Linear(hidden, 1, bias=False, **factory))
        self.backend = check_backend_name(backend)
        self.selection_group = selection_group
        self.causal_routing = False
        self.aux_loss: torch.Tensor | None = None
        try:
            params = inspect.signature(block.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._block_params = set(params)
        self._block_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """x: ``(B, S, dim)``; modality_ids: ``(B, S)`` or None; position_ids: ``(B, S)`` or ``(S,)`` (default
        ``0..S-1``); ``kwargs`` go to the block unchanged. Returns ``(B, S, dim)``."""
        check_float_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must be (B, S, {self.dim}), got shape {tuple(x.shape)}")
        B, S, D = x.shape
        if modality_ids is not None:
            check_int_tensor(modality_ids, "modality_ids")
            if tuple(modality_ids.shape) != (B, S):
                raise ValueError(f"`modality_ids` must be (B, S) = {(B, S)}, got {tuple(modality_ids.shape)}")
        position_ids = self._positions(position_ids, B, S, x.device)
        logits = router_logits(self.router, x).squeeze(-1)  # [B, S], at least float32
        r = torch.sigmoid(logits) if self.router_activation == "sigmoid" else logits
        self.aux_loss = None
        valid = None
        if self.causal_routing:
            flat, valid = self._slots_from_mask(self._predict(x, logits) > 0.5)
        elif self.batch_level and group_size(self.selection_group) > 1:
            flat, valid = self._route_over_group(logits)
        elif self.batch_level:
            flat = mod_route(logits, self.capacity, batch_level=True, backend=prefer(self.backend))[None, :]
        else:  # [B, C] positions -> flat indices
            flat = mod_route(logits, self.capacity, backend=prefer(self.backend))
            flat = flat + (torch.arange(B, device=x.device) * S)[:, None]
        if self.training and not self.causal_routing:
            self.aux_loss = self._aux_loss(x, logits, flat, B, S)
        return self._through_block(x, r, flat, valid, modality_ids, position_ids, kwargs)

    # ---- routing ----

    @staticmethod
    def _positions(position_ids, B: int, S: int, device) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(S, device=device).expand(B, S)
        check_int_tensor(position_ids, "position_ids")
        if tuple(position_ids.shape) == (S,):
            return position_ids.expand(B, S)
        if tuple(position_ids.shape) != (B, S):
            raise ValueError(f"`position_ids` must be (B, S) = {(B, S)} or (S,), got {tuple(position_ids.shape)}")
        return position_ids

    def _predict(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The causal-decoding probability of going through the block, ``[B, S]``."""
        if self.predictor is None:
            return torch.sigmoid(logits)
        return torch.sigmoid(self.predictor(x.detach()).squeeze(-1))

    def _route_over_group(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level routing over the tokens of every rank of ``selection_group`` (the logits all-gathered; each
        rank the same ``[B, S]``): this rank's chosen tokens as one row of flat indices, ascending, padded to the
        static bound ``min(C, B * S)`` with ``B * S``, and the row's validity."""
        group = self.selection_group
        rank = torch.distributed.get_rank(group)
        B, S = logits.shape
        all_logits = all_gather_rows(logits, group)
        chosen = mod_route(all_logits, self.capacity, batch_level=True, backend=prefer(self.backend))
        # Ascending over the ranks' token ranges: this rank's tokens are one contiguous run of `chosen`.
        local, valid = rank_share(chosen[None, :], rank * B * S, (rank + 1) * B * S, min(chosen.shape[0], B * S))
        return torch.where(valid, local, B * S), valid

    @staticmethod
    def _slots_from_mask(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of the tokens where ``chosen [B, S]`` is True, in order, then padding (``B * S``)."""
        B, S = chosen.shape
        pos = torch.arange(S, device=chosen.device).expand(B, S)
        order = torch.where(chosen, pos, pos + S).sort(dim=1).values  # chosen first, each part ascending
        valid = order < S
        base = (torch.arange(B, device=chosen.device) * S)[:, None]
        return torch.where(valid, base + order, B * S), valid

    def _aux_loss(self, x, logits, flat, B: int, S: int) -> torch.Tensor:
        """Binary cross-entropy of the causal predictor against the top-k membership (the target carries no
        gradient: it is an index choice)."""
        member = torch.zeros(B * S + 1, dtype=logits.dtype, device=logits.device)
        target = member.index_fill(0, flat.reshape(-1), 1.0)[: B * S].view(B, S)
        pred = logits if self.predictor is None else self.predictor(x.detach()).squeeze(-1)
        return F.binary_cross_entropy_with_logits(pred.float(), target.float())

    # ---- the block on the selected tokens, and the combine ----

    def _block_kwargs(self, kwargs, flat, valid, B: int, S: int, padded: bool) -> dict:
        """The block's keyword arguments for the selection ``flat [R, L]``: ``span_ids`` and ``attn_mask`` taken
        to the selected tokens, a same-sequence mask when one row holds several sequences, the padding mask."""
        out = dict(kwargs)
        R, L = flat.shape
        tok = flat.clamp(max=B * S - 1)
        b, s = tok // S, tok % S
        if out.get("span_ids") is not None:
            span = out["span_ids"]
            check_int_tensor(span, "span_ids")
            if tuple(span.shape) != (B, S):
                raise ValueError(f"`span_ids` must be (B, S) = {(B, S)}, got {tuple(span.shape)}")
            out["span_ids"] = torch.where(valid, span.reshape(-1)[tok], 0) if padded else span.reshape(-1)[tok]
        mask = out.get("attn_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (S, S):
                raise ValueError(f"`attn_mask` must be a tensor ending in (S, S) = {(S, S)}")
            m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            m4 = m4.expand(B, m4.shape[1], S, S)
            # [R, L, L, H] -> [R, H, L, L]: query (b, s_q) and key (b', s_k) read m[b, :, s_q, s_k]
            mask = m4[b[:, :, None], :, s[:, :, None], s[:, None, :]].permute(0, 3, 1, 2)
        if R == 1 and B > 1:  # several sequences in one row: each attends to itself only
            same = (b[:, :, None] == b[:, None, :])[:, None]
            mask = same if mask is None else (mask & same if mask.dtype == torch.bool
                                              else mask.masked_fill(~same, float("-inf")))
        if padded and out.get("is_causal", True) is False:  # no causal order hides the padding: mask its keys
            keys = valid[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=flat.device)[None, None]
            mask = keys if mask is None else (mask & keys if mask.dtype == torch.bool
                                              else mask.masked_fill(~keys, float("-inf")))
        if mask is not None:
            if not self._block_takes("attn_mask"):
                raise ValueError(f"`block` ({type(self.block).__name__}) takes no `attn_mask`, which this routing "
                                 "needs (batch-level routing keeps each sequence to itself with one)")
            out["attn_mask"] = mask
        if padded and "token_mask" in self._block_params and "token_mask" not in out:  # named, not via **kwargs
            out["token_mask"] = valid
        return out

    def _block_takes(self, name: str) -> bool:
        return name in self._block_params or self._block_var_kw

    def _through_block(self, x, r, flat, valid, modality_ids, position_ids, kwargs) -> torch.Tensor:
        B, S, D = x.shape
        R, L = flat.shape
        padded = valid is not None
        rows = B * S + (1 if padded else 0)  # padding slots read (and write) one extra zero row
        x2 = x.reshape(B * S, D)
        if padded:
            x2 = F.pad(x2, (0, 0, 0, 1))
        index = flat.reshape(-1)
        x_sel = x2.index_select(0, index).view(R, L, D)
        tok = flat.clamp(max=B * S - 1)
        pos = position_ids.reshape(-1)[tok]
        mids = modality_ids.reshape(-1)[tok] if modality_ids is not None else None
        if padded:
            pos = torch.where(valid, pos, 0)
            mids = torch.where(valid, mids, 0) if mids is not None else None
        y_sel = self.block(x_sel, mids, position_ids=pos, **self._block_kwargs(kwargs, flat, valid, B, S, padded))
        if not isinstance(y_sel, torch.Tensor) or y_sel.shape != x_sel.shape:
            got = tuple(y_sel.shape) if isinstance(y_sel, torch.Tensor) else type(y_sel).__name__
            raise ValueError(f"`block` ({type(self.block).__name__}) must return the shape of its input "
                             f"{tuple(x_sel.shape)}, got {got}")
        # x + r (block - x) at the chosen rows, x elsewhere: one fused pass each way, no atomics.
        out = mod_combine(x2, y_sel.reshape(R * L, D), r.reshape(-1)[tok].reshape(R * L), index, B * S,
                          backend=prefer(self.backend))
        return out[: B * S].view(B, S, D) if rows > B * S else out.view(B, S, D)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, capacity={self.capacity}, router_activation={self.router_activation!r}, "
                f"batch_level={self.batch_level}, aux={self.aux!r}")
