"""Named model configurations, the families that build them, presets, and the papers' published numbers.

Adding a layer (token choice, Avg-K, MoD, ...; MoMa and expert choice are registered this way) to the report
takes three calls::

    register_family(Family("tc", build=build_tc, flops=tc_flops, params=tc_params, description="..."))
    register(ModelConfig("tc-8x-435m", family="tc", dim=1024, n_layers=24, n_heads=16, hidden=4096,
                         num_modalities=1, group="435m-moma", baseline="dense-435m-moma",
                         options={"experts": 8, "top_k": 2}))
    add_to_preset("gpu", "tc-8x-435m")
    # and its CPU size, so that the CPU report (preset ``cpu``) carries the same rows
    register(ModelConfig("tc-8x-cpu", family="tc", dim=512, n_layers=4, n_heads=8, hidden=1536, seq=1024,
                         batch=2, vocab=8192, num_modalities=1, group="cpu", baseline="dense-cpu",
                         options={"experts": 8, "top_k": 2}))
    add_to_preset("cpu", "tc-8x-cpu")

``build(cfg, device, dtype)`` returns a :class:`profiling.models.Workload` (model, batch maker, loss, breakdown
roles); ``flops(cfg)`` a :class:`profiling.flops.FlopCount`; ``params(cfg)`` a :class:`profiling.flops.ParamCount`.
Configurations of one ``group`` share one batch size (``batch="auto"``: the largest that every member fits) and
are compared with the group's ``baseline`` (a dense configuration); ``reference_of`` pairs a reference-style
configuration with the kernel configuration it mirrors; ``paper_ratio`` keys :data:`PAPER_RATIOS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from profiling import flops as _flops
from profiling import models as _models

#: Chameleon's tokenizer has a 65,536-entry vocabulary (text BPE + 8,192 image codes); input and output
#: embeddings are untied. With it, the MoT paper's "443M" and "1.5B" are the exact parameter counts.
CHAMELEON_VOCAB = 65536
#: Chameleon encodes a 512x512 image as 1,024 tokens: the length of one image span.
CHAMELEON_IMAGE_TOKENS = 1024
#: The ``cpu`` preset's vocabulary: Chameleon's 65,536 would make the LM head a third of a CPU step.
CPU_VOCAB = 8192


def swiglu_hidden(dim: int) -> int:
    """The MoT paper's SwiGLU width for model width ``dim``: ``256 * ceil(int(2/3 * 4 * dim) / 256)``."""
    return 256 * math.ceil(int(2 / 3 * 4 * dim) / 256)


class UnknownConfigError(ValueError):
    """A configuration, preset or family name that is not registered; the message lists the valid ones."""


