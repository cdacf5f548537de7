"""The only place benchmark shapes live.

A :class:`Shape` is ``T`` rows of width ``K`` multiplied by ``G`` weight groups of ``(N, K)``, with the rows split
among the groups by a named rule (:data:`SPLITS`). Sets:

* :data:`GPU` - the full GPU set: T in {4096, 16384, 65536}, K = N in {2048, 4096}, G in {2, 3, 4} balanced and
  80/20, plus G = 64 balanced and Zipf-skewed;
* :data:`GPU_QUICK` - a handful of those, for a fast GPU run;
* :data:`CPU` and :data:`CPU_QUICK` - tiny shapes that run in seconds on a 2-core CPU.

Mixture-of-Transformers block benchmark (``bench_mot_block``): :class:`BlockConfig` (one transformer layer at a
published size, or a tiny CPU one), :data:`MOT_SPLITS` (text/image token splits) and
:func:`interleaved_modality_ids` (the modality layout of each sequence); :func:`mot_block_set` picks the set.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def _balanced(T: int, G: int) -> list[int]:
    """Equal shares; the first ``T % G`` groups get one row more."""
    return [T // G + (g < T % G) for g in range(G)]


def _eighty_twenty(T: int, G: int) -> list[int]:
    """Group 0 takes 80% of the rows; the other ``G - 1`` groups share the remaining 20% equally."""
    first = round(0.8 * T)
    return [first] + _balanced(T - first, G - 1)


def _zipf(T: int, G: int) -> list[int]:
    """Group ``g`` gets rows in proportion to ``1 / (g + 1)`` (Zipf, s = 1); rounding leftovers go to group 0.

    For G = 64 group 0 holds ~21% of the rows and the last groups ~0.3% each.
    """
    weights = [1.0 / (g + 1) for g in range(G)]
    total = sum(weights)
    counts = [int(T * w / total) for w in weights]
    counts[0] += T - sum(counts)
    return counts


SPLITS = {"balanced": _balanced, "80/20": _eighty_twenty, "zipf": _zipf}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: ``out (T, N) = x (T, K) @ W_g^T`` with rows split among G groups by ``split``."""

    T: int
    K: int
    N: int
    G: int
    split: str

    @property
    def counts(self) -> list[int]:
        """Rows per group (sums to ``T``)."""
        return SPLITS[self.split](self.T, self.G)

    def label(self) -> str:
        return f"T{self.T} K{self.K} N{self.N} G{self.G} {self.split}"


def _grid(Ts, KNs, Gs_splits) -> list[Shape]:
    return [Shape(T, kn, kn, G, split) for T in Ts for kn in KNs for G, split in Gs_splits]


_FEW_GROUPS = [(G, s) for G in (2, 3, 4) for s in ("balanced", "80/20")]
_MANY_GROUPS = [(64, "balanced"), (64, "zipf")]

GPU_QUICK: list[Shape] = [
    Shape(16384, 4096, 4096, 2, "balanced"),
    Shape(16384, 4096, 4096, 2, "80/20"),
    Shape(65536, 4096, 4096, 3, "80/20"),
    Shape(65536, 2048, 2048, 4, "balanced"),
    Shape(65536, 4096, 4096, 64, "zipf"),
]

# The quick shapes run first, so a run stopped by its time budget still holds them (tables sort rows by shape).
GPU: list[Shape] = GPU_QUICK + [
    s for s in _grid((4096, 16384, 65536), (2048, 4096), _FEW_GROUPS + _MANY_GROUPS) if s not in GPU_QUICK
]

CPU: list[Shape] = [
    Shape(256, 128, 128, 2, "balanced"),
    Shape(1024, 256, 256, 2, "80/20"),
    Shape(1024, 256, 256, 3, "balanced"),
    Shape(1024, 256, 256, 4, "80/20"),
    Shape(1024, 256, 256, 64, "balanced"),
    Shape(1024, 256, 256, 64, "zipf"),
]

# Zipf with 64 groups over 256 rows leaves the tail groups with one row or none: the empty-group path runs too.
CPU_QUICK: list[Shape] = [Shape(256, 128, 128, 2, "80/20"), Shape(256, 128, 128, 64, "zipf")]


def shapes_for(device: str, quick: bool) -> list[Shape]:
    """The shape set for a device type (``"cuda"`` or ``"cpu"``)."""
    if device == "cuda":
        return GPU_QUICK if quick else GPU
    return CPU_QUICK if quick else CPU


# ---------------------------------------------------------------------------------------------------------------
# Mixture-of-Transformers block (bench_mot_block)


def swiglu_hidden(dim: int) -> int:
    """The SwiGLU hidden width of the MoT/Chameleon configs: ``256 * ceil(int(2/3 * 4 * dim) / 256)``."""
    return 256 * math.ceil(int(2 / 3 * 4 * dim) / 256)


@dataclass(frozen=True)
class BlockConfig:
    """One transformer layer: width ``dim``, ``n_heads`` heads (``head_dim = dim / n_heads``), SwiGLU ``hidden``;
    run on ``batch`` sequences of ``seq`` tokens whose image spans are about ``image_span`` tokens long."""

    name: str
    dim: int
    n_heads: int
    hidden: int
    seq: int
    batch: int
    image_span: int

    def label(self, batch: int | None = None) -> str:
        return f"{self.name} d{self.dim} h{self.n_heads} ff{self.hidden} {batch or self.batch}x{self.seq}"


