"""Tile configurations: per-dtype autotune lists on the GPU, pruned per arch; one small fixed tile in the interpreter.

The autotuner gets the union of the lists below and prunes it before timing anything
(:func:`prune_grouped_gemm_configs`, :func:`prune_grouped_gemm_dw_configs`): a launch keeps only the configs of its
operand class (16-bit, fp32 with TF32, fp32 without TF32) that fit the device's shared memory and register
budget (:func:`choosable_configs`). 16-bit keeps the big tensor-core tiles; fp32 operands take twice the shared memory
per element, and fp32 without TF32 runs on FMA units, where big tiles spill registers, so both get tiles of their
own. A launch whose sizes or strides are not multiples of 16, or whose operands are not row-major
(:func:`launch_is_aligned`), gets narrow loads and keeps the small tiles of the ``"unaligned"`` list whatever its
class. ``python -m benchmarks.aot`` compiles every choosable config for sm_80 / sm_90a and checks these choices.

``SPARSEMM_AUTOTUNE=0`` (read at import) uses one modest config that fits every dtype and arch without spills: no
autotuning, so no benchmarking sync on a first call and fast test runs; the test suite sets it.
"""

from __future__ import annotations

import os

import torch
import triton

from sparsemm_kernels.utils.device import is_interpreting

