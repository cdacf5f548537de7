"""Mutation check: is the test suite as strong as it claims?

Each mutation below is a one-line bug, planted alone in a temporary copy of the repository (the C++ ones are
rebuilt there); the tests that should catch it run against that copy, and the table says which were caught.

    python -m tests.mutation              # every mutation (``make mutate``)
    python -m tests.mutation -k bias      # those whose name contains "bias"
    python -m tests.mutation --list       # names and the bug each plants

The exit status is 1 if any mutation survives (or cannot be planted: its ``old`` text must occur exactly once
in its file, so a refactor that moves the code makes this script fail loudly until the list is updated).
Before the mutants, the selected tests run once on an unmutated copy and must pass (else "caught" would mean
nothing). Not collected by pytest (no ``test_`` prefix); run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "reports",
    ".benchmarks",
)

GEMM = "sparsemm_kernels/kernels/triton/grouped_gemm.py"
NORMS = "sparsemm_kernels/kernels/triton/norms.py"
SWIGLU = "sparsemm_kernels/kernels/triton/swiglu.py"
PLAN = "sparsemm_kernels/kernels/triton/group_plan.py"
CPU = "sparsemm_kernels/kernels/cpu.py"
CXX_GEMM = "csrc/cpu/grouped_gemm.cpp"
CXX_PLAN = "csrc/cpu/group_plan.cpp"
CXX_NORM = "csrc/cpu/group_norm.cpp"
CXX_SWIGLU = "csrc/cpu/swiglu.cpp"

T_GEMM = ["tests/ops/test_grouped_mm.py", "tests/nn/test_mot_linear.py"]
T_CXX_GEMM = ["tests/test_extension.py", "tests/ops/test_grouped_mm.py"]
T_NORMS = ["tests/ops/test_norms.py", "tests/nn/test_norms.py"]
T_CXX_NORM = ["tests/test_cpu_kernels.py", "tests/ops/test_norms.py"]
T_CXX_SWIGLU = ["tests/test_cpu_kernels.py", "tests/ops/test_swiglu.py"]
T_SWIGLU = ["tests/ops/test_swiglu.py", "tests/ops/test_silu_mul.py"]
T_PLAN = ["tests/test_plan.py"]
T_STREAM = ["tests/test_sorted_stream.py"]
T_HOSTILE = ["tests/test_hostile_plans.py"]
OPS_GEMM = "sparsemm_kernels/ops/grouped_linear.py"
OPS_NORMS = "sparsemm_kernels/ops/norms.py"
OPS_PERMUTE = "sparsemm_kernels/ops/permute.py"
OPS_MULTI = "sparsemm_kernels/ops/grouped_linears.py"
OPS_FFN = "sparsemm_kernels/ops/grouped_ffn.py"
T_MULTI = ["tests/ops/test_grouped_linears.py"]
T_FFN = ["tests/ops/test_grouped_ffn.py"]
REF_SWIGLU = "sparsemm_kernels/reference/swiglu.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text; must occur exactly once in `file`
    new: str
    tests: list[str]  # pytest arguments
    why: str

    @property
    def native(self) -> bool:
        return self.file.startswith("csrc/")


MUTATIONS = [
    # ---- several weights as one op (grouped_linears), the FFN as one op, and tensor lists on the eager path ----
    Mutation(
        "multi-bwd-dx-second-weight-dropped", OPS_MULTI,
        "            _sorted_products(d, w, None, bounds, out=dx)", "            pass", T_MULTI,
        "grouped_linears backward: dX holds the first weight's share only",
    ),
    Mutation(
        "sorted-products-add-overwrites", OPS_GEMM,
        "out[s:e].addmm_(a[s:e], wt[g])", "torch.mm(a[s:e], wt[g], out=out[s:e])", T_MULTI,
        "the in-place sum of dX shares overwrites instead of adding",
    ),
    Mutation(
        "multi-scatter-through-the-permutation", OPS_MULTI,
        "    inverse = _inverse(rows)\n", "    inverse = rows\n", T_MULTI,
        "grouped_linears writes token order through sorted_to_orig instead of its inverse",
    ),
    Mutation(
        "multi-bwd-dw-reads-x-unsorted", OPS_MULTI,
        "xs = x.index_select(0, rows) if gather_a and any(need_w) else x", "xs = x", T_MULTI,
        "grouped_linears weight gradient pairs sorted dY rows with token-order x rows",
    ),
    Mutation(
        "multi-unchecked-plan-on-shared-path", OPS_MULTI,
        '== "torch" and mode != OFF and min(x.shape) > 0', '== "torch" and min(x.shape) > 0',
        T_HOSTILE, "grouped_linears reads an unchecked plan's rows unbounded on the torch backend",
    ),
    Mutation(
        "ffn-bwd-dw2-from-up", OPS_FFN,
        "_grouped_gemm_dw(dy, h, offsets,", "_grouped_gemm_dw(dy, up, offsets,", T_FFN,
        "grouped_swiglu_ffn: dW2 from the up projection instead of the activation",
    ),
    Mutation(
        "ffn-bwd-gate-up-grads-swapped", OPS_FFN,
        "[w1, w3], [dgate, dup]", "[w1, w3], [dup, dgate]", T_FFN,
        "grouped_swiglu_ffn: W1 gets the up projection's gradient and W3 the gate's",
    ),
    Mutation(
        "norm-residual-not-added", OPS_NORMS,
        "        y.add_(residual)\n", "        pass\n", T_STREAM,
        "grouped norm with a residual returns the norm alone (the post-norm block loses its skip connection)",
    ),
    Mutation(
        "norm-residual-grad-dropped", OPS_NORMS,
        "(dy if need_dr else None)", "None", T_STREAM,
        "grouped norm: the residual gets no gradient",
    ),
    Mutation(
        "eager-op-tensor-list-not-spread", "sparsemm_kernels/ops/dispatch.py",
        "        if self._tensor_lists:\n", "        if False:\n", ["tests/test_op_contract.py", *T_MULTI],
        "the eager path hands autograd a list: tensors inside it get no gradient",
    ),
    # ---- the op layer of issue 7 and the sorted stream of issue 9: bounds, the torch backend's fast paths ----
    Mutation(
        "triton-gathered-row-unbounded", GEMM,
        "row_mask = row_mask & (rows >= 0) & (rows < T)", "row_mask = row_mask", T_HOSTILE,
        "forward/dX: a row index from a corrupt plan is dereferenced unchecked",
    ),
    Mutation(
        "cxx-plan-no-clamp", CXX_PLAN,
        "return std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(id), 0), num_groups - 1);",
        "return static_cast<int64_t>(id);", T_HOSTILE,
        "C++ plan: an out-of-range id indexes counts and cursors unchecked",
    ),
    Mutation(
        "torch-gemm-bias-dropped", OPS_GEMM,
        "torch.addmm(bias[g], a[s:e], wt[g], out=out[s:e])", "torch.mm(a[s:e], wt[g], out=out[s:e])",
        T_GEMM, "torch backend (the CPU fast path): bias never added",
    ),
    Mutation(
        "torch-dw-empty-group-left-unwritten", OPS_GEMM, "            dw[g].zero_()", "            pass", T_GEMM,
        "torch backend: an empty group's weight gradient left as uninitialised memory",
    ),
    Mutation(
        "torch-grouped-norm-first-weight", OPS_NORMS,
        "torch.mul(x_hat[s:e], weight[g], out=y[s:e])", "torch.mul(x_hat[s:e], weight[0], out=y[s:e])", T_STREAM,
        "torch backend grouped RMSNorm: every slice scaled by group 0's weights",
    ),
    Mutation(
        "permute-backward-not-inverse", OPS_PERMUTE,
        "return permute_rows_op(dy, inverse, index, ctx.mode), None, None, None",
        "return permute_rows_op(dy, index, inverse, ctx.mode), None, None, None", T_STREAM,
        "sort_rows backward permutes the gradient the same way again instead of back",
    ),
    Mutation(
        "silu-mul-torch-bwd-up-grad", REF_SWIGLU,
        "return da.to(gate.dtype), (d * F.silu(a)).to(gate.dtype)", "return da.to(gate.dtype), (d * a).to(gate.dtype)",
        ["tests/ops/test_silu_mul.py"],
        "two-tensor SwiGLU, torch backend: d(up) = dy * gate instead of dy * silu(gate)",
    ),
    Mutation(
        "silu-mul-torch-fast-bwd-up-grad", "sparsemm_kernels/ops/swiglu.py",
        "return dg, F.silu(gate).contiguous().mul_(dy)", "return dg, torch.sigmoid(gate).contiguous().mul_(dy)",
        ["tests/ops/test_silu_mul.py"],
        "two-tensor SwiGLU, torch backend's in-place fp32/fp64 path: d(up) = dy * sigmoid(gate)",
    ),
    Mutation(
        "sorted-stream-bypasses-module-call", "sparsemm_kernels/nn/mot.py",
        "return self.ffn_norm.forward_sorted(self.ffn.forward_sorted(h, plan), plan, residual=h)",
        "return self.ffn_norm.forward_sorted(self.ffn._sorted(h, plan), plan, residual=h)",
        ["tests/test_sorted_stream.py"],
        "the block calls the FFN's sorted path as a method: its hooks (profiler ranges, FSDP unshard) never run",
    ),
    Mutation(
        "ec-route-masked-tokens-eligible", "sparsemm_kernels/ops/routing.py",
        'eligible = s.gather(1, order) > float("-inf")', 'eligible = s.gather(1, order) >= float("-inf")',
        ["tests/ops/test_expert_choice_route.py"],
        "expert-choice routing: masked tokens (score -inf) can fill an expert's slots",
    ),
    Mutation(
        "ec-route-not-ascending", "sparsemm_kernels/ops/routing.py",
        "key = torch.where(eligible, order, N).sort(dim=1).values", "key = torch.where(eligible, order, N)",
        ["tests/ops/test_expert_choice_route.py"],
        "expert-choice routing: each expert's tokens in score order instead of ascending token order",
    ),
    Mutation(
        "ec-triton-ties-take-one-more", "sparsemm_kernels/kernels/triton/routing.py",
        "(equal_rank < take_equal)", "(equal_rank <= take_equal)",
        ["tests/ops/test_expert_choice_route.py"],
        "Triton expert choice: one tie too many at the threshold (an expert takes capacity + 1 tokens)",
    ),
    Mutation(
        "ec-triton-negative-keys-reversed", "sparsemm_kernels/kernels/triton/routing.py",
        "key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)", "key = bits",
        ["tests/ops/test_expert_choice_route.py"],
        "Triton expert choice: negative scores ranked by raw bits (-2 above -1)",
    ),
    Mutation(
        "ec-cpp-ties-to-higher-token", "csrc/cpu/expert_choice.cpp",
        "(a.first == b.first && a.second < b.second)", "(a.first == b.first && a.second > b.second)",
        ["tests/ops/test_expert_choice_route.py"],
        "C++ expert choice: ties at the threshold go to the higher token",
    ),
    Mutation(
        "mod-positions-renumbered", "sparsemm_kernels/nn/mod.py",
        "pos = position_ids.reshape(-1)[tok]", "pos = torch.arange(L, device=x.device).expand(R, L)",
        ["tests/nn/test_mod.py"],
        "Mixture-of-Depths: the selected tokens get positions 0..L-1 (the published bug: rotary and causal "
        "mask see the wrong positions)",
    ),
    Mutation(
        "mod-batch-level-sequences-mixed", "sparsemm_kernels/nn/mod.py",
        "if R == 1 and B > 1:", "if False:",
        ["tests/nn/test_mod.py"],
        "Mixture-of-Depths, batch level: one row of several sequences without the mask that keeps them apart",
    ),
    Mutation(
        "mod-update-not-scaled", "sparsemm_kernels/nn/mod.py",
        "r.reshape(-1)[tok].reshape(R * L), index, B * S",
        "torch.ones_like(r.reshape(-1)[tok].reshape(R * L)), index, B * S",
        ["tests/nn/test_mod.py"],
        "Mixture-of-Depths: the block's output replaces the token unscaled (the router never learns)",
    ),
    Mutation(
        "mod-combine-triton-router-grad-sign", "sparsemm_kernels/kernels/triton/mod_combine.py",
        "acc += tl.where(m_ok, g * (y - x), 0.0)", "acc += tl.where(m_ok, g * (x - y), 0.0)",
        ["tests/ops/test_mod_combine.py"],
        "Triton MoD combine: the router's gradient with the wrong sign",
    ),
    Mutation(
        "mod-combine-torch-padding-writes", "sparsemm_kernels/ops/mod_combine.py",
        "new = torch.where(_real(index, num_real, x.shape[0]), xs + r.to(x.dtype)[:, None] * (y - xs), xs)",
        "new = xs + r.to(x.dtype)[:, None] * (y - xs)",
        ["tests/ops/test_mod_combine.py"],
        "torch MoD combine: padding slots write their update into the row they name",
    ),
    Mutation(
        "tc-route-ties-to-higher-expert", "sparsemm_kernels/ops/token_routing.py",
        "torch.sort(logits, dim=1, descending=True, stable=True)", "torch.sort(logits, dim=1, descending=True)",
        ["tests/ops/test_token_choice_route.py"],
        "token choice (torch): an unstable sort, so tied logits go to any expert",
    ),
    Mutation(
        "tc-triton-ties-to-higher-expert", "sparsemm_kernels/kernels/triton/token_topk.py",
        "pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)",
        "pick = tl.max(tl.where(hit, cols[None, :], -1), axis=1)",
        ["tests/ops/test_token_choice_route.py"],
        "token choice (Triton): ties go to the higher expert index",
    ),
    Mutation(
        "tc-cpp-ascending", "csrc/cpu/token_topk.cpp",
        "return row[a] > row[b] || (row[a] == row[b] && a < b);",
        "return row[a] < row[b] || (row[a] == row[b] && a < b);",
        ["tests/ops/test_token_choice_route.py"],
        "token choice (C++): the k smallest logits instead of the largest",
    ),
    Mutation(
        "tc-plan-triton-inclusive-rank", "sparsemm_kernels/kernels/triton/token_topk.py",
        "earlier = tl.cumsum(chosen, axis=0) - chosen",
        "earlier = tl.cumsum(chosen, axis=0)",
        ["tests/ops/test_token_choice_route.py"],
        "fused token-choice plan (Triton): a pair's rank counts itself, so pairs land one slot late",
    ),
    Mutation(
        "tc-plan-cpp-blocks-share-a-base", "csrc/cpu/token_topk.cpp",
        "hist[b * e_count + e] = run;",
        "hist[b * e_count + e] = offsets[e];",
        ["tests/ops/test_token_choice_route.py"],
        "fused token-choice plan (C++): every token block starts an expert at its offset (blocks overwrite each other)",
    ),
    Mutation(
        "tc-moe-gate-not-applied", "sparsemm_kernels/nn/token_choice.py",
        "slot_gates = gates.reshape(-1).index_select(0, pairs.sorted_to_orig)\n        out = _experts_swiglu(",
        "slot_gates = gates.reshape(-1)\n        out = _experts_swiglu(",
        ["tests/nn/test_token_choice.py"],
        "token-choice MoE: each row scaled by another pair's gate (gates in pair order, rows in expert order)",
    ),
    Mutation(
        "gemm-torch-aten-offsets-shifted", "sparsemm_kernels/ops/grouped_linear.py",
        "offs=torch.tensor(bounds[1:], dtype=torch.int32)", "offs=torch.tensor(bounds[:-1], dtype=torch.int32)",
        ["tests/ops/test_grouped_mm.py"],
        "torch backend, many groups: torch._grouped_mm given group starts instead of ends",
    ),
    Mutation(
        "avgk-select-descending", "sparsemm_kernels/ops/avgk.py",
        "    return best.sort(dim=1).values", "    return best",
        ["tests/ops/test_avgk.py"],
        "Avg-K: each token's blocks in score order instead of ascending block order",
    ),
    Mutation(
        "avgk-values-misread", "sparsemm_kernels/ops/avgk.py",
        "w_out.view(d, n_blocks, g).permute(1, 0, 2)", "w_out.view(n_blocks, d, g)",
        ["tests/ops/test_avgk.py"],
        "Avg-K: block b's values read as a contiguous slab of w_out instead of its g columns",
    ),
    Mutation(
        "avgk-auto-boundary", "sparsemm_kernels/ops/avgk.py",
        "num_tokens * top_k < below * n_blocks", "num_tokens * top_k <= below * n_blocks",
        ["tests/ops/test_avgk.py"],
        "Avg-K auto: the gathered strategy also at exactly GATHERED_BELOW pairs per block",
    ),
    Mutation(
        "avgk-select-triton-ties-to-higher-block", "sparsemm_kernels/kernels/triton/avgk_select.py",
        "((tl.cumsum(equal, 1) - equal) < take_equal[:, None])",
        "((tl.sum(equal, 1)[:, None] - tl.cumsum(equal, 1)) < take_equal[:, None])",
        ["tests/ops/test_avgk.py"],
        "Avg-K selection (Triton): ties at the threshold go to the higher blocks",
    ),
    Mutation(
        "block-wgrad-triton-trusts-the-plan", "sparsemm_kernels/kernels/triton/block_gather.py",
        "pmask = pmask & (tl.load(blocks_ptr + pair, mask=pmask, other=-1) == b)", "pmask = pmask",
        ["tests/ops/test_block_gather.py"],
        "gathered weight gradient (Triton): a pair whose id is out of range lands in the block the plan put it in",
    ),
    Mutation(
        "block-gather-triton-bias-rows", "sparsemm_kernels/kernels/triton/block_gather.py",
        "out += tl.load(bias_ptr + rows, mask=rmask", "out += tl.load(bias_ptr + offs_i, mask=rmask",
        ["tests/ops/test_block_gather.py"],
        "gathered product (Triton): every block adds the bias of block 0",
    ),
    Mutation(
        "block-scatter-torch-unmasked", "sparsemm_kernels/ops/block_gather.py",
        "hm = (h * ok[..., None].to(h.dtype)).reshape(N, 1, k * g)", "hm = h.reshape(N, 1, k * g)",
        ["tests/ops/test_block_gather.py"],
        "gathered scatter (torch): an out-of-range block id adds block 0's rows instead of nothing",
    ),
    Mutation(
        "slots-combine-drops-last-expert", "sparsemm_kernels/ops/slots.py",
        "for k in range(inverse.shape[1]):", "for k in range(inverse.shape[1] - 1):",
        ["tests/nn/test_moe.py"],
        "expert-choice combine: the last expert's slots never reach their tokens (and dX misses them)",
    ),
    Mutation(
        "moma-capacity-from-all-tokens", "sparsemm_kernels/nn/moe.py",
        "return torch.minimum(cap.clamp(min=1), b)",
        "return torch.full_like(b, b.shape[0]) * 0 + b.sum()",
        ["tests/nn/test_moma.py"],
        "MoMa: every expert's capacity from all the tokens instead of C_m from its group's b_m",
    ),
    # ---- the seven of issue 8 ----
    Mutation(
        "triton-bias-row-stride-is-J", GEMM,
        "bias_ptr + g.to(tl.int64) * stride_bias_g +", "bias_ptr + g.to(tl.int64) * J +", T_GEMM,
        "forward bias: group g's row assumed at g * J (a contiguous bias)",
    ),
    Mutation(
        "triton-bias-col-stride-ignored", GEMM,
        "+ offs_j * stride_bias_j, mask=j_mask", "+ offs_j, mask=j_mask", T_GEMM,
        "the strided-bias bug of issue 8: bias.stride(1) ignored",
    ),
    Mutation(
        "triton-dw-acc-rounded-per-tile", GEMM,
        "acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)",
        "acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION).to(dy_ptr.dtype.element_ty).to(tl.float32)",
        T_GEMM, "dW accumulator rounded to the input dtype after every row step",
    ),
    Mutation(
        "norm-dw-partials-cast-before-sum", NORMS,
        "dw = dw_part[:, :M].sum(0).to(weight.dtype)", "dw = dw_part[:, :M].to(weight.dtype).sum(0).to(weight.dtype)",
        T_NORMS, "per-program dW partials rounded to the weight dtype before their sum",
    ),
    Mutation(
        "triton-fwd-row-mask-le", GEMM,
        "row_mask = offs_m < group_end\n    if SCATTER_C:", "row_mask = offs_m <= group_end\n    if SCATTER_C:",
        # The guard tests catch it with an assertion; the rest of the file would first write past the end of a
        # fresh output and abort the process (also "caught", but by luck of the allocator).
        ["tests/ops/test_grouped_mm.py::test_launcher_writes_only_its_rows",
         "tests/ops/test_grouped_mm.py::test_routed_rows_past_the_end_are_never_read"],
        "forward/dX row mask admits one row past the group",
    ),
    Mutation(
        "cxx-pack-drops-column-offset", CXX_GEMM,
        "bg[k * p.b_stride_k + (j0 + j) * p.b_stride_j]", "bg[k * p.b_stride_k + j * p.b_stride_j]", T_CXX_GEMM,
        "C++ forward packs every 128-column block from column 0",
    ),
    Mutation(
        "norm-fwd-drops-eps", NORMS,
        "rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)", "rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D)", T_NORMS,
        "eps left out of the forward's variance",
    ),
    # ---- one or more per kernel ----
    Mutation(
        "plan-drops-last-partial-chunk", PLAN,
        "chunks = triton.cdiv(n, block)", "chunks = n // block", T_PLAN,
        "triton plan: histogram/scatter grid misses the last partial chunk of ids",
    ),
    Mutation(
        "plan-scatter-unstable", PLAN,
        "rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - onehot), 1)",
        "rank = tl.sum(onehot * (tl.sum(onehot, 0)[None, :] - tl.cumsum(onehot, 0)), 1)", T_PLAN,
        "triton plan: rows of a group placed in reverse order inside a chunk (not stable)",
    ),
    Mutation(
        "plan-pairwise-rank-unstable", PLAN,
        "(lanes[None, :] < lanes[:, None])", "(lanes[None, :] > lanes[:, None])", T_PLAN,
        "triton plan, many-groups path: a row ranked after the later rows of its group (not stable)",
    ),
    Mutation(
        "triton-swizzle-full-last-band", GEMM,
        "band_m = tl.minimum(num_m_tiles - first_m, GROUP_M)", "band_m = GROUP_M", T_GEMM,
        "forward: the last, partial band of row tiles is walked as if full (tiles skipped)",
    ),
    Mutation(
        "triton-dx-assumes-contiguous-w", GEMM,
        "w.shape[1], w.shape[2], w.stride(1), w.stride(2)", "w.shape[1], w.shape[2], w.stride(1), 1", T_GEMM,
        "dX launcher assumes W's last stride is 1",
    ),
    Mutation(
        "dx-routed-not-scattered", "sparsemm_kernels/ops/grouped_linear.py",
        "rows, sc, ga, not ctx.transpose_w, mode, backend)",
        "rows, sc, False, not ctx.transpose_w, mode, backend)", T_GEMM,
        "routed dX left in sorted order",
    ),
    Mutation(
        "triton-dbias-last-step-only", GEMM,
        "dbias += tl.sum(dy_t.to(tl.float32), 1)", "dbias = tl.sum(dy_t.to(tl.float32), 1)", T_GEMM,
        "dW kernel: db keeps only the last row step",
    ),
    Mutation(
        "triton-dw-x-col-stride-ignored", GEMM,
        "x = tl.load(x_ptr + r_x[:, None] * stride_xm + offs_k[None, :] * stride_xk,",
        "x = tl.load(x_ptr + r_x[:, None] * stride_xm + offs_k[None, :],", T_GEMM,
        "dW kernel reads x as if its columns were contiguous",
    ),
    Mutation(
        "cxx-bias-assumes-unit-col-stride", CPU,
        "bias = _unit_col_stride(bias)", "bias = bias", T_CXX_GEMM,
        "C++ launcher hands a column-strided bias to a kernel that reads rows contiguously",
    ),
    Mutation(
        "cxx-dw-drops-last-row-of-block", CXX_GEMM,
        "const int64_t re = std::min(rb + kDwRowBlock, offsets[g + 1]);",
        "const int64_t re = std::min(rb + kDwRowBlock - 1, offsets[g + 1]);", T_CXX_GEMM,
        "C++ dW skips the last row of every 256-row block",
    ),
    Mutation(
        "cxx-plan-unstable", CXX_PLAN,
        "for (int64_t i = 0; i < n; ++i) sorted_to_orig[",
        "for (int64_t i = n - 1; i >= 0; --i) sorted_to_orig[", ["tests/test_extension.py", *T_PLAN],
        "C++ plan places rows in reverse (not stable)",
    ),
    Mutation(
        "norm-bwd-mean-over-block", NORMS,
        "c1 = tl.sum(g * x_hat, 1) / D", "c1 = tl.sum(g * x_hat, 1) / BLOCK_D", T_NORMS,
        "norm backward divides by the padded block width",
    ),
    Mutation(
        "norm-bwd-dy-col-stride-ignored", NORMS,
        "head[:, None] * stride_dyh + cols[None, :] * stride_dyd,", "head[:, None] * stride_dyh + cols[None, :],",
        T_NORMS, "norm backward reads dy as if its last dim were contiguous",
    ),
    Mutation(
        "swiglu-fwd-assumes-contiguous-rows", SWIGLU,
        "a2.stride(0), b2.stride(0), H,", "H, b2.stride(0), H,", T_SWIGLU,
        "swiglu forward ignores the gate's row stride",
    ),
    Mutation(
        "swiglu-bwd-assumes-contiguous-dy", SWIGLU,
        "a2.stride(0), b2.stride(0), d2.stride(0), da2.stride(0)", "a2.stride(0), b2.stride(0), H, da2.stride(0)",
        T_SWIGLU, "swiglu backward ignores dy's row stride",
    ),
    Mutation(
        "swiglu-bwd-silu-derivative-sign", SWIGLU,
        "da = dy * b * s * (1.0 + a * (1.0 - s))", "da = dy * b * s * (1.0 - a * (1.0 - s))", T_SWIGLU,
        "swiglu backward: wrong sign in d silu / da",
    ),
    Mutation(
        "ec-triton-radix-above-counts-the-digit", "sparsemm_kernels/kernels/triton/routing.py",
        "above += tl.sum(tl.where(bins > d, hist, 0), 0)", "above += tl.sum(tl.where(bins >= d, hist, 0), 0)",
        ["tests/ops/test_expert_choice_route.py"],
        "expert-choice radix select counts the threshold digit's tokens as above it (too few ties taken)",
    ),
    Mutation(
        "norm-bwd-chunks-recomputed-from-m", NORMS,
        "R, D, M, rows_per_program, chunks,", "R, D, M, rows_per_program, triton.cdiv(M, m_block),", T_NORMS,
        "norm backward decodes program ids with cdiv(M, M_BLOCK) chunks while a dx-only launch has one",
    ),
    Mutation(
        "avgk-fallback-scores-in-16-bit", "sparsemm_kernels/ops/avgk.py",
        "    acc = accumulation_dtype(x.dtype)\n", "    acc = x.dtype\n", ["tests/ops/test_avgk.py"],
        "Avg-K GEMM + top-k path ranks scores rounded to bf16 (ties differ from the fused kernel)",
    ),
    Mutation(
        "mod-combine-targets-rows-past-t", "sparsemm_kernels/ops/mod_combine.py",
        "real = (index >= 0) & (index < min(num_real, num_rows))", "real = (index >= 0) & (index < num_real)",
        ["tests/ops/test_mod_combine.py"],
        "mod_combine (kernel path) writes a slot for an index past the rows",
    ),
    Mutation(
        "cpp-norm-eps-dropped", CXX_NORM,
        "const T rstd = T(1) / std::sqrt(ss * inv_d + T(eps));", "const T rstd = T(1) / std::sqrt(ss * inv_d);",
        T_CXX_NORM, "C++ norms: eps left out of the statistics",
    ),
    Mutation(
        "cpp-norm-layer-dx-mean-term-dropped", CXX_NORM,
        "c2 = p.is_rms ? T(0) : c2 * inv_d;", "c2 = T(0);", T_CXX_NORM,
        "C++ LayerNorm backward forgets the mean of dy w",
    ),
    Mutation(
        "cpp-norm-last-chunk-dropped", CXX_NORM,
        "if (touched[c * G + g]) s += part[c * G * D + i];",
        "if (touched[c * G + g] && c + 1 < chunks) s += part[c * G * D + i];", T_CXX_NORM,
        "C++ norm weight gradient leaves out the last chunk of rows",
    ),
    Mutation(
        "cpp-norm-boundary-row-to-next-group", CXX_NORM,
        "std::upper_bound(offsets + 1, offsets + groups + 1, r)",
        "std::lower_bound(offsets + 1, offsets + groups + 1, r)", T_CXX_NORM,
        "C++ grouped norm: the last row of a group uses the next group's weights",
    ),
    Mutation(
        "cpp-swiglu-negative-sigmoid", CXX_SWIGLU,
        "return x >= 0.0f ? r : e * r;", "return r;", T_CXX_SWIGLU,
        "C++ SwiGLU (float32): sigmoid of a negative gate computed as of its absolute value",
    ),
    Mutation(
        "cpp-swiglu-task-last-row-skipped", CXX_SWIGLU,
        "for (int64_t r = r0; r < std::min(rows, r0 + rows_per_task); ++r)",
        "for (int64_t r = r0; r + 1 < std::min(rows, r0 + rows_per_task); ++r)", T_CXX_SWIGLU,
        "C++ SwiGLU leaves the last row of every task unwritten",
    ),
    Mutation(
        "cpp-swiglu-dgate-derivative-of-sigmoid-dropped", CXX_SWIGLU,
        "dg[i] = d * u[i] * s * (T(1) + g[i] * (T(1) - s));", "dg[i] = d * u[i] * s;", T_CXX_SWIGLU,
        "C++ SwiGLU backward treats the sigmoid as a constant",
    ),
    Mutation(
        "cpu-norm-unchecked-offsets-unsanitized", OPS_NORMS,
        "return group_norm_fwd_cpu(x, weight, bias, eps, is_rms, offsets=_read_offsets(offsets, x.shape[0], mode))",
        "return group_norm_fwd_cpu(x, weight, bias, eps, is_rms, offsets=offsets)", T_HOSTILE,
        "cpu grouped norm: unchecked bad offsets reach the C++ kernel as they are (it refuses them)",
    ),
]


def check_planted(mutations) -> list[str]:
    """Problems with the list itself: old text missing or ambiguous."""
    problems = []
    for m in mutations:
        text = (ROOT / m.file).read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.name}: {m.old!r} occurs {count} times in {m.file} (must be exactly once)")
    return problems


def _copy_tree(dest: Path) -> Path:
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORE)
    return repo


def _build_extension(repo: Path) -> tuple[bool, str]:
    for so in (repo / "sparsemm_kernels").glob("_C*.so"):
        so.unlink()
    env = dict(os.environ, SPARSEMM_BUILD_CUDA="0")
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=repo, env=env, capture_output=True, text=True
    )
    return proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _extension_path(repo: Path) -> str:
    """Where ``sparsemm_kernels._C`` is loaded from in ``repo`` ("" if it does not load)."""
    code = "import sparsemm_kernels._ext as e; m = e.load(); print(m.__file__ if m else '')"
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    return proc.stdout.strip()


def _run_tests(repo: Path, tests: list[str], timeout: float, require_ext: bool) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome is "passed", "failed", "crashed", "timeout" or "error".

    ``require_ext``: the unmutated baseline must load the copy's extension; mutants run without that session
    check (conftest's smoke call of _C would otherwise catch a C++ mutant before any test names it).
    """
    env = dict(os.environ, PYTHONPATH=str(repo), TRITON_INTERPRET="1", SPARSEMM_REQUIRE_EXT=str(int(require_ext)))
    env.pop("SPARSEMM_TOL_LOG", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    if proc.returncode == 0:
        return "passed", "", seconds
    if proc.returncode == 1:
        return "failed", failed[0] if failed else out.strip().splitlines()[-1], seconds
    if proc.returncode < 0 or proc.returncode > 5:
        return "crashed", f"exit status {proc.returncode}", seconds
    tail = out.strip().splitlines()[-3:] if out.strip() else ["(no output)"]
    return "error", f"pytest exit status {proc.returncode}: " + " | ".join(tail), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run only mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.file:48s} {m.why}")
        return 0
    problems = check_planted(chosen)
    if problems:
        print("the mutation list is out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if not chosen:
        print(f"no mutation matches -k {args.k!r}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="sparsemm-mutate-") as tmp:
        base = _copy_tree(Path(tmp) / "base")
        ok, log = _build_extension(base)
        if not ok:
            print("cannot build the extension in the unmutated copy:\n" + log, file=sys.stderr)
            return 2
        selections = sorted({tuple(m.tests) for m in chosen})
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = pool.map(lambda t: (t, *_run_tests(base, list(t), args.timeout, require_ext=True)), selections)
            for tests, outcome, detail, seconds in runs:
                print(f"baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s) {detail}", flush=True)
                if outcome != "passed":
                    print("the unmutated tests must pass before mutants mean anything", file=sys.stderr)
                    return 2

        so = next((base / "sparsemm_kernels").glob("_C*.so"))

        def one(m: Mutation):
            work = Path(tmp) / m.name
            repo = _copy_tree(work)
            path = repo / m.file
            path.write_text(path.read_text().replace(m.old, m.new, 1))
            try:
                if m.native:
                    ok, log = _build_extension(repo)
                    if not ok:
                        return m, "error", "rebuild failed: " + log.strip().splitlines()[-1], 0.0
                else:
                    shutil.copy2(so, repo / "sparsemm_kernels" / so.name)
                loaded = _extension_path(repo)
                if not loaded.startswith(str(repo)):
                    return m, "error", f"the copy loads _C from {loaded or 'nowhere'}, not its own", 0.0
                outcome, detail, seconds = _run_tests(repo, m.tests, args.timeout, require_ext=False)
                return m, outcome, detail, seconds
            finally:
                shutil.rmtree(work, ignore_errors=True)

        by_name = {}
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for m, outcome, detail, seconds in pool.map(one, chosen):
                by_name[m.name] = (m, outcome, detail, seconds)
                print(f"{m.name:38s} {_verdict(outcome):9s} {seconds:5.0f} s  {detail}", flush=True)
        rows = [by_name[m.name] for m in chosen]

    print()
    print(f"{'mutation':38s} {'result':9s} {'time':>6s}  caught by / detail")
    print("-" * 110)
    for m, outcome, detail, seconds in rows:
        print(f"{m.name:38s} {_verdict(outcome):9s} {seconds:5.0f} s  {detail}")
    survived = [m.name for m, outcome, _, _ in rows if _verdict(outcome) != "caught"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} caught" + (f"; NOT caught: {', '.join(survived)}" if survived
                                                                 else ""))
    return 1 if survived else 0


def _verdict(outcome: str) -> str:
    return {"failed": "caught", "crashed": "caught", "timeout": "caught", "passed": "SURVIVED"}.get(outcome, "ERROR")


if __name__ == "__main__":
    sys.exit(main())
