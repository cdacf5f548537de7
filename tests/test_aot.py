"""Ahead-of-time GPU compilation (``benchmarks/aot.py``): the CI subset compiles every kernel for sm_80 and sm_90a.

``python -m benchmarks.aot --quick`` runs in a subprocess (it needs the real GPU code paths, not the interpreter
this suite runs under) and must pass: no compile error, nothing over an arch's limits, tensor cores in every
16-bit GEMM, no spills at the benchmark shapes. The full matrix is ``make aot``. The pure helpers (ptxas log
parsing, the per-arch config choice) are checked in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from benchmarks.aot import parse_ptxas, tensor_core_ops
from sparsemm_kernels.kernels.triton import configs

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend_missing() -> str | None:
    try:
        from triton.backends.nvidia import compiler as nv

        ptxas = Path(nv.get_ptxas(80).path)
    except Exception as exc:  # any import / lookup failure means: cannot compile for NVIDIA here
        return f"triton's nvidia backend is not usable here: {exc!r}"
    if not ptxas.exists():
        return f"ptxas not found at {ptxas}"
    return None


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_k' for 'sm_80'
ptxas info    : Function properties for _k
    5600 bytes stack frame, 7988 bytes spill stores, 21920 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 5600 bytes cumulative stack size, 1024 bytes smem, 456 bytes cmem[0]
"""
    r = parse_ptxas(log)
    got = (r["regs"], r["spill_stores"], r["spill_loads"], r["stack"], r["smem_static"])
    assert got == (32, 7988, 21920, 5600, 1024)
    assert r["ptxas_log_found"]
    assert not parse_ptxas("")["ptxas_log_found"]


def test_tensor_core_ops():
    assert tensor_core_ops("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, ...") == "mma.sync"
    assert tensor_core_ops("\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}") == "wgmma"
    assert tensor_core_ops("\tfma.rn.f32 %r1, %r2, %r3, %r4;") == ""