# Shared memory one block may use (the opt-in maximum), bytes, by compute capability.
_SHARED_MEMORY_LIMIT = {
    (7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024,
    (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024,
}


def shared_memory_limit(capability: tuple[int, int]) -> int:
    """Bytes of shared memory one block may use on a GPU of ``capability`` (e.g. ``(8, 0)``: 163 KB on an A100).

    An unknown capability takes the value of the nearest known one below it (the smallest known if none).
    """
    known = sorted(_SHARED_MEMORY_LIMIT)
    below = [c for c in known if c <= tuple(capability)]
    return _SHARED_MEMORY_LIMIT[below[-1] if below else known[0]]


def current_capability(device: torch.device | None = None) -> tuple[int, int]:
    """Compute capability of the CUDA device the kernel launches on (the AOT tool replaces this for a target)."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """``"16bit"`` (fp16 / bf16), ``"tf32"`` (fp32 operands, TF32 tensor cores) or ``"fp32"`` (fp32 FMA, "ieee")."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "tf32" if precision == "tf32" else "fp32"


def _cfg(m: int, j: int, k: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_J": j, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


def _dw(n: int, k: int, m: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_M": m}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)


# FMA dots (fp32 "ieee") keep operand fragments in registers too. Without a `.maxnreg`, ptxas caps itself near
# 64K / (4 x threads) registers (128 at 4 warps) and spills the loop-invariant load masks on sm_90a;
# allowing the whole register file per thread keeps them (measured with `python -m benchmarks.aot`).
_FMA_REGS = 255


# Every list was compiled for sm_80 and sm_90a by ``python -m benchmarks.aot`` (registers, spills, shared memory in
# benchmarks/results/aot-*.md). Forward / dX kernel: tiles BLOCK_M rows x BLOCK_J output columns, BLOCK_K deep.
_GEMM = {
    # Tensor cores, 2-byte operands: the big tiles. On sm_80 the accumulator budget drops the two with 128
    # accumulators per thread (they spill 8-212 B there); sm_90's wgmma holds them.
    "16bit": [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
              _cfg(64, 64, 64, 4, 4)],
    # TF32 tensor cores, 4-byte operands: half the depth per stage, at most 64 accumulators (128 spill on both
    # archs; 128 x 128 x 64 and 64 x 128 x 32 on 4 warps spill 4-20 B on sm_80 with Triton 3.6).
    "tf32": [_cfg(128, 128, 32, 8, 4), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 4)],
    # FMA dot (fp32 "ieee"): operand fragments live in registers too; only the tiles measured spill-free at every
    # benchmark shape with Triton 3.6 and 3.9 (64 x 128 x 32, 128 x 64 x 32, 64 x 64 x 32 on 4 warps, 32 x 64 x 16
    # spilled 4-16 B at one or another; 32 x 64 x 32 on 4 warps 4-8 B with Triton 3.6).
    "fp32": [_cfg(64, 64, 32, 8, 3, _FMA_REGS), _cfg(64, 64, 16, 8, 3, _FMA_REGS), _cfg(64, 64, 16, 4, 3, _FMA_REGS)],
    # Any class, sizes or strides not multiples of 16 (narrow loads) or a column-major operand: tiles measured
    # spill-free there in every class (64 x 64 x 32 spills 4-64 B in fp32 off the tiles, with or without maxnreg;
    # 32 x 64 x 32 on 4 warps 12-24 B).
    "unaligned": [_cfg(64, 64, 16, 8, 3, _FMA_REGS), _cfg(64, 32, 32, 4, 3)],
}
# Weight-gradient kernel: tiles BLOCK_N x BLOCK_K of dW, BLOCK_M rows (the dot's depth) per step.
_GEMM_DW = {
    "16bit": [_dw(128, 128, 64, 8, 3), _dw(128, 128, 32, 4, 4), _dw(128, 64, 64, 4, 4), _dw(64, 64, 64, 4, 4)],
    # (128 x 64 x 32 on 4 warps and 64 x 64 x 64 spill 16-288 B on sm_80 with Triton 3.6.)
    "tf32": [_dw(128, 128, 32, 8, 3), _dw(64, 128, 32, 4, 4), _dw(128, 64, 32, 8, 3)],
    # FMA: 16 rows per step; 32 spill on sm_80 once dbias is summed too (108-840 B), 64 spill 10-15 KB.
    "fp32": [_dw(128, 128, 16, 8, 3, _FMA_REGS), _dw(128, 64, 16, 8, 3, _FMA_REGS), _dw(64, 128, 16, 8, 3, _FMA_REGS)],
    # (128 x 64 x 16 spills 4 B in fp32 with Triton 3.6 off the tiles, 64 x 64 x 16 on 4 warps 20 B at the
    # benchmark shapes with 3.9, 64 x 128 x 16 4 B with 3.6.)
    "unaligned": [_dw(64, 64, 16, 8, 3), _dw(32, 64, 16, 4, 3)],
}
# Narrow launches: at most 32 output columns and / or a depth of at most 32 (Avg-K blocks of 16-32 cells: W_in's
# products have g columns, W_out's a depth of g; its weight gradients the same). A 64-wide tile would compute 2-4x
# the useful products there, so these launches choose among tiles no wider than the next power of two of the
# narrow size (at least 16), keyed by the narrow side: "cols" (fwd BLOCK_J / dW BLOCK_N), "depth" (fwd BLOCK_K /
# dW BLOCK_K), "both". Aligned 16-bit and TF32 launches only (fp32 FMA and unaligned launches keep their lists).
_NARROW_GEMM = {
    "16bit": {"cols": [_cfg(128, 16, 64, 4, 4), _cfg(128, 32, 64, 4, 4), _cfg(64, 32, 64, 4, 4)],
              "depth": [_cfg(128, 128, 16, 4, 4), _cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 4, 4)],
              "both": [_cfg(128, 32, 32, 4, 4), _cfg(64, 16, 16, 4, 4)]},
    "tf32": {"cols": [_cfg(128, 16, 32, 4, 4), _cfg(128, 32, 32, 4, 4)],
             "depth": [_cfg(128, 64, 16, 4, 4), _cfg(128, 64, 32, 8, 3)],
             "both": [_cfg(64, 32, 32, 4, 4), _cfg(64, 16, 16, 4, 4)]},
}
_NARROW_GEMM_DW = {
    "16bit": {"cols": [_dw(16, 128, 64, 4, 4), _dw(32, 128, 64, 4, 4), _dw(32, 64, 64, 4, 4)],
              "depth": [_dw(128, 16, 64, 4, 4), _dw(128, 32, 64, 4, 4)],
              "both": [_dw(32, 32, 64, 4, 4), _dw(16, 16, 64, 4, 4)]},
    "tf32": {"cols": [_dw(16, 128, 32, 4, 4), _dw(32, 64, 32, 4, 4)],
             "depth": [_dw(128, 16, 32, 4, 4), _dw(64, 32, 32, 4, 4)],
             "both": [_dw(32, 32, 32, 4, 4), _dw(16, 16, 32, 4, 4)]},
}
NARROW_MAX = 32


def narrow_caps(cols: int, depth: int) -> int:
    """The narrow sides of a launch as one int ``100 * cols_cap + depth_cap`` (a constexpr of the GEMM kernels, so
    each narrow kind is its own specialisation): ``cap`` = the next power of two of the size, at least 16, when the
    size is at most :data:`NARROW_MAX`, else 0. 0: a regular launch."""
    def cap(n: int) -> int:
        return max(16, 1 << max(n - 1, 0).bit_length()) if 0 < n <= NARROW_MAX else 0
    return 100 * cap(cols) + cap(depth)


def _narrow_list(kernel: str, cls: str, narrow: int) -> list[triton.Config]:
    """The narrow tiles for ``narrow`` (:func:`narrow_caps`) no wider than its caps; [] for a regular launch."""
    cols_cap, depth_cap = divmod(narrow, 100)
    lists = (_NARROW_GEMM if kernel == "fwd" else _NARROW_GEMM_DW).get(cls)
    if not narrow or lists is None:
        return []
    side = "both" if cols_cap and depth_cap else ("cols" if cols_cap else "depth")
    col_key, depth_key = ("BLOCK_J", "BLOCK_K") if kernel == "fwd" else ("BLOCK_N", "BLOCK_K")
    fits = [c for c in lists[side] if (not cols_cap or c.kwargs[col_key] <= cols_cap)
            and (not depth_cap or c.kwargs[depth_key] <= depth_cap)]
    return fits or list(lists[side])


# SPARSEMM_AUTOTUNE=0: one config per kernel, spill-free for every dtype, aligned or not, on sm_80 and sm_90a with
# Triton 3.6 and 3.9 (each one of the unaligned list), <= 24 KB shared.
_FIXED_GEMM = _cfg(64, 64, 16, 8, 3, _FMA_REGS)
_FIXED_GEMM_DW = _dw(64, 64, 16, 8, 3)


def candidate_configs(kernel: str) -> list[triton.Config]:
    """Every GPU autotune config of ``kernel`` (``"fwd"``: forward / dX, ``"dw"``: weight gradient), all classes."""
    out: list[triton.Config] = []
    for configs in (_GEMM if kernel == "fwd" else _GEMM_DW).values():
        out += [c for c in configs if c not in out]
    for sides in (_NARROW_GEMM if kernel == "fwd" else _NARROW_GEMM_DW).values():
        for configs in sides.values():
            out += [c for c in configs if c not in out]
    return out


def _tuned_or(configs: list[triton.Config], fixed: triton.Config) -> list[triton.Config]:
    return [fixed] if os.environ.get("SPARSEMM_AUTOTUNE", "1") == "0" else configs


def _tensor_cores(dtype: torch.dtype, precision: str) -> bool:
    return operand_class(dtype, precision) != "fp32"


def gemm_shared_memory(
    config: triton.Config, kernel: str, dtype: torch.dtype, precision: str, capability: tuple[int, int]
) -> int:
    """Estimated shared memory (bytes) of a grouped-GEMM config: operand tiles times pipeline buffers.

    ``kernel``: ``"fwd"`` (A ``BLOCK_M x BLOCK_K``, B ``BLOCK_K x BLOCK_J``) or ``"dw"`` (dY ``BLOCK_M x BLOCK_N``,
    X ``BLOCK_M x BLOCK_K``). Triton's pipeliner keeps ``num_stages`` buffers for wgmma (sm_90+, tensor cores) and
    at most ``num_stages - 1`` otherwise (mma.sync on sm_80, FMA dots); checked by ``python -m benchmarks.aot``.
    """
    kw = config.kwargs
    if kernel == "fwd":
        tile = kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_J"]
    else:
        tile = kw["BLOCK_M"] * kw["BLOCK_N"] + kw["BLOCK_M"] * kw["BLOCK_K"]
    wgmma = tuple(capability) >= (9, 0) and _tensor_cores(dtype, precision)
    buffers = config.num_stages if wgmma else max(config.num_stages - 1, 1)
    return buffers * tile * torch.empty((), dtype=dtype).element_size()


def accumulators_per_thread(config: triton.Config, kernel: str) -> int:
    """fp32 accumulator registers each thread holds: the output tile over the block's threads."""
    kw = config.kwargs
    out = kw["BLOCK_M"] * kw["BLOCK_J"] if kernel == "fwd" else kw["BLOCK_N"] * kw["BLOCK_K"]
    return out // (32 * config.num_warps)


def accumulator_budget(dtype: torch.dtype, precision: str, capability: tuple[int, int]) -> int:
    """Most fp32 accumulators per thread a config may hold on ``capability`` without spilling registers (from the
    AOT tables): 128 for 16-bit operands on sm_90+ (wgmma), 64 otherwise (mma.sync on sm_80 spills 8-212 B with
    128; TF32 spills with 128 on both). fp32 FMA tiles also depend on their depth: their list holds only tiles
    measured spill-free, all within 64."""
    return 128 if tuple(capability) >= (9, 0) and operand_class(dtype, precision) == "16bit" else 64


def choosable_configs(
    configs: list[triton.Config], kernel: str, dtype: torch.dtype, precision: str, capability: tuple[int, int],
    aligned: bool = True, narrow: int = 0,
) -> list[triton.Config]:
    """The configs of ``configs`` the autotuner may choose for a launch on a GPU of ``capability``.

    Keeps those in the list of the operand class (:func:`operand_class`) -- or, for a launch that is not
    ``aligned`` (:func:`launch_is_aligned`), in the unaligned list -- that fit the arch's shared memory
    (:func:`gemm_shared_memory`) and its accumulator budget (:func:`accumulator_budget`). An aligned ``narrow``
    launch (:func:`narrow_caps` of its output columns and depth, nonzero) takes the narrow tiles of its class instead.
    Never empty: when no config qualifies, the one needing the least shared memory. Callable without a GPU, e.g.
    ``choosable_configs(candidate_configs("fwd"), "fwd", torch.float32, "ieee", (8, 0))``.
    """
    lists = _GEMM if kernel == "fwd" else _GEMM_DW
    cls = operand_class(dtype, precision) if aligned else "unaligned"
    own = [c for c in configs if c in (_narrow_list(kernel, cls, narrow) or lists[cls])]
    own = own or list(configs)  # a list of none of ours (the fixed config): take it as it is
    smem = [gemm_shared_memory(c, kernel, dtype, precision, capability) for c in own]
    limit = shared_memory_limit(capability)
    budget = accumulator_budget(dtype, precision, capability)
    fits = [c for c, b in zip(own, smem) if b <= limit and accumulators_per_thread(c, kernel) <= budget]
    return fits or [own[smem.index(min(smem))]]


def launch_is_aligned(tensors, ints, unit_strides=()) -> bool:
    """True when every tensor's data pointer is 16-byte aligned, every size / stride in ``ints`` is 1 or a
    multiple of 16 (what Triton's specialisation needs to prove wide loads), and every stride in
    ``unit_strides`` is 1 (the row-major operands the tiles are laid out for). A launch that is not gets
    narrow or transposed loads, whose addresses and predicates take registers the big tiles do not have (they
    spilled 0.4-10 KB there, see benchmarks/results/aot-*.md): :func:`choosable_configs` then keeps the small
    tiles of the ``"unaligned"`` list."""
    return (all(t.data_ptr() % 16 == 0 for t in tensors) and all(v == 1 or v % 16 == 0 for v in ints)
            and all(v == 1 for v in unit_strides))


def prune_grouped_gemm_configs(configs, named_args, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the forward / dX kernel: :func:`choosable_configs` for this launch's device."""
    a = named_args["a_ptr"]
    return choosable_configs(configs, "fwd", a.dtype, kwargs["DOT_PRECISION"], current_capability(a.device),
                             aligned=kwargs.get("ALIGNED", True), narrow=narrow_caps(named_args["J"], named_args["K"]))


def prune_grouped_gemm_dw_configs(configs, named_args, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the weight-gradient kernel: :func:`choosable_configs` for this launch's device."""
    dy = named_args["dy_ptr"]
    return choosable_configs(configs, "dw", dy.dtype, kwargs["DOT_PRECISION"], current_capability(dy.device),
                             aligned=kwargs.get("ALIGNED", True), narrow=narrow_caps(named_args["N"], named_args["K"]))


def grouped_gemm_configs() -> list[triton.Config]:
    """Configs for the forward / dX kernel (tiles BLOCK_M rows x BLOCK_J output columns, BLOCK_K deep)."""
    if is_interpreting():
        # Small tiles keep the interpreter fast and make "size off the tile" cheap to test.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_J": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return _tuned_or(candidate_configs("fwd"), _FIXED_GEMM)


def grouped_gemm_dw_configs() -> list[triton.Config]:
    """Configs for the weight-gradient kernel (tiles BLOCK_N x BLOCK_K of dW, BLOCK_M rows per step)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 32})]
    return _tuned_or(candidate_configs("dw"), _FIXED_GEMM_DW)
