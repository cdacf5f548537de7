"""Expert-choice routing as a segmented top-k: one program per expert writes its row of the plan.

Expert ``e`` takes the ``need_e = min(capacity, N, limit[e])`` eligible tokens ranked highest by (score
descending, token ascending). The program never sorts: scores map to order-preserving keys, a radix select finds
the threshold key ``T`` of the last token taken - four passes over the expert's scores, each a 256-bin histogram
of the next 8 key bits among the tokens that share the bits chosen so far - and one compaction pass in token order
writes every token with ``key > T``, plus the first ``need_e - #{key > T}`` tokens with ``key == T`` (ties to the
lower token), at positions from a running prefix sum: the row comes out in ascending token order, already the
expert-major plan the grouped GEMM consumes. The rest of the row is ``-1``. The launcher hands the kernel
expert-major scores, so every pass reads contiguous memory. No atomics, no host sync, every store masked to the
row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device

_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _keys(scores_ptr, mask_ptr, offs, e, N, stride_sn, stride_se, stride_mn, stride_me, MASK_MODE: tl.constexpr):
    """``(key, eligible)`` of tokens ``offs`` for expert ``e``: ``key`` an int32 in the order of the float32
    score (``-0.0`` read as ``+0.0``, so equal scores tie), ``eligible`` False past ``N``, for NaN and ``-inf``
    scores and where the mask (per token: ``MASK_MODE`` 1, per token and expert: 2) is False."""
    inb = offs < N
    x = tl.load(scores_ptr + offs * stride_sn + e * stride_se, mask=inb, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude -> smaller key
    eligible = inb & (x == x) & (x > float("-inf"))
    if MASK_MODE == 1:
        eligible = eligible & (tl.load(mask_ptr + offs * stride_mn, mask=inb, other=0) != 0)
    if MASK_MODE == 2:
        eligible = eligible & (tl.load(mask_ptr + offs * stride_mn + e * stride_me, mask=inb, other=0) != 0)
    return key, eligible


@triton.jit
def _expert_choice_kernel(
    scores_ptr, mask_ptr, limit_ptr, out_ptr,
    N, C, k,
    stride_sn, stride_se, stride_mn, stride_me, stride_oe,
    MASK_MODE: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[e, :] = expert e's chosen tokens ascending, then -1. Grid: (E,)."""
    e = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)  # int64: a token index times a stride can pass 2^31
    bins = tl.arange(0, 256)
    need = tl.zeros((), tl.int64) + k
    if HAS_LIMIT:
        need = tl.minimum(need, tl.load(limit_ptr + e))
    need = tl.maximum(need, 0)
    # T = the largest key with #{eligible, key >= T} >= need (the smallest key when fewer are eligible), found 8
    # bits at a time from the top on u = key - INT32_MIN in [0, 2^32): per level the largest digit d whose tokens
    # (among those matching the prefix) with digit >= d, plus the tokens already above the prefix, reach need.
    prefix = tl.zeros((), tl.int64)
    above = tl.zeros((), tl.int64)  # eligible tokens whose key is above every key with this prefix
    for level in tl.static_range(4):
        shift = 24 - 8 * level
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, N, BLOCK):
            key, eligible = _keys(scores_ptr, mask_ptr, start + lanes, e, N, stride_sn, stride_se, stride_mn,
                                  stride_me, MASK_MODE)
            u = key.to(tl.int64) - _INT32_MIN
            if level > 0:
                eligible = eligible & ((u >> (shift + 8)) == prefix)
            digit = ((u >> shift) & 255).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=eligible)
        from_top = (tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist).to(tl.int64)  # #{digit >= d}
        d = tl.max(tl.where(above + from_top >= need, bins, 0), 0).to(tl.int64)  # 0 when too few are eligible
        above += tl.sum(tl.where(bins > d, hist, 0), 0).to(tl.int64)
        prefix = prefix * 256 + d
    threshold = prefix + _INT32_MIN
    take_equal = need - above  # ties at the threshold: the lowest tokens first
    written = tl.zeros((), tl.int64)
    equal_seen = tl.zeros((), tl.int64)
    for start in range(0, N, BLOCK):
        offs = start + lanes
        key, eligible = _keys(scores_ptr, mask_ptr, offs, e, N, stride_sn, stride_se, stride_mn, stride_me,
                              MASK_MODE)
        key = key.to(tl.int64)
        equal = (eligible & (key == threshold)).to(tl.int32)
        equal_rank = equal_seen + (tl.cumsum(equal, 0) - equal)
        chosen = (eligible & (key > threshold)) | ((equal != 0) & (equal_rank < take_equal))
        c = chosen.to(tl.int32)
        pos = written + (tl.cumsum(c, 0) - c)
        tl.store(out_ptr + e * stride_oe + pos, offs, mask=chosen & (pos < C))
        written += tl.sum(c, 0)
        equal_seen += tl.sum(equal, 0)
    for start in range(0, C, BLOCK):
        slots = start + lanes
        empty = (slots >= written) & (slots < C)
        tl.store(out_ptr + e * stride_oe + slots, tl.full((BLOCK,), -1, tl.int64), mask=empty)


def _expert_major(t: torch.Tensor) -> torch.Tensor:
    """``t [N, E]`` with each expert's column contiguous (a view of an ``[E, N]`` copy when it is not): the
    kernel's passes then read whole cache lines of one expert instead of one element per row."""
    if t.shape[1] > 1 and t.shape[0] > 1 and t.stride(0) != 1:
        return t.t().contiguous().t()
    return t


@on_first_tensor_device
def expert_choice_indices_triton(
    scores: torch.Tensor, token_mask: torch.Tensor | None, capacity: int, limit: torch.Tensor | None
) -> torch.Tensor:
    """``[E, capacity]`` int64: per expert its ``min(capacity, N, limit[e])`` top tokens by (score descending,
    token ascending), in ascending token order, then ``-1``.

    ``scores [N, E]`` float16/bfloat16/float32, any strides; ``token_mask`` None, ``[N]`` or ``[N, E]`` bool
    (False: never chosen); ``limit`` None or ``[E]`` int64 per-expert caps (on the device). NaN and ``-inf``
    scores are never chosen.
    """
    N, E = scores.shape
    out = torch.empty(E, capacity, device=scores.device, dtype=torch.int64)
    if E == 0 or capacity == 0:
        return out
    scores = _expert_major(scores)
    if token_mask is None:
        mask_mode, mask, smn, sme = 0, scores, 0, 0
    else:
        mask = token_mask.view(torch.uint8) if token_mask.dtype == torch.bool else token_mask
        mask_mode = 1 if mask.dim() == 1 else 2
        if mask_mode == 2:
            mask = _expert_major(mask)
        smn, sme = mask.stride(0), (mask.stride(1) if mask_mode == 2 else 0)
    lim = limit.to(torch.int64).contiguous() if limit is not None else out
    # The interpreter prefers few large blocks; on a GPU 1024 keeps a pass at one load per thread and warp.
    block = min(4096 if is_interpreting() else 1024, max(16, triton.next_power_of_2(max(N, capacity, 1))))
    _expert_choice_kernel[(E,)](
        scores, mask, lim, out, N, capacity, min(capacity, N),
        scores.stride(0), scores.stride(1), smn, sme, out.stride(0),
        MASK_MODE=mask_mode, HAS_LIMIT=limit is not None, BLOCK=block, num_warps=4,
    )
    return out