@dataclass(frozen=True)
class ModelConfig:
    """One model to profile. Every field can be overridden from the command line (``--set``).

    name: unique key; family: which builder runs it (:data:`FAMILIES`); dim, n_layers, n_heads, hidden (FFN
    width), num_modalities (1 = dense), seq, vocab: the architecture; batch: sequences per step, or ``"auto"``
    (the largest that fits, found on the GPU; 1 on the CPU); image_fraction: the share of non-text tokens,
    laid out in spans of image_span tokens; group / baseline / reference_of / paper_ratio: how the report
    compares configurations (see the module docstring); options: family-specific settings.
    """

    name: str
    family: str
    dim: int
    n_layers: int
    n_heads: int
    hidden: int
    num_modalities: int = 1
    seq: int = 4096
    batch: int | str = "auto"
    vocab: int = CHAMELEON_VOCAB
    image_fraction: float = 0.5
    image_span: int = CHAMELEON_IMAGE_TOKENS
    group: str = ""
    baseline: str | None = None
    reference_of: str | None = None
    paper_ratio: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "hidden", "num_modalities", "seq", "vocab", "image_span"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: `{name}` must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"{self.name}: `dim`={self.dim} must be divisible by `n_heads`={self.n_heads}")
        if self.batch != "auto" and (isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"{self.name}: `batch` must be a positive int or 'auto', got {self.batch!r}")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError(f"{self.name}: `image_fraction` must lie in [0, 1], got {self.image_fraction}")
        if self.paper_ratio is not None and self.paper_ratio not in PAPER_RATIOS:
            raise ValueError(
                f"{self.name}: unknown `paper_ratio` {self.paper_ratio!r}; known: {', '.join(PAPER_RATIOS)}"
            )

    @property
    def mix(self) -> str:
        """The text/image token mix, e.g. ``"50/50"`` or ``"80/20"`` (``"100/0"`` for one modality)."""
        if self.num_modalities == 1:
            return "100/0"
        image = round(100 * self.image_fraction)
        return f"{100 - image}/{image}"

    def build(self, device: torch.device | str, dtype: torch.dtype) -> _models.Workload:
        """The model (on ``device``, in ``dtype``) and its input generator, by the family's builder."""
        return family(self.family).build(self, torch.device(device), dtype)

    def override(self, **changes: Any) -> ModelConfig:
        """A copy with fields replaced; string values (from the command line) are parsed to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        parsed: dict[str, Any] = {}
        options = dict(self.options)
        for key, value in changes.items():
            if key.startswith("options."):
                options[key.removeprefix("options.")] = _parse_scalar(value) if isinstance(value, str) else value
                continue
            if key not in fields or key == "options":
                valid = ", ".join(f for f in fields if f != "options")
                raise ValueError(f"unknown configuration field {key!r}; valid: {valid}, options.<key>")
            parsed[key] = _parse_field(key, value) if isinstance(value, str) else value
        return dataclasses.replace(self, **parsed, options=options)


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _parse_field(key: str, text: str) -> Any:
    if key in ("baseline", "reference_of", "paper_ratio"):
        return None if text.lower() in ("", "none") else text
    if key in ("name", "family", "group", "description"):
        return text
    if key == "batch" and text == "auto":
        return text
    try:
        return float(text) if key == "image_fraction" else int(text)
    except ValueError:
        raise ValueError(f"`{key}` needs a number{' or auto' if key == 'batch' else ''}, got {text!r}") from None


# ----------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How to build and count one kind of model. ``kernels``: False for reference-style (baseline) families."""

    name: str
    build: Callable[[ModelConfig, torch.device, torch.dtype], _models.Workload]
    flops: Callable[[ModelConfig], _flops.FlopCount]
    params: Callable[[ModelConfig], _flops.ParamCount]
    description: str = ""
    kernels: bool = True


FAMILIES: dict[str, Family] = {}


