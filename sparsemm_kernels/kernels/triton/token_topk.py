"""Token-choice top-k: per token the indices of its ``k`` largest logits, descending, ties to the lower index.

One program per block of ``BLOCK_N`` tokens holds their rows (``BLOCK_E >= E`` columns) in registers and takes
``k`` rounds of a row maximum: each round's winner is the lowest untaken column holding the maximum of the untaken
ones, so ties resolve to the lower expert and the output is in descending order. NaN logits (possible only
unchecked) count as ``-inf``. Every store is masked to its row and its ``k`` columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import on_first_tensor_device


@triton.jit
def _token_topk_kernel(
    logits_ptr, out_ptr,
    N, E, K,
    stride_n, stride_e, stride_o,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[t, j] = the j-th best expert of token t. Grid: (cdiv(N, BLOCK_N),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    inb = (rows < N)[:, None] & (cols < E)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_n + cols[None, :] * stride_e, mask=inb,
                other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))
    taken = (cols[None, :] >= E) & (rows[:, None] >= 0)  # [BLOCK_N, BLOCK_E]; padding columns are never chosen
    for j in range(0, K):
        free = tl.where(taken, float("-inf"), x)
        best = tl.max(free, axis=1)
        hit = (free == best[:, None]) & ~taken
        pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # the lowest index among the ties
        tl.store(out_ptr + rows * stride_o + j, pick.to(tl.int64), mask=rows < N)
        taken = taken | (cols[None, :] == pick[:, None])


MAX_EXPERTS = 4096  # a row lives in registers: past this the torch sort is the better plan


@on_first_tensor_device
def token_topk_triton(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` int64 of ``logits [N, E]`` (float16/bfloat16/float32, any strides), ``1 <= k <= E``."""
    N, E = logits.shape
    out = torch.empty(N, k, device=logits.device, dtype=torch.int64)
    if N == 0:
        return out
    if E > MAX_EXPERTS:
        raise ValueError(f"the triton token top-k holds at most {MAX_EXPERTS} experts in a row, got {E}")
    block_e = max(triton.next_power_of_2(E), 16)
    block_n = max(1, min(64, 4096 // block_e))
    _token_topk_kernel[(triton.cdiv(N, block_n),)](
        logits, out, N, E, k, logits.stride(0), logits.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_E=block_e, num_warps=4,
    )
    return out
