"""What the profiler runs for a configuration: a model, its inputs and its loss (a :class:`Workload`).

config -> model on the device, in the dtype -> a batch (tokens, next-token targets, modality ids) -> loss.

* ``dense`` / ``mot``: :class:`sparsemm_kernels.nn.MoTTransformer` (``num_modalities=1`` is the dense model, which
  runs plain dense ops); the MoT model builds its modality plan once per forward and runs grouped kernels.
* ``mot_reference``: the same parameters, every block run by
  :func:`sparsemm_kernels.reference.mot_block_ref` (boolean masks and a loop over modalities, the published
  code's style) and the final norm by the same mask loop; no plan, no kernels.

Modality layout: each sequence alternates text runs and fixed-length non-text spans (like image tokens in a
document), see :func:`modality_layout`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sparsemm_kernels.nn import (
    AvgKFeedForward,
    MixtureOfDepths,
    MoMaBlock,
    MoMaFeedForward,
    MoMaTransformer,
    MoTAttention,
    MoTBlock,
    MoTFeedForward,
    MoTLayerNorm,
    MoTRMSNorm,
    MoTTransformer,
    TokenChoiceMoE,
)
from sparsemm_kernels.reference.mot import mot_block_ref, per_modality

if TYPE_CHECKING:
    from profiling.registry import ModelConfig


@dataclass
class Workload:
    """A built configuration.

    model: the ``nn.Module`` whose parameters are trained; make_batch(batch, seed): the inputs of one step, a dict
    of device tensors (``tokens``, ``targets``: ``(batch, seq)`` int64; ``modality_ids``: ``(batch, seq)`` int64
    or None), the same for the same arguments; loss(model, inputs): the scalar training loss; roles: ``(module,
    role)`` pairs that the per-layer breakdown times as ranges (roles are listed in
    :data:`profiling.breakdown.ROLE_CATEGORY`).
    """

    model: nn.Module
    make_batch: Callable[[int, int], dict[str, torch.Tensor | None]]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    roles: list[tuple[nn.Module, str]]


# ----------------------------------------------------------------------------------------------------------------
# Data: random tokens and an interleaved modality layout
# ----------------------------------------------------------------------------------------------------------------


def modality_layout(seq: int, num_modalities: int, image_fraction: float, image_span: int, rng: random.Random):
    """One sequence's modality ids (a list of ``seq`` ints): text (0) runs with non-text spans between them.

    ``round(image_fraction * seq)`` tokens are non-text, cut into ``k = max(1, round(n / image_span))`` spans of
    equal length (+-1); span ``j`` takes modality ``1 + j % (num_modalities - 1)`` (image, then speech, ... in
    turn). The text tokens are cut at ``k`` distinct random points into ``k + 1`` runs: a non-empty text run
    starts the sequence and separates consecutive spans, the last run may be empty. One modality: all zeros.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"`image_fraction` must lie in [0, 1], got {image_fraction}")
    n_other = round(image_fraction * seq) if num_modalities > 1 else 0
    n_text = seq - n_other
    if n_other == 0:
        return [0] * seq
    if n_text == 0:
        return [1 + (i * (num_modalities - 1)) // seq for i in range(seq)]
    k = min(max(1, round(n_other / image_span)), n_text, n_other)
    spans = [n_other // k + (j < n_other % k) for j in range(k)]
    cuts = sorted(rng.sample(range(1, n_text + 1), k))
    runs = [b - a for a, b in zip([0, *cuts[:-1]], cuts)] + [n_text - cuts[-1]]
    ids: list[int] = []
    for j, (run, span) in enumerate(zip(runs, [*spans, 0])):
        ids += [0] * run + [1 + j % (num_modalities - 1)] * span
    return ids


def modality_ids(batch: int, seq: int, num_modalities: int, image_fraction: float, image_span: int, seed: int):
    """``(batch, seq)`` int64 ids, one :func:`modality_layout` per sequence, seeded by ``seed``."""
    rng = random.Random(seed)
    rows = [modality_layout(seq, num_modalities, image_fraction, image_span, rng) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.int64)


def lm_batch(cfg: ModelConfig, batch: int, seed: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Random tokens in ``[0, vocab)`` (``seq + 1`` per row: inputs and next-token targets) and modality ids.

    Everything is drawn from ``seed`` alone, so configurations of one batch shape see identical data.
    """
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, cfg.vocab, (batch, cfg.seq + 1), generator=gen, dtype=torch.int64)
    ids = None
    if cfg.num_modalities > 1:
        ids = modality_ids(batch, cfg.seq, cfg.num_modalities, cfg.image_fraction, cfg.image_span, seed).to(device)
    return {"tokens": seqs[:, :-1].to(device), "targets": seqs[:, 1:].to(device), "modality_ids": ids}


def lm_loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Next-token cross-entropy over every position, on the logits in the model's dtype (no fp32 copy)."""
    logits = model(inputs["tokens"], inputs["modality_ids"])
    return F.cross_entropy(logits.flatten(0, 1), inputs["targets"].flatten())


# ----------------------------------------------------------------------------------------------------------------
# The reference-style MoT: the package's parameters run by the published-code-style mask loop
# ----------------------------------------------------------------------------------------------------------------


class ReferenceBlock(nn.Module):
    """A :class:`MoTBlock` whose forward is ``mot_block_ref(block, x, ids, math_attention=False)``.

    Same parameters, read in place; boolean masks and a per-modality loop for every projection, norm and FFN
    (host syncs at each mask, as in the published MoT code); attention by ``F.scaled_dot_product_attention``.
    """

    def __init__(self, block: MoTBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        return mot_block_ref(self.block, x, modality_ids, math_attention=False)


class ReferenceNorm(nn.Module):
    """A per-modality norm run by the mask loop: ``out[ids == m] = norm_m(x[ids == m])``."""

    def __init__(self, norm: MoTRMSNorm | MoTLayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        n, d = self.norm, x.shape[-1]
        if isinstance(n, MoTLayerNorm):
            bias = n.bias

            def fn(m, xm):
                return F.layer_norm(xm, (d,), n.weight[m], None if bias is None else bias[m], n.eps)
        else:

            def fn(m, xm):
                return F.rms_norm(xm, (d,), n.weight[m], n.eps)

        return per_modality(fn, x, modality_ids, n.weight.shape[0])


class ReferenceMoTTransformer(nn.Module):
    """The parameters of a :class:`MoTTransformer` (shared, not copied) run in the published-code style.

    ``embed -> ReferenceBlock x n_layers -> ReferenceNorm -> lm_head``; no modality plan is built.
    """

    def __init__(self, model: MoTTransformer) -> None:
        super().__init__()
        self.embed = model.embed
        self.layers = nn.ModuleList(ReferenceBlock(block) for block in model.layers)
        self.norm = ReferenceNorm(model.norm)
        self.lm_head = model.lm_head

    def forward(self, tokens: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, modality_ids)
        return self.lm_head(self.norm(h, modality_ids))


# ----------------------------------------------------------------------------------------------------------------
# Builders (one per family) and the module roles the breakdown times
# ----------------------------------------------------------------------------------------------------------------

# First match wins; ReferenceBlock comes first so that the block inside it is not timed twice.
ROLE_OF_TYPE: list[tuple[type, str]] = [
    (ReferenceBlock, "ref_block"),
    (MixtureOfDepths, "mod"),
    (MoTBlock, "block"),
    (MoMaBlock, "block"),
    (MoTAttention, "attn"),
    (MoTFeedForward, "ffn"),
    (MoMaFeedForward, "ffn"),
    (TokenChoiceMoE, "ffn"),
    (AvgKFeedForward, "ffn"),
    (MoTRMSNorm, "norm"),
    (MoTLayerNorm, "norm"),
    (ReferenceNorm, "norm"),
    (nn.Embedding, "embed"),
]


def default_roles(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, role)`` for the model itself (``"model"``: what runs outside every submodule, e.g. the plan),
    every submodule of a type in :data:`ROLE_OF_TYPE`, and a submodule named ``lm_head`` (``"lm_head"``).
    Submodules of a ``ref_block`` are skipped: the reference reads their parameters without calling them."""
    roles = [(model, "model")]
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        role = next((r for t, r in ROLE_OF_TYPE if isinstance(module, t)), None)
        if role is None and name.split(".")[-1] == "lm_head":
            role = "lm_head"
        if role == "ref_block":
            skip.append(name)
        if role is not None:
            roles.append((module, role))
    return roles


def _transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> MoTTransformer:
    return MoTTransformer(
        cfg.vocab, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden, cfg.num_modalities, device=device, dtype=dtype
    )


def _workload(model: nn.Module, cfg: ModelConfig, device: torch.device) -> Workload:
    return Workload(
        model=model,
        make_batch=lambda batch, seed: lm_batch(cfg, batch, seed, device),
        loss=lm_loss,
        roles=default_roles(model),
    )


def build_transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Workload:
    """The ``dense`` and ``mot`` families: a :class:`MoTTransformer` with ``cfg.num_modalities`` modalities."""
    return _workload(_transformer(cfg, device, dtype), cfg, device)


def build_mot_reference(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Workload:
    """The ``mot_reference`` family: a :class:`MoTTransformer`'s parameters run by :class:`ReferenceMoTTransformer`."""
    if cfg.num_modalities < 2:
        raise ValueError(f"{cfg.name}: the reference-style MoT needs num_modalities >= 2, got {cfg.num_modalities}")
    return _workload(ReferenceMoTTransformer(_transformer(cfg, device, dtype)), cfg, device)


def build_moma(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Workload:
    """The ``moma`` family: a :class:`MoMaTransformer` with ``options["experts"]`` experts per modality (one group:
    the expert-choice MoE) and ``options["capacity_factor"]`` (default 1: every token gets one expert's FLOPs on
    average, FLOP-matched with the dense model of the same ``hidden``); ``options["mod_capacity"]`` adds MoD
    (batch-level, every ``options["mod_every"]``-th layer from layer 0, default every other)."""
    experts = tuple(cfg.options["experts"])
    if len(experts) != cfg.num_modalities:
        raise ValueError(f"{cfg.name}: options['experts'] has {len(experts)} groups but num_modalities is "
                         f"{cfg.num_modalities}")
    model = MoMaTransformer(
        cfg.vocab, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden, experts,
        capacity_factor=cfg.options.get("capacity_factor", 1.0), device=device, dtype=dtype,
        mod_capacity=cfg.options.get("mod_capacity"), mod_every=cfg.options.get("mod_every", 2),
    )
    return _workload(model, cfg, device)


def build_token_choice(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Workload:
    """The ``token_choice`` family: a dense :class:`MoTTransformer` whose every FFN is a :class:`TokenChoiceMoE` with
    ``options["experts"]`` experts of width ``cfg.hidden``, ``options["top_k"]`` per token (dropless), as
    :func:`sparsemm_kernels.btx_merge` builds it."""
    model = MoTTransformer(cfg.vocab, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden, 1, device=device, dtype=dtype)
    for layer in model.layers:
        layer.ffn = TokenChoiceMoE(cfg.dim, cfg.hidden, cfg.options["experts"], top_k=cfg.options["top_k"],
                                   device=device, dtype=dtype)
    return _workload(model, cfg, device)


def build_avgk(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Workload:
    """The ``avgk`` family: a dense :class:`MoTTransformer` whose every FFN is an :class:`AvgKFeedForward` (SwiGLU
    cells: ``glu=True``, ``silu``) of ``options["cells"]`` cells in blocks of ``options["block_size"]``,
    ``options["top_k"]`` blocks per token (``cfg.hidden`` = the active cells, FLOP-matched with the dense model)."""
    model = MoTTransformer(cfg.vocab, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden, 1, device=device, dtype=dtype)
    o = cfg.options
    for layer in model.layers:
        layer.ffn = AvgKFeedForward(cfg.dim, o["cells"], o["block_size"], o["top_k"], "silu", glu=True, device=device,
                                    dtype=dtype)
    return _workload(model, cfg, device)