# MoT paper, Chameleon setting (seq 4096): 443M = d 1024, 16 heads; 1.5B = d 2048, 16 heads. One layer each.
MOT_BLOCK_CONFIGS: dict[str, BlockConfig] = {
    "443M": BlockConfig("443M", 1024, 16, swiglu_hidden(1024), 4096, 4, 1024),  # hidden 2816
    "1.5B": BlockConfig("1.5B", 2048, 16, swiglu_hidden(2048), 4096, 4, 1024),  # hidden 5632
    # CPU preset: the same layout scaled down (seq / 32, image spans of seq / 4), runs in seconds on 2 cores.
    "tiny": BlockConfig("tiny", 64, 4, 192, 128, 2, 32),
    # The CPU comparison of the sorted-stream issue: small layers whose time is dominated by data movement.
    "cpu256": BlockConfig("cpu256", 256, 4, 704, 512, 2, 128),
    "cpu512": BlockConfig("cpu512", 512, 8, 1408, 1024, 2, 256),
}

# How modalities sit in a sequence: "spans" = text runs and image spans (interleaved_modality_ids),
# "random" = every token's modality drawn independently (the worst case for contiguous runs).
MOT_LAYOUTS = ("spans", "random")

# Text/image token splits -> the image fraction of every sequence.
MOT_SPLITS: dict[str, float] = {"50/50": 0.5, "80/20": 0.2}

MOT_GPU_CONFIGS = ("443M", "1.5B")
MOT_CPU_CONFIGS = ("tiny",)


def mot_block_set(device: str, quick: bool, configs: list[str] | None = None) -> list[tuple[BlockConfig, str]]:
    """``(config, split)`` pairs in run order: the quick pair (first config, 80/20) first, so a run stopped by its
    time budget still holds it. ``quick``: 80/20 of the first config only. ``configs``: names from
    :data:`MOT_BLOCK_CONFIGS` (default: 443M and 1.5B on ``"cuda"``, tiny on ``"cpu"``)."""
    names = list(configs or (MOT_GPU_CONFIGS if device == "cuda" else MOT_CPU_CONFIGS))
    unknown = [n for n in names if n not in MOT_BLOCK_CONFIGS]
    if unknown:
        raise ValueError(f"unknown block configs {unknown}; known: {list(MOT_BLOCK_CONFIGS)}")
    if quick:
        return [(MOT_BLOCK_CONFIGS[names[0]], "80/20")]
    return [(MOT_BLOCK_CONFIGS[n], split) for n in names for split in ("80/20", "50/50")]


def modality_layout_ids(
    layout: str, batch: int, seq: int, image_fraction: float, image_span: int, seed: int
) -> torch.Tensor:
    """``(batch, seq)`` modality ids in one of :data:`MOT_LAYOUTS`, exactly ``round(image_fraction * seq)`` image
    tokens per sequence either way."""
    if layout == "spans":
        return interleaved_modality_ids(batch, seq, image_fraction, image_span, seed)
    if layout != "random":
        raise ValueError(f"unknown layout {layout!r}; known: {MOT_LAYOUTS}")
    g = torch.Generator().manual_seed(seed)
    n_image = round(image_fraction * seq)
    base = torch.cat([torch.zeros(seq - n_image), torch.ones(n_image)]).long()
    return torch.stack([base[torch.randperm(seq, generator=g)] for _ in range(batch)])


def interleaved_modality_ids(batch: int, seq: int, image_fraction: float, image_span: int, seed: int) -> torch.Tensor:
    """``(batch, seq)`` int64 modality ids, 0 = text, 1 = image: each sequence alternates text runs and image spans.

    Every sequence holds exactly ``round(image_fraction * seq)`` image tokens, in
    ``k = max(1, round(n_image / image_span))`` spans of equal length (+-1) (seq 4096, span 1024: 50% = two spans
    of 1024, 20% = one span of 819). The text tokens are cut into ``k + 1`` runs at random points: a text run
    (at least one token) starts the sequence and separates consecutive spans, the last run may be empty. Each
    sequence gets its own cuts; the same arguments always give the same ids.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"`image_fraction` must lie in [0, 1], got {image_fraction}")
    rng = random.Random(seed)
    n_image = round(image_fraction * seq)
    n_text = seq - n_image
    rows = []
    for _ in range(batch):
        if n_image == 0 or n_text == 0:
            rows.append([int(n_text == 0)] * seq)
            continue
        k = min(max(1, round(n_image / image_span)), n_text, n_image)
        spans = [n_image // k + (i < n_image % k) for i in range(k)]
        cuts = sorted(rng.sample(range(1, n_text + 1), k))  # distinct: every run before a span is non-empty
        text_runs = [b - a for a, b in zip([0] + cuts[:-1], cuts)] + [n_text - cuts[-1]]
        row: list[int] = []
        for t, s in zip(text_runs, spans + [0]):
            row += [0] * t + [1] * s
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)