@pytest.mark.parametrize("kernel", ["fwd", "dw"])
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
@pytest.mark.parametrize(
    "dtype,precision", [(torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")]
)
def test_choosable_configs_fit_the_arch(kernel, capability, dtype, precision):
    candidates = configs.candidate_configs(kernel)
    chosen = configs.choosable_configs(candidates, kernel, dtype, precision, capability)
    assert chosen and all(c in candidates for c in chosen)
    limit = configs.shared_memory_limit(capability)
    assert all(configs.gemm_shared_memory(c, kernel, dtype, precision, capability) <= limit for c in chosen)
    budget = configs.accumulator_budget(dtype, precision, capability)
    assert all(configs.accumulators_per_thread(c, kernel) <= budget for c in chosen)
    # Each operand class has its own tiles: fp32 never gets the 16-bit list and the reverse.
    other = configs.choosable_configs(candidates, kernel, torch.float16 if dtype == torch.float32 else torch.float32,
                                      "ieee", capability)
    assert set(map(str, chosen)) != set(map(str, other))


@pytest.mark.parametrize("kernel", ["fwd", "dw"])
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
@pytest.mark.parametrize(
    "dtype,precision", [(torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")]
)
def test_unaligned_launches_get_the_unaligned_tiles(kernel, capability, dtype, precision):
    candidates = configs.candidate_configs(kernel)
    chosen = configs.choosable_configs(candidates, kernel, dtype, precision, capability, aligned=False)
    lists = configs._GEMM if kernel == "fwd" else configs._GEMM_DW
    assert chosen and all(c in lists["unaligned"] for c in chosen)


def test_launch_is_aligned():
    t = torch.empty(64, 48)
    assert configs.launch_is_aligned((t,), (48, 48, 1), (t.stride(1),))
    assert not configs.launch_is_aligned((t,), (40,))  # a size not a multiple of 16
    assert not configs.launch_is_aligned((t[:, 1:],), (48,))  # a pointer 4 bytes past a 16-byte boundary
    assert not configs.launch_is_aligned((t,), (48,), (t.t().stride(1),))  # column-major where rows are wanted


def test_dw_row_split_depends_on_sizes_only():
    from sparsemm_kernels.kernels.triton.grouped_gemm import dw_row_splits

    assert dw_row_splits(65536, 2, 4096, 4096, 132) == 1  # 2048 dW tiles fill 132 SMs
    assert dw_row_splits(16384, 2, 1024, 1024, 132) == 3  # 128 tiles: about two programs per SM
    assert dw_row_splits(16384, 2, 1024, 1024, 108) == 1
    assert dw_row_splits(20, 1, 64, 64, 132) == 1  # too few rows to share


def test_shared_memory_limits():
    assert configs.shared_memory_limit((8, 0)) == 163 * 1024
    assert configs.shared_memory_limit((9, 0)) == 227 * 1024
    assert configs.shared_memory_limit((8, 9)) == 99 * 1024
    assert configs.shared_memory_limit((9, 5)) == 227 * 1024  # unknown: the nearest known below


def test_aot_quick_subset_passes(tmp_path):
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEMM_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "benchmarks.aot", "--quick", "--jobs", "2", "--out", str(tmp_path),
           "--cache", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    data = json.loads((tmp_path / f"aot-{triton.__version__}-quick.json").read_text())
    rows = data["rows"]
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90a"}
    kernels = {row["kernel"] for row in rows}
    assert {"grouped_gemm_kernel", "grouped_gemm_dw_kernel", "modality_norm_fwd_kernel", "modality_norm_bwd_kernel",
            "silu_mul_fwd_kernel", "silu_mul_bwd_kernel", "chunk_histogram_kernel", "chunk_scatter_kernel",
            "group_table_kernel", "expert_choice_kernel", "mod_combine_fwd_kernel",
            "mod_combine_bwd_kernel", "token_topk_kernel", "token_choice_plan_kernel",
            "token_choice_place_kernel", "gather_mm_kernel", "scatter_mm_kernel",
            "block_wgrad_kernel", "avgk_select_kernel"} <= kernels
    for row in rows:
        assert not row["failed"], row
        if row["kernel"].startswith("grouped_gemm") and row["dtype"] in ("fp16", "bf16"):
            assert row["tensor_cores"] not in ("none", "-"), row


def test_narrow_caps():
    assert configs.narrow_caps(2048, 2048) == 0
    assert configs.narrow_caps(16, 2048) == 1600 and configs.narrow_caps(17, 2048) == 3200
    assert configs.narrow_caps(2048, 8) == 16 and configs.narrow_caps(32, 32) == 3232
    assert configs.narrow_caps(33, 64) == 0 and configs.narrow_caps(0, 64) == 0


@pytest.mark.parametrize("kernel", ["fwd", "dw"])
@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "tf32"), (torch.float32, "tf32")])
def test_narrow_launches_get_tiles_no_wider_than_their_narrow_side(kernel, capability, dtype, precision):
    """Avg-K's 16-32-cell blocks: output columns or depth of 16 / 32 take tiles no wider than that (a regular launch
    takes 64-256-wide ones); fp32 FMA and unaligned launches keep their own lists."""
    candidates = configs.candidate_configs(kernel)
    cols_key = "BLOCK_J" if kernel == "fwd" else "BLOCK_N"
    regular = configs.choosable_configs(candidates, kernel, dtype, precision, capability)
    assert min(c.kwargs[cols_key] for c in regular) >= 64
    for cols, depth in ((16, 2048), (32, 2048), (2048, 16), (2048, 32), (16, 16), (32, 32)):
        narrow = configs.narrow_caps(cols, depth)
        chosen = configs.choosable_configs(candidates, kernel, dtype, precision, capability, narrow=narrow)
        assert chosen
        for c in chosen:
            if cols <= 32:
                assert c.kwargs[cols_key] <= cols
            if depth <= 32:
                assert c.kwargs["BLOCK_K"] <= depth
    fma = configs.choosable_configs(candidates, kernel, torch.float32, "ieee", capability, narrow=1600)
    assert set(map(str, fma)) == set(map(str, configs.choosable_configs(candidates, kernel, torch.float32, "ieee",
                                                                         capability)))
    unaligned = configs.choosable_configs(candidates, kernel, dtype, precision, capability, aligned=False, narrow=16)
    lists = configs._GEMM if kernel == "fwd" else configs._GEMM_DW
    assert all(c in lists["unaligned"] for c in unaligned)