def register_family(fam: Family, *, replace: bool = False) -> Family:
    if fam.name in FAMILIES and not replace:
        raise ValueError(f"family {fam.name!r} is already registered (pass replace=True to redefine it)")
    FAMILIES[fam.name] = fam
    return fam


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownConfigError(f"unknown family {name!r}; registered families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------------------------------
# Configurations and presets
# ----------------------------------------------------------------------------------------------------------------

REGISTRY: dict[str, ModelConfig] = {}
PRESETS: dict[str, list[str]] = {}


def register(cfg: ModelConfig, *, replace: bool = False) -> ModelConfig:
    """Add ``cfg`` to :data:`REGISTRY` (its family may be registered later, before it is built)."""
    if cfg.name in REGISTRY and not replace:
        raise ValueError(f"configuration {cfg.name!r} is already registered (pass replace=True to redefine it)")
    if cfg.name in PRESETS:
        raise ValueError(f"{cfg.name!r} is a preset name; pick another configuration name")
    REGISTRY[cfg.name] = cfg
    return cfg


def register_preset(name: str, members: Iterable[str]) -> None:
    """A named list of configurations (``--configs NAME``); members must be registered."""
    members = list(members)
    for m in members:
        get_config(m)
    if name in REGISTRY:
        raise ValueError(f"{name!r} is a configuration name; pick another preset name")
    PRESETS[name] = members


def add_to_preset(name: str, *members: str) -> None:
    """Append configurations to an existing preset (how a new layer joins the default report)."""
    if name not in PRESETS:
        raise UnknownConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    for m in members:
        get_config(m)
        if m not in PRESETS[name]:
            PRESETS[name].append(m)


def _valid_names() -> str:
    presets = "; ".join(f"{p} ({', '.join(m)})" for p, m in PRESETS.items())
    return f"valid configurations: {', '.join(REGISTRY)}. Presets: {presets}"


def get_config(name: str) -> ModelConfig:
    """The registered configuration ``name``; :class:`UnknownConfigError` listing the valid names otherwise."""
    if name not in REGISTRY:
        raise UnknownConfigError(f"unknown configuration {name!r}; {_valid_names()}")
    return REGISTRY[name]


def resolve(names: Iterable[str]) -> list[ModelConfig]:
    """Configurations for a list of configuration and preset names, in order, without repeats."""
    out: dict[str, ModelConfig] = {}
    for name in names:
        name = name.strip()
        if not name:
            continue
        for member in PRESETS.get(name, [name]):
            out.setdefault(member, get_config(member))
    if not out:
        raise UnknownConfigError(f"no configuration selected; {_valid_names()}")
    return list(out.values())


def default_preset(device_type: str, quick: bool) -> str:
    """Without a GPU ``cpu`` (models where matmuls dominate the step), or ``tiny`` with ``quick``; on a GPU
    ``gpu``, or ``gpu-quick`` with ``quick``."""
    if device_type != "cuda":
        return "tiny" if quick else "cpu"
    return "gpu-quick" if quick else "gpu"


def preset_reason(device_type: str, quick: bool) -> str:
    """Why :func:`default_preset` picked its preset, in words for the report's header."""
    if device_type != "cuda":
        if quick:
            return "no GPU found, and --quick: the tiny models, which show the harness works (Python overhead " \
                   "dominates their steps)"
        return ("no GPU found: models at a size where the matmuls dominate a step on a CPU (dim 512, seq 1024, "
                f"vocabulary {CPU_VOCAB}), so the ratios describe the layers rather than Python overhead")
    if quick:
        return "a GPU found, and --quick: the 443M models (the MoT paper's Chameleon setting)"
    return "a GPU found: the MoT paper's Chameleon-setting sizes (443M, 1.5B) and MoMa's 435M dense baseline"


def with_mix(cfg: ModelConfig, mix: str, rename: bool) -> ModelConfig:
    """``cfg`` with the text/image mix ``"T/I"`` (e.g. ``"80/20"``); ``rename`` appends ``[T/I]`` to the name and
    to ``reference_of``. One-modality configurations are returned unchanged."""
    image = parse_mix(mix)
    if cfg.num_modalities == 1:
        return cfg
    changes: dict[str, Any] = {"image_fraction": image}
    if rename:
        changes["name"] = f"{cfg.name}[{mix}]"
        if cfg.reference_of:
            changes["reference_of"] = f"{cfg.reference_of}[{mix}]"
    return cfg.override(**changes)


def parse_mix(mix: str) -> float:
    """``"80/20"`` (text/image percent) -> the image fraction 0.2."""
    try:
        text, image = (float(p) for p in mix.split("/"))
    except ValueError:
        raise ValueError(f"a mix is 'TEXT/IMAGE' in percent, e.g. 50/50 or 80/20; got {mix!r}") from None
    if text < 0 or image < 0 or abs(text + image - 100) > 1e-6:
        raise ValueError(f"a mix's two percentages must be >= 0 and sum to 100, got {mix!r}")
    return image / 100


# ----------------------------------------------------------------------------------------------------------------
# Published numbers (quoted, never measured here)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperRatio:
    """A published throughput ratio to dense (higher = faster); ``derived``: computed by us from published
    figures rather than printed in the paper."""

    value: float
    source: str
    derived: bool = False


_MOMA = "MoMa (Lin et al. 2024) Table 2: words/s/GPU relative to dense, 435M FLOP-matched, seq 4096, 256 A100"
#: The MoT paper's Chameleon 7B results (A100, AWS p4de), in percent of the dense model's training.
MOT_PAPER = {
    "setting": "MoT (Liang et al. 2024), Chameleon setting, 7B, A100 (AWS p4de)",
    "image": {"steps_pct": 34.8, "wallclock_pct": 47.2},
    "text": {"steps_pct": 55.8, "wallclock_pct": 75.6},
}

PAPER_RATIOS: dict[str, PaperRatio] = {
    "moe-8x-ec": PaperRatio(0.91, f"{_MOMA}; MoE-8x, expert choice"),
    "moma-1t1i": PaperRatio(0.94, f"{_MOMA}; MoMa 1t1i"),
    "moma-4t4i": PaperRatio(0.83, f"{_MOMA}; MoMa 4t4i"),
    "mod-moma-1t1i": PaperRatio(0.79, f"{_MOMA}; MoD + MoMa 1t1i"),
    "mod-moma-4t4i": PaperRatio(0.69, f"{_MOMA}; MoD + MoMa 4t4i"),
    "mot-7b": PaperRatio(
        round(MOT_PAPER["image"]["steps_pct"] / MOT_PAPER["image"]["wallclock_pct"], 3),
        "MoT paper, 7B: image quality at 34.8% of dense steps but 47.2% of dense wall-clock, so one MoT step "
        "took 47.2/34.8 = 1.36x a dense step (text: 75.6/55.8 = 1.35x); derived by us, not printed in the paper",
        derived=True,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Built-in families and configurations
# ----------------------------------------------------------------------------------------------------------------

register_family(Family(
    "dense", _models.build_transformer, _flops.transformer_flops, _flops.transformer_params,
    "MoTTransformer with num_modalities=1: plain dense ops (F.linear, F.rms_norm, SDPA)",
))
register_family(Family(
    "mot", _models.build_transformer, _flops.transformer_flops, _flops.transformer_params,
    "MoTTransformer: modality plan once per forward, grouped GEMMs / fused norms / SwiGLU from sparsemm_kernels",
))
register_family(Family(
    "mot_reference", _models.build_mot_reference, _flops.transformer_flops, _flops.transformer_params,
    "the same parameters run by sparsemm_kernels.reference.mot_block_ref: boolean masks + per-modality loop "
    "(the published MoT code's style)",
    kernels=False,
))


def _size_family(size: str, dim: int, n_layers: int, n_heads: int, hidden: int, seq: int, **kw: Any) -> None:
    """dense-SIZE, mot2-SIZE, mot3-SIZE and mot2-SIZE-ref, one group."""
    common = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden=hidden, seq=seq, group=size, **kw)
    dense = f"dense-{size}"
    register(ModelConfig(dense, "dense", **common, description=f"{size} dense baseline"))
    register(ModelConfig(f"mot2-{size}", "mot", num_modalities=2, baseline=dense, paper_ratio="mot-7b", **common,
                         description=f"{size} MoT, text + image"))
    register(ModelConfig(f"mot3-{size}", "mot", num_modalities=3, baseline=dense, **common,
                         description=f"{size} MoT, text + image + speech (non-text spans alternate)"))
    # The MoT paper's ratio was measured with its own (mask-loop) code: it sits beside both implementations.
    register(ModelConfig(f"mot2-{size}-ref", "mot_reference", num_modalities=2, baseline=dense,
                         reference_of=f"mot2-{size}", paper_ratio="mot-7b", **common,
                         description=f"{size} MoT, text + image, reference style (mask loop)"))


# `--quick` on a CPU and the tests: the whole report in seconds on 2 cores (Python overhead dominates its steps).
_size_family("tiny", dim=64, n_layers=2, n_heads=4, hidden=192, seq=128, batch=2, vocab=256, image_span=32)
# The CPU default: large enough that matmuls dominate a step, small enough for ~5 minutes on 2 cores in fp32.
_size_family("cpu", dim=512, n_layers=4, n_heads=8, hidden=swiglu_hidden(512), seq=1024, batch=2, vocab=CPU_VOCAB,
             image_span=256)
# The MoT paper's Chameleon-setting sizes (seq 4096).
_size_family("443m", dim=1024, n_layers=24, n_heads=16, hidden=swiglu_hidden(1024), seq=4096)
_size_family("1.5b", dim=2048, n_layers=24, n_heads=16, hidden=swiglu_hidden(2048), seq=4096)
# MoMa's FLOP-matched dense model as its table states it: ffn 4096, used here as the SwiGLU width. (If "ffn 4096"
# is the width before the 2/3 SwiGLU scaling, the model is dense-443m: `--set dense-435m-moma:hidden=2816`.)
register(ModelConfig(
    "dense-435m-moma", "dense", dim=1024, n_layers=24, n_heads=16, hidden=4096, seq=4096, group="435m-moma",
    description="MoMa's 435M FLOP-matched dense baseline (24 layers, dim 1024, ffn 4096, 16 heads)",
))

register_family(Family(
    "moma", _models.build_moma, _flops.moma_flops, _flops.moma_params,
    "MoMaTransformer: dense attention, modality groups of SwiGLU experts with expert choice inside each group "
    "(one group: the expert-choice MoE), all experts in one grouped GEMM per projection",
))


def _moma_family(size: str, baseline: str, group: str, ratio_suffix: bool, **common: Any) -> list[str]:
    """moe-8x-SIZE (expert choice, 8 experts, no modality split), moma-1t1i-SIZE and moma-4t4i-SIZE (MoMa Table 2),
    FLOP-matched with ``baseline`` at capacity factor 1."""
    names = []
    for name, experts, ratio in (("moe-8x", (8,), "moe-8x-ec"), ("moma-1t1i", (1, 1), "moma-1t1i"),
                                 ("moma-4t4i", (4, 4), "moma-4t4i")):
        register(ModelConfig(
            f"{name}-{size}", "moma", num_modalities=len(experts), baseline=baseline, group=group,
            paper_ratio=ratio if ratio_suffix else None, options={"experts": experts, "capacity_factor": 1.0},
            description=f"{size} {name}: {'+'.join(map(str, experts))} experts, capacity factor 1", **common,
        ))
        names.append(f"{name}-{size}")
    return names


def _mod_moma_family(size: str, baseline: str, group: str, n_layers: int, **common: Any) -> list[str]:
    """mod-moma-1t1i-SIZE and mod-moma-4t4i-SIZE (MoMa Table 2): MoD before the modality split, batch-level,
    capacity 25%, every other layer from layer 0, with more layers to stay FLOP-matched (the paper's 435M MoD model
    has 40 layers for the dense 24)."""
    names = []
    for name, experts in (("mod-moma-1t1i", (1, 1)), ("mod-moma-4t4i", (4, 4))):
        register(ModelConfig(
            f"{name}-{size}", "moma", num_modalities=len(experts), baseline=baseline, group=group, n_layers=n_layers,
            paper_ratio=name, options={"experts": experts, "capacity_factor": 1.0, "mod_capacity": 0.25,
                                       "mod_every": 2},
            description=f"{size} {name}: MoD (batch level, 25%, every other layer of {n_layers}) + "
                        f"{'+'.join(map(str, experts))} experts, capacity factor 1", **common,
        ))
        names.append(f"{name}-{size}")
    return names


_MOMA_435M = _moma_family("435m", "dense-435m-moma", "435m-moma", True, dim=1024, n_layers=24, n_heads=16,
                          hidden=4096, seq=4096)
_MOMA_CPU = _moma_family("cpu", "dense-cpu", "cpu", True, dim=512, n_layers=4, n_heads=8, hidden=swiglu_hidden(512),
                         seq=1024, batch=2, vocab=CPU_VOCAB, image_span=256)
_MOMA_TINY = _moma_family("tiny", "dense-tiny", "tiny", True, dim=64, n_layers=2, n_heads=4, hidden=192, seq=128,
                          batch=2, vocab=256, image_span=32)

_MOD_MOMA_435M = _mod_moma_family("435m", "dense-435m-moma", "435m-moma", 40, dim=1024, n_heads=16, hidden=4096,
                                  seq=4096)
_MOD_MOMA_CPU = _mod_moma_family("cpu", "dense-cpu", "cpu", 6, dim=512, n_heads=8, hidden=swiglu_hidden(512),
                                 seq=1024, batch=2, vocab=CPU_VOCAB, image_span=256)
_MOD_MOMA_TINY = _mod_moma_family("tiny", "dense-tiny", "tiny", 4, dim=64, n_heads=4, hidden=192, seq=128, batch=2,
                                  vocab=256, image_span=32)

register_family(Family(
    "token_choice", _models.build_token_choice, _flops.token_choice_flops, _flops.token_choice_params,
    "dense MoTTransformer with every FFN a dropless token-choice MoE (TokenChoiceMoE, as btx_merge builds it): "
    "per-token top-k routing, one grouped GEMM per projection over all experts",
))


def _token_choice_family(size: str, baseline: str, group: str, hidden: int, **common: Any) -> list[str]:
    """tc-8x-top2-SIZE and the fine-grained tc-E-top8-SIZE: expert width hidden / k, so that a token's FFN FLOPs
    match the dense ``baseline``'s (same ``hidden``)."""
    names = []
    for experts, k in ((8, 2), (128 if size == "443m" else 64, 8)):
        name = f"tc-{experts}x-top{k}-{size}"
        register(ModelConfig(
            name, "token_choice", num_modalities=1, baseline=baseline, group=group, hidden=hidden // k,
            options={"experts": experts, "top_k": k},
            description=f"{size} token choice: {experts} experts of width {hidden // k}, top-{k}, dropless", **common,
        ))
        names.append(name)
    return names


register_family(Family(
    "avgk", _models.build_avgk, _flops.avgk_flops, _flops.avgk_params,
    "dense MoTTransformer with every FFN an Avg-K sparse FFN (AvgKFeedForward, SwiGLU cells): each token computes "
    "the top_k blocks whose mean key matches it, 1/8 of the cells",
))


def _avgk(size: str, baseline: str, group: str, hidden: int, block_size: int, **common: Any) -> str:
    """avgk-SIZE: 8x the dense model's FFN cells, 1/8 active (``hidden`` cells per token: FLOP-matched)."""
    name = f"avgk-{size}"
    register(ModelConfig(
        name, "avgk", num_modalities=1, baseline=baseline, group=group, hidden=hidden,
        options={"cells": 8 * hidden, "block_size": block_size, "top_k": hidden // block_size},
        description=f"{size} Avg-K: {8 * hidden} SwiGLU cells in blocks of {block_size}, {hidden // block_size} "
                    "blocks (1/8) per token", **common,
    ))
    return name


_AVGK_443M = _avgk("443m", "dense-443m", "443m", swiglu_hidden(1024), 64, dim=1024, n_layers=24, n_heads=16,
                   seq=4096)
_AVGK_CPU = _avgk("cpu", "dense-cpu", "cpu", swiglu_hidden(512), 64, dim=512, n_layers=4, n_heads=8, seq=1024,
                  batch=2, vocab=CPU_VOCAB, image_span=256)
_AVGK_TINY = _avgk("tiny", "dense-tiny", "tiny", 192, 16, dim=64, n_layers=2, n_heads=4, seq=128, batch=2,
                   vocab=256, image_span=32)

_TC_443M = _token_choice_family("443m", "dense-443m", "443m", swiglu_hidden(1024), dim=1024, n_layers=24,
                                n_heads=16, seq=4096)
_TC_CPU = _token_choice_family("cpu", "dense-cpu", "cpu", swiglu_hidden(512), dim=512, n_layers=4, n_heads=8,
                               seq=1024, batch=2, vocab=CPU_VOCAB, image_span=256)
_TC_TINY = _token_choice_family("tiny", "dense-tiny", "tiny", 192, dim=64, n_layers=2, n_heads=4, seq=128, batch=2,
                                vocab=256, image_span=32)

register_preset("tiny", ["dense-tiny", "mot2-tiny", "mot3-tiny", "mot2-tiny-ref", *_MOMA_TINY, *_MOD_MOMA_TINY,
                         *_TC_TINY, _AVGK_TINY])
register_preset("cpu", ["dense-cpu", "mot2-cpu", "mot3-cpu", "mot2-cpu-ref", *_MOMA_CPU, *_MOD_MOMA_CPU, *_TC_CPU,
                        _AVGK_CPU])
register_preset("gpu-quick", ["dense-443m", "mot2-443m", "mot3-443m", "mot2-443m-ref"])
register_preset("gpu", [*PRESETS["gpu-quick"], "dense-1.5b", "mot2-1.5b", "dense-435m-moma", *_MOMA_435M,
                        *_MOD_MOMA_435M, *_TC_443M, _AVGK_443M])
