"""Model-scale profiling of sparsemm_kernels: training-step time, throughput, MFU, memory, per-layer breakdown
and GPU telemetry of dense and sparse/modality-aware transformers, in one report (``python -m profiling``,
``make report``).

Registry (:mod:`profiling.registry`) -> measurement (:mod:`profiling.run`, :mod:`profiling.breakdown`,
:mod:`profiling.nvml`) -> report (:mod:`profiling.report`). FLOP formulas: :mod:`profiling.flops`. A new layer
registers a family, its configurations and its presets (see :mod:`profiling.registry`).
"""

from profiling.registry import (
    FAMILIES,
    PAPER_RATIOS,
    PRESETS,
    REGISTRY,
    Family,
    ModelConfig,
    PaperRatio,
    UnknownConfigError,
    add_to_preset,
    get_config,
    register,
    register_family,
    register_preset,
    resolve,
)

__all__ = [
    "FAMILIES",
    "PAPER_RATIOS",
    "PRESETS",
    "REGISTRY",
    "Family",
    "ModelConfig",
    "PaperRatio",
    "UnknownConfigError",
    "add_to_preset",
    "get_config",
    "register",
    "register_family",
    "register_preset",
    "resolve",
]
