"""Token-choice top-k: per token the indices of its ``k`` largest logits, descending, ties to the lower index.

One program per block of ``BLOCK_N`` tokens holds their rows (``BLOCK_E >= E`` columns) in registers and takes
``k`` rounds of a row maximum: each round's winner is the lowest untaken column holding the maximum of the untaken
ones, so ties resolve to the lower expert and the output is in descending order. NaN logits (possible only
unchecked) count as ``-inf``. Every store is masked to its row and its ``k`` columns.

Two entry points share those rounds:

* :func:`token_topk_triton` - the indices only (``_token_topk_kernel``);
* :func:`token_choice_plan_triton` - the fused routing of a token-choice layer in two launches and two device
  scans: ``_token_choice_plan_kernel`` (per token block: the top-k, the softmax gates over the ``k`` chosen
  logits, the block's row of an ``[blocks, E]`` histogram and each pair's rank among the block's pairs of its
  expert) -> ``cumsum`` over experts (``offsets``) and over blocks (each block's first slot per expert) ->
  ``_token_choice_place_kernel`` (pair ``p = t * k + j`` to ``offsets[e] + base[block, e] + rank``). The result
  is the stable counting sort of the ``N * k`` pairs by expert (:func:`~sparsemm_kernels.plan.group_plan` of
  ``expert_idx.reshape(-1)``, bit for bit) with no atomics and no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import on_first_tensor_device


@triton.jit
def _load_logit_rows(logits_ptr, rows, cols, N, E, stride_n, stride_e):
    """``[BLOCK_N, BLOCK_E]`` float32 logits of ``rows``; NaN and out-of-range entries as ``-inf``."""
    inb = (rows < N)[:, None] & (cols < E)[None, :]
    # int64 columns: with a transposed (expert-major) input, column * stride passes 2^31 at ~8M tokens.
    x = tl.load(logits_ptr + rows[:, None] * stride_n + cols[None, :].to(tl.int64) * stride_e, mask=inb,
                other=float("-inf")).to(tl.float32)
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _next_best(x, taken, cols, BLOCK_E: tl.constexpr):
    """One round of the top-k: per row the maximum of the untaken columns and the lowest column holding it."""
    free = tl.where(taken, float("-inf"), x)
    best = tl.max(free, axis=1)
    hit = (free == best[:, None]) & ~taken
    pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # the lowest index among the ties
    return best, pick


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
    x = _load_logit_rows(logits_ptr, rows, cols, N, E, stride_n, stride_e)
    taken = (cols[None, :] >= E) & (rows[:, None] >= 0)  # [BLOCK_N, BLOCK_E]; padding columns are never chosen
    for j in range(0, K):
        _, pick = _next_best(x, taken, cols, BLOCK_E)
        tl.store(out_ptr + rows * stride_o + j, pick.to(tl.int64), mask=rows < N)
        taken = taken | (cols[None, :] == pick[:, None])


@triton.jit
def _token_choice_plan_kernel(
    logits_ptr, idx_ptr, gates_ptr, rank_ptr, hist_ptr,
    N, E, K,
    stride_n, stride_e,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per token block ``b`` (pair ``p = t * K + j``, all outputs contiguous)::

        idx[p]   = the j-th best expert of token t         (as _token_topk_kernel)
        gates[p] = exp(x[t, idx[p]] - m_t) / sum_j' exp(x[t, idx[t, j']] - m_t),  m_t = x[t, idx[t, 0]]  (float32)
        hist[b, e] = #{t in block b : e among idx[t, :]}
        rank[p]  = #{t' < t in block b : idx[p] among idx[t', :]}   (a token's k experts are distinct)

    Grid: (cdiv(N, BLOCK_N),).
    """
    blk = tl.program_id(0).to(tl.int64)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    live = rows < N
    x = _load_logit_rows(logits_ptr, rows, cols, N, E, stride_n, stride_e)
    taken = (cols[None, :] >= E) & (rows[:, None] >= 0)
    idx = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    val = tl.full([BLOCK_N, BLOCK_K], float("-inf"), dtype=tl.float32)  # padding columns weigh exp(-inf) = 0
    for j in range(0, K):
        best, pick = _next_best(x, taken, cols, BLOCK_E)
        idx = tl.where(ks[None, :] == j, pick[:, None], idx)
        val = tl.where(ks[None, :] == j, best[:, None], val)
        taken = taken | (cols[None, :] == pick[:, None])
    # The softmax's shift is the row maximum (round 0); rows past N get 0 and 1 so that no lane computes NaN.
    top = tl.where(live, tl.max(val, axis=1), 0.0)
    w = tl.exp(val - top[:, None])
    gates = w / tl.where(live, tl.sum(w, axis=1), 1.0)[:, None]
    chosen = (taken & (cols[None, :] < E) & live[:, None]).to(tl.int32)  # one-hot of each live token's k experts
    tl.store(hist_ptr + blk * E + cols, tl.sum(chosen, axis=0), mask=cols < E)
    earlier = tl.cumsum(chosen, axis=0) - chosen  # [t, e]: tokens before t in the block that chose e
    rank = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in range(0, K):
        pick = tl.sum(tl.where(ks[None, :] == j, idx, 0), axis=1)
        r = tl.sum(tl.where(cols[None, :] == pick[:, None], earlier, 0), axis=1)
        rank = tl.where(ks[None, :] == j, r[:, None], rank)
    pairs = rows[:, None] * K + ks[None, :]  # int64: N * K may pass 2^31
    pmask = live[:, None] & (ks[None, :] < K)
    tl.store(idx_ptr + pairs, idx.to(tl.int64), mask=pmask)
    tl.store(gates_ptr + pairs, gates, mask=pmask)
    tl.store(rank_ptr + pairs, rank.to(tl.int64), mask=pmask)


