"""Tile configurations: an autotuned list on the GPU, one small fixed tile in the CPU interpreter.

``SPARSEMM_AUTOTUNE=0`` (read at import) uses one modest config that fits fp32 in shared memory: no
autotuning, so no benchmarking sync on a first call and fast test runs; the test suite sets it. With
autotuning, configs that do not fit (large fp32 tiles) fail to compile and are skipped by the autotuner.
"""

from __future__ import annotations

import os

import triton

from sparsemm_kernels.utils.device import is_interpreting


def _tuned_or(configs: list[triton.Config], fixed: triton.Config) -> list[triton.Config]:
    return [fixed] if os.environ.get("SPARSEMM_AUTOTUNE", "1") == "0" else configs


def grouped_gemm_configs() -> list[triton.Config]:
    """Configs for the forward / dX kernel (tiles BLOCK_M rows x BLOCK_J output columns, BLOCK_K deep)."""
    if is_interpreting():
        # Small tiles keep the interpreter fast and make "size off the tile" cheap to test.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_J": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    fixed = triton.Config({"BLOCK_M": 64, "BLOCK_J": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)
    return _tuned_or([
        triton.Config({"BLOCK_M": 128, "BLOCK_J": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_J": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_J": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ], fixed)


def grouped_gemm_dw_configs() -> list[triton.Config]:
    """Configs for the weight-gradient kernel (tiles BLOCK_N x BLOCK_K of dW, BLOCK_M rows per step)."""
    if is_interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 32})]
    fixed = triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32}, num_warps=4, num_stages=3)
    return _tuned_or([
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_M": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
    ], fixed)
