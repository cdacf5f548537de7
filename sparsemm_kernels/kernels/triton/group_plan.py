"""Stable counting sort of group ids in two launches: per-chunk histograms, then a stable scatter.

Pipeline: ``_chunk_histogram_kernel`` counts each chunk's ids per group -> an exclusive scan over chunks and
groups (two ``cumsum`` on the device) gives every (chunk, group) its first output slot ->
``_chunk_scatter_kernel`` writes each row to ``slot + rank among earlier rows of its group in the chunk``.
Ranks come from a prefix sum inside the chunk, so the sort is stable and uses no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device


@triton.jit
def _clamped_ids(ids_ptr, offs, n, G):
    """Ids of positions ``offs`` clamped into ``[0, G)`` (the op checks the range; clamping keeps every row in
    the plan, so ``sorted_to_orig`` is fully written whatever the ids); -1 past the end matches no group."""
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=0).to(tl.int64)
    ids = tl.minimum(tl.maximum(ids, 0), G - 1)
    return tl.where(offs < n, ids, -1)


@triton.jit
def _chunk_histogram_kernel(ids_ptr, hist_ptr, n, G, BLOCK: tl.constexpr, G_POW2: tl.constexpr):
    """hist[c, g] = #{i in chunk c : ids[i] == g}. Grid: (cdiv(n, BLOCK),)."""
    c = tl.program_id(0).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    ids = _clamped_ids(ids_ptr, offs, n, G)
    gidx = tl.arange(0, G_POW2)
    onehot = (ids[:, None] == gidx[None, :]).to(tl.int32)
    tl.store(hist_ptr + c * G + gidx, tl.sum(onehot, 0).to(tl.int64), mask=gidx < G)


@triton.jit
def _chunk_scatter_kernel(ids_ptr, base_ptr, out_ptr, n, G, BLOCK: tl.constexpr, G_POW2: tl.constexpr,
                          PAIRWISE: tl.constexpr):
    """out[base[c, ids[i]] + rank_i] = i, rank_i = #{j < i in chunk c : ids[j] == ids[i]}. Grid: (cdiv(n, BLOCK),).

    The rank comes from a ``BLOCK x G_POW2`` one-hot prefix sum, or, with PAIRWISE (chosen when
    ``BLOCK <= G_POW2``: many groups, small chunks), from a ``BLOCK x BLOCK`` comparison of the chunk's ids
    with each other, whose size does not grow with G. ``base`` is gathered at each row's id (int64 only there).
    """
    c = tl.program_id(0).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    ids = _clamped_ids(ids_ptr, offs, n, G)
    if PAIRWISE:
        lanes = tl.arange(0, BLOCK)
        earlier = (ids[None, :] == ids[:, None]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(earlier.to(tl.int32), 1)
    else:
        gidx = tl.arange(0, G_POW2)
        onehot = (ids[:, None] == gidx[None, :]).to(tl.int32)  # int32: a chunk holds far fewer than 2^31 rows
        rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - onehot), 1)
    valid = offs < n
    base = tl.load(base_ptr + c * G + tl.maximum(ids, 0), mask=valid, other=0)
    tl.store(out_ptr + base + rank, offs, mask=valid)


# The one-hot tile of a chunk is BLOCK x next_pow2(G); past this the torch sort is the better plan.
MAX_GROUPS = 4096
#: The (chunks, G) int64 histogram and its scans are held in memory at once: past this many entries (each
#: 8 bytes, three such tensors) the torch sort takes the plan instead.
MAX_HISTOGRAM_ENTRIES = 1 << 23


def _chunk_rows(num_groups: int) -> int:
    """Rows per chunk: the chunk's one-hot tile near 8K elements (the interpreter prefers fewer, larger
    programs)."""
    g_pow2 = max(triton.next_power_of_2(num_groups), 2)
    return max(16, min(1024, (1 << 16 if is_interpreting() else 1 << 13) // g_pow2))


def histogram_fits(n: int, num_groups: int) -> bool:
    """Whether the per-chunk histogram of ``n`` ids over ``num_groups`` groups stays within
    :data:`MAX_HISTOGRAM_ENTRIES` (it grows as ``n * G / chunk rows``: 1M ids over 4096 groups would need 2 GiB)."""
    return triton.cdiv(n, _chunk_rows(num_groups)) * num_groups <= MAX_HISTOGRAM_ENTRIES


@on_first_tensor_device
def group_plan_triton(ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of ``ids (n,)`` int32/int64 into ``num_groups`` groups.

    Returns ``(sorted_to_orig (n,), counts (G,), offsets (G+1,))``, int64, on ``ids.device``. Supports up to
    :data:`MAX_GROUPS` groups, and sizes :func:`histogram_fits` accepts. Ids outside ``[0, G)`` are sorted as the
    nearest valid id.
    """
    n = ids.numel()
    g_pow2 = max(triton.next_power_of_2(num_groups), 2)
    block = _chunk_rows(num_groups)
    chunks = triton.cdiv(n, block)
    sorted_to_orig = torch.empty(n, device=ids.device, dtype=torch.int64)
    if n == 0:
        zeros = torch.zeros(num_groups, device=ids.device, dtype=torch.int64)
        return sorted_to_orig, zeros, torch.zeros(num_groups + 1, device=ids.device, dtype=torch.int64)
    hist = torch.empty((chunks, num_groups), device=ids.device, dtype=torch.int64)
    _chunk_histogram_kernel[(chunks,)](ids, hist, n, num_groups, BLOCK=block, G_POW2=g_pow2)
    counts = hist.sum(0)
    offsets = torch.zeros(num_groups + 1, device=ids.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    base = (hist.cumsum(0) - hist) + offsets[:-1]
    _chunk_scatter_kernel[(chunks,)](ids, base, sorted_to_orig, n, num_groups, BLOCK=block, G_POW2=g_pow2,
                                      PAIRWISE=block <= g_pow2)
    return sorted_to_orig, counts, offsets