@triton.jit
def _token_choice_place_kernel(
    idx_ptr, base_ptr, pos_ptr, sorted_to_orig_ptr, slots_ptr,
    N, E, K, P,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per token block ``b``: ``pos[p] = base[b, idx[p]] + pos[p]`` (``pos`` holds the rank on entry),
    ``sorted_to_orig[pos[p]] = p`` and ``slots[pos[p]] = t``, with ``base[b, e]`` the first sorted slot of block
    ``b``'s pairs of expert ``e``; ``P = N * K`` bounds every slot written. Grid: (cdiv(N, BLOCK_N),), the blocks
    of ``_token_choice_plan_kernel``."""
    blk = tl.program_id(0).to(tl.int64)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    pairs = rows[:, None] * K + ks[None, :]
    pmask = (rows < N)[:, None] & (ks[None, :] < K)
    e = tl.load(idx_ptr + pairs, mask=pmask, other=0)
    e = tl.minimum(tl.maximum(e, 0), E - 1)  # the first kernel's ids are in range: this only bounds the gather
    pos = tl.load(base_ptr + blk * E + e, mask=pmask, other=0) + tl.load(pos_ptr + pairs, mask=pmask, other=0)
    smask = pmask & (pos >= 0) & (pos < P)
    tl.store(pos_ptr + pairs, pos, mask=pmask)
    tl.store(sorted_to_orig_ptr + pos, pairs, mask=smask)
    tl.store(slots_ptr + pos, rows[:, None] + tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int64), mask=smask)


MAX_EXPERTS = 4096  # a row lives in registers: past this the torch sort is the better plan


def _blocks(E: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_E)``: a token block's ``BLOCK_N x BLOCK_E`` tile of logits near 4K elements."""
    block_e = max(triton.next_power_of_2(E), 16)
    return max(1, min(64, 4096 // block_e)), block_e


@on_first_tensor_device
def token_topk_triton(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` int64 of ``logits [N, E]`` (float16/bfloat16/float32, any strides), ``1 <= k <= E``."""
    N, E = logits.shape
    out = torch.empty(N, k, device=logits.device, dtype=torch.int64)
    if N == 0:
        return out
    if E > MAX_EXPERTS:
        raise ValueError(f"the triton token top-k holds at most {MAX_EXPERTS} experts in a row, got {E}")
    block_n, block_e = _blocks(E)
    _token_topk_kernel[(triton.cdiv(N, block_n),)](
        logits, out, N, E, k, logits.stride(0), logits.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_E=block_e, num_warps=4,
    )
    return out


@on_first_tensor_device
def token_choice_plan_triton(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The fused token-choice routing and plan of ``logits [N, E]`` (float16/bfloat16/float32, any strides).

    Returns, all on ``logits.device``: ``expert_idx [N, k]`` int64 (descending, ties to the lower expert),
    ``gates [N, k]`` float32 (softmax over the ``k`` chosen logits), and the plan of the ``N * k`` pairs
    ``p = t * k + j`` sorted stably by expert: ``sorted_to_orig [N * k]``, ``slots [N * k]`` (the token of each
    sorted pair), ``counts [E]``, ``offsets [E + 1]``, ``orig_to_sorted [N * k]``, int64.
    """
    N, E = logits.shape
    dev = logits.device
    idx = torch.empty(N, k, device=dev, dtype=torch.int64)
    gates = torch.empty(N, k, device=dev, dtype=torch.float32)
    sorted_to_orig = torch.empty(N * k, device=dev, dtype=torch.int64)
    slots = torch.empty(N * k, device=dev, dtype=torch.int64)
    orig_to_sorted = torch.empty(N * k, device=dev, dtype=torch.int64)
    offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
    if N == 0:
        return idx, gates, sorted_to_orig, slots, torch.zeros(E, device=dev, dtype=torch.int64), offsets, \
            orig_to_sorted
    if E > MAX_EXPERTS:
        raise ValueError(f"the triton token-choice plan holds at most {MAX_EXPERTS} experts in a row, got {E}")
    block_n, block_e = _blocks(E)
    block_k = triton.next_power_of_2(k)
    blocks = triton.cdiv(N, block_n)
    hist = torch.empty(blocks, E, device=dev, dtype=torch.int32)  # one row per program: no atomics
    _token_choice_plan_kernel[(blocks,)](
        # inputs; outputs (rank into orig_to_sorted, finished by the second kernel); histogram
        logits, idx, gates, orig_to_sorted, hist,
        # sizes, strides
        N, E, k, logits.stride(0), logits.stride(1),
        BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=4,
    )
    counts = hist.sum(0)  # int64
    torch.cumsum(counts, 0, out=offsets[1:])
    base = hist.cumsum(0) - hist + offsets[:-1]  # int64 [blocks, E]: block b's first slot of expert e
    _token_choice_place_kernel[(blocks,)](
        idx, base, orig_to_sorted, sorted_to_orig, slots,
        N, E, k, N * k,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return idx, gates, sorted_to_orig, slots, counts, offsets, orig_to_sorted
