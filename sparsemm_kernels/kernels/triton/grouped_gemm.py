"""Grouped GEMM over row groups: forward, dX and dW kernels, with optional gather-on-load / scatter-on-store.

Pipeline: the rows of group ``g`` are the sorted positions ``offsets[g]:offsets[g+1]``. A position ``r``
reads its A row at ``rows[r]`` when gathering (``x`` kept in original token order) and writes its C row at
``rows[r]`` when scattering, so no permuted copy of ``x`` or of the output is ever made.

* ``_group_table_kernel`` (one program) turns ``offsets`` into sanitized group bounds and, for every row-tile
  height, the first row tile of each group: the scan over G happens once per call, on the device.
* ``grouped_gemm``    ``C[r] = A[r] @ B_g + bias_g`` with ``B_g = W[g]^T`` (forward) or ``W[g]`` (dX). Each
  program finds its group by a search of the tile table (``log_256 G`` vector loads, whatever G).
* ``grouped_gemm_dw`` ``dW[g] = dY_g^T @ X_g`` and ``dbias[g] = sum_r dY_g[r]``, a per-group reduction over
  rows. When the dW tiles are fewer than the SMs, the sorted rows are also cut into ``S`` equal chunks and every
  (chunk, group) piece gets its own program; ``_dw_reduce_kernel`` then sums each group's pieces in chunk order.
  No atomics anywhere: every result is bitwise reproducible for a given device and config.

Scheduling without a host sync: the number of row tiles depends on the group sizes, which live on the device.
The forward grid is sized by the bound ``sum_g ceil(c_g / BM) <= (T + G*(BM-1)) // BM``; surplus programs do no
work. The dW grid is ``S + G - 1`` pieces (an upper bound on the non-empty ones) times the dW tiles.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsemm_kernels.kernels.triton import configs as _configs
from sparsemm_kernels.kernels.triton.configs import (
    grouped_gemm_configs,
    grouped_gemm_dw_configs,
    launch_is_aligned,
    narrow_caps,
    prune_grouped_gemm_configs,
    prune_grouped_gemm_dw_configs,
)
from sparsemm_kernels.utils.device import (
    fp32_matmul_allows_tf32,
    is_interpreting,
    on_first_tensor_device,
    placeholder,
)

# Row-tile heights the tile table covers: BLOCK_M = 16 << i for table row i (every config's BLOCK_M is one).
_TABLE_ROWS = 5
_TABLE_CHUNK = 512  # offsets scanned per step of the one-program table kernel
# Lanes of one search step: G <= 256 groups are found with one vector load, 65536 with two.
_MIN_FANOUT = 16
_MAX_FANOUT = 256
# dW: split the rows when fewer dW tiles (at a nominal 128 x 128) than this many times the SM count exist;
# at least this many rows per chunk (fewer make the partial sums cost more than they save).
_DW_NOMINAL_TILE = 128
_DW_MIN_CHUNK_ROWS = 1024
_DW_MAX_SPLIT = 64
_DW_REDUCE_BLOCK = 1024


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _group_table_kernel(offsets_ptr, bounds_ptr, tile_start_ptr, T, G,
                        TILES: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Sanitized group bounds and the first row tile of every group, for every row-tile height.

    ``bounds[0] = 0``, ``bounds[G] = T``, ``bounds[g] = max(bounds[g-1], clamp(offsets[g], 0, T))``: valid
    offsets come back unchanged, and any others (a hand-made plan under ``validate=False``) still split
    ``[0, T)`` into G consecutive groups, so no kernel touches a position outside it (the running maximum of
    ``utils.checks.sanitized_offsets``). With TILES: ``tile_start[i, g] = sum_{h < g} cdiv(bounds[h+1] -
    bounds[h], 16 << i)`` for ``g`` in ``[0, G]`` and ``i < ROWS``.

    Grid: (1,). The program walks the G+1 offsets CHUNK at a time, carrying the running maximum and the tile
    counts from one step to the next (a scan in registers per step).
    """
    lanes = tl.arange(0, CHUNK)
    heights = 16 << tl.arange(0, 8).to(tl.int64)  # table rows (8 lanes; the first ROWS are stored)
    carry_b = tl.zeros((CHUNK,), tl.int64)  # running maximum so far (every lane holds it: a vector carry)
    carry_t = tl.zeros((8,), tl.int64)  # tiles of all groups so far, per height
    for c0 in range(0, G + 1, CHUNK):
        idx = c0 + lanes
        o = tl.load(offsets_ptr + idx, mask=idx <= G, other=0).to(tl.int64)
        o = tl.where(idx == 0, 0, tl.where(idx == G, T, tl.minimum(tl.maximum(o, 0), T)))
        b = tl.maximum(tl.associative_scan(o, 0, _max_combine), carry_b)
        tl.store(bounds_ptr + idx, b, mask=idx <= G)
        if TILES:
            # bounds[g + 1] = max(bounds[g], clamp(offsets[g + 1])): the next bound without a shift.
            o1 = tl.load(offsets_ptr + idx + 1, mask=idx + 1 <= G, other=0).to(tl.int64)
            o1 = tl.where(idx + 1 == G, T, tl.minimum(tl.maximum(o1, 0), T))
            rows = tl.where(idx < G, tl.maximum(b, o1) - b, 0)
            tiles = (rows[:, None] + heights[None, :] - 1) // heights[None, :]
            start = carry_t[None, :] + tl.cumsum(tiles, 0) - tiles
            ptrs = tile_start_ptr + tl.arange(0, 8)[None, :] * (G + 1) + idx[:, None]
            tl.store(ptrs, start.to(tl.int32), mask=(idx[:, None] <= G) & (tl.arange(0, 8) < ROWS)[None, :])
            carry_t += tl.sum(tiles, 0)
        carry_b = tl.zeros((CHUNK,), tl.int64) + tl.max(b, 0)


@triton.jit
def _last_at_most(keys_ptr, n, target, div, KEY_PLUS_INDEX: tl.constexpr,
                  FANOUT: tl.constexpr, STEPS: tl.constexpr, SPAN: tl.constexpr):
    """Largest ``i`` in ``[0, n)`` with ``key(i) <= target``, for non-decreasing keys with ``key(0) <= target``:
    ``key(i) = keys[i]``, or ``keys[i] // div + i`` with KEY_PLUS_INDEX.

    A FANOUT-ary search: each of the STEPS steps loads FANOUT keys ``SPAN / FANOUT^s`` apart and keeps the last
    one not above ``target`` (``SPAN = FANOUT^(STEPS-1)``, ``FANOUT^STEPS >= n``): ``log_FANOUT n`` dependent
    loads, not a load of all n keys.
    """
    lanes = tl.arange(0, FANOUT)
    lo = tl.zeros((), tl.int32)
    sub = SPAN
    for _ in tl.static_range(STEPS):
        idx = lo + lanes * sub
        key = tl.load(keys_ptr + idx, mask=idx < n, other=0)
        if KEY_PLUS_INDEX:
            key = key // div + idx
        below = ((key <= target) & (idx < n)).to(tl.int32)
        lo = lo + (tl.sum(below, 0) - 1) * sub
        sub = sub // FANOUT
    return lo


@triton.autotune(configs=grouped_gemm_configs(),
                 key=["K", "J", "stride_ak", "stride_bk", "GATHER_A", "SCATTER_C", "DOT_PRECISION", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_grouped_gemm_configs})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "TABLE_ROW": lambda args: args["BLOCK_M"].bit_length() - 5,
                    "NARROW": lambda args: narrow_caps(args["J"], args["K"])})
@triton.jit
def _grouped_gemm_kernel(
    # inputs
    a_ptr, b_ptr, bias_ptr, bounds_ptr, tile_start_ptr, rows_ptr,
    # output
    c_ptr,
    # sizes
    T, K, J, G,
    # strides
    stride_am, stride_ak, stride_bg, stride_bk, stride_bj, stride_bias_g, stride_bias_j, stride_cm, stride_cj,
    # modes
    HAS_BIAS: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ALIGNED: tl.constexpr, ARCH: tl.constexpr,
    # group search
    FANOUT: tl.constexpr, STEPS: tl.constexpr, SPAN: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, TABLE_ROW: tl.constexpr,
    # the launch's narrow sides (configs.narrow_caps): unused by the code, it keys the narrow-tile choice per compile
    NARROW: tl.constexpr,
):
    """C[c_r, j] = sum_k A[a_r, k] * B[g, k, j] + bias[g, j] for sorted positions r of group g.

    Group ``g`` is ``[bounds[g], bounds[g+1])`` of the sanitized bounds, and row tile ``t`` belongs to the last
    group whose first tile ``tile_start[TABLE_ROW, g] <= t`` (``_group_table_kernel``). Positions lie in
    ``[0, T)``; a gathered / scattered row ``rows[r]`` outside ``[0, T)`` is masked (its position neither reads
    nor writes), so a corrupt plan never reaches memory outside A, C or ``rows``. ALIGNED and ARCH only key the
    autotuner (16-divisible sizes and strides, see ``configs.launch_is_aligned``; the GPU's compute capability, so
    a config tuned on one GPU of a mixed machine is not reused on another, where it may not fit).

    Grid: (num_row_tiles_bound * cdiv(J, BLOCK_J),), swizzled in GROUP_M row-tile bands for L2 reuse.
    """
    pid = tl.program_id(0)
    # int64: G * (BLOCK_M - 1) passes 2^31 near 2^24 groups (T or G may arrive as a constexpr 1).
    num_m_tiles = tl.minimum(((tl.full((), 0, tl.int64) + G) * (BLOCK_M - 1) + T) // BLOCK_M, T)
    num_j_tiles = tl.cdiv(J, BLOCK_J)
    band = GROUP_M * num_j_tiles
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    tile_m = first_m + (pid % band) % band_m
    tile_j = (pid % band) // band_m

    # The tile's group: a surplus tile (past the last group's tiles) lands on group G-1 past its end.
    starts = tile_start_ptr + TABLE_ROW * (G + 1)
    g = _last_at_most(starts, G, tile_m, 1, False, FANOUT, STEPS, SPAN)
    group_end = tl.load(bounds_ptr + g + 1)
    first_row = tl.load(bounds_ptr + g) + (tile_m - tl.load(starts + g)).to(tl.int64) * BLOCK_M
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_mask = offs_m < group_end
    if GATHER_A or SCATTER_C:
        rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        row_mask = row_mask & (rows >= 0) & (rows < T)
    a_rows = rows if GATHER_A else offs_m

    offs_j = tile_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < J
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # int64: a K stride times K can pass 2^31
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg + offs_k[:, None] * stride_bk + offs_j[None, :] * stride_bj
    # Pointer steps in int64 (BLOCK_K times a K stride can pass 2^31); a stride of 1 arrives as a constexpr.
    a_step = tl.full((), BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full((), BLOCK_K, tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    k_tiles = tl.where(first_row < group_end, tl.cdiv(K, BLOCK_K), 0)
    for kt in range(0, k_tiles):
        if EVEN_K:  # no K mask: the common model sizes are multiples of the tile
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=j_mask[None, :], other=0.0)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & j_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; see platform-notes
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_BIAS:
        bias = tl.load(bias_ptr + g.to(tl.int64) * stride_bias_g + offs_j * stride_bias_j, mask=j_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    # The output rows and their mask are derived again here rather than kept from before the K loop: held
    # across it they are the values ptxas spills first (a few bytes of predicates).
    offs_m = first_row + tl.arange(0, BLOCK_M)
    row_mask = offs_m < group_end
    if SCATTER_C:
        c_rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=-1).to(tl.int64)
        row_mask = (c_rows >= 0) & (c_rows < T)
    else:
        c_rows = offs_m
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_j[None, :] * stride_cj
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_j < J)[None, :])


@triton.autotune(configs=grouped_gemm_dw_configs(),
                 key=["N", "K", "GATHER_DY", "GATHER_X", "HAS_DBIAS", "DOT_PRECISION", "SPLIT", "ALIGNED", "ARCH"],
                 prune_configs_by={"early_config_prune": prune_grouped_gemm_dw_configs})
@triton.heuristics({"NARROW": lambda args: narrow_caps(args["N"], args["K"])})
@triton.jit
def _grouped_gemm_dw_kernel(
    # inputs
    dy_ptr, x_ptr, bounds_ptr, rows_ptr,
    # outputs (the final dW / dbias, or the per-piece fp32 partials with SPLIT)
    dw_ptr, dbias_ptr,
    # sizes
    T, N, K, G, chunk_rows,
    # strides
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwg, stride_dwn, stride_dwk, stride_dbias_g,
    # modes
    GATHER_DY: tl.constexpr, GATHER_X: tl.constexpr, HAS_DBIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, ARCH: tl.constexpr,
    # piece search (SPLIT)
    FANOUT: tl.constexpr, STEPS: tl.constexpr, SPAN: tl.constexpr,
    # tiles
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    # the launch's narrow sides (configs.narrow_caps): unused by the code, it keys the narrow-tile choice per compile
    NARROW: tl.constexpr,
):
    """dW[g, n, k] = sum_r dY[r_dy, n] * X[r_x, k] over the positions r of group g; dbias[g, n] = sum_r dY[r_dy, n],
    with ``r_dy = rows[r]`` when GATHER_DY (dY in original row order) else ``r``, and ``r_x`` likewise.

    Group ``g`` is ``[bounds[g], bounds[g+1])`` (sanitized bounds); a gathered row outside ``[0, T)`` is masked.
    Without SPLIT, program item ``g`` sums all of group g and stores ``dW[g]`` (an empty group stores zeros).
    With SPLIT, the sorted positions are cut into chunks of ``chunk_rows``; item ``i`` is the piece (chunk s,
    group g) with ``s + g = i`` (at most one exists: along the pieces in row order, ``s + g`` grows), found as
    the last g with ``bounds[g] // chunk_rows + g <= i``; it sums the rows of g inside chunk s and stores the
    fp32 partial in slot i (zeros if that piece is empty: no reader looks there). ``_dw_reduce_kernel`` adds
    each group's pieces in chunk order.

    Grid: (items * cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),), items = G, or S + G - 1 with SPLIT (S chunks); the
    programs of one item are adjacent (they read the same rows).
    """
    pid = tl.program_id(0)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(N, BLOCK_N) * num_k_tiles
    item = pid // tiles
    tile_n = (pid % tiles) // num_k_tiles
    tile_k = (pid % tiles) % num_k_tiles
    if SPLIT:
        g = _last_at_most(bounds_ptr, G, item, chunk_rows, True, FANOUT, STEPS, SPAN)
        chunk_lo = (item - g).to(tl.int64) * chunk_rows
        row_start = tl.maximum(tl.load(bounds_ptr + g), chunk_lo)
        row_end = tl.minimum(tl.load(bounds_ptr + g + 1), chunk_lo + chunk_rows)
    else:
        g = item
        row_start = tl.load(bounds_ptr + g)
        row_end = tl.load(bounds_ptr + g + 1)

    offs_n = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (tile_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_mask = offs_n < N
    k_mask = offs_k < K
    lanes = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GATHER_DY or GATHER_X:
        # The row indices of the next step are loaded one step ahead: the data loads of a step then depend
        # only on loop-carried values, so the pipeliner can issue them num_stages - 1 steps early.
        r_next = tl.load(rows_ptr + row_start + lanes, mask=row_start + lanes < row_end, other=-1).to(tl.int64)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + lanes
        row_mask = offs_m < row_end
        if GATHER_DY or GATHER_X:
            r = r_next
            row_mask = row_mask & (r >= 0) & (r < T)
            nxt = offs_m + BLOCK_M
            r_next = tl.load(rows_ptr + nxt, mask=nxt < row_end, other=-1).to(tl.int64)
        r_dy = r if GATHER_DY else offs_m
        r_x = r if GATHER_X else offs_m
        # dY^T as a (BLOCK_N, BLOCK_M) tile straight from memory: a load the pipeliner can stage through shared
        # memory like X (a register transpose of a (BLOCK_M, BLOCK_N) load would not be).
        dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + r_dy[None, :] * stride_dym,
                       mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + r_x[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            dbias += tl.sum(dy_t.to(tl.float32), 1)

    slot = item.to(tl.int64) if SPLIT else g.to(tl.int64)
    dw_ptrs = dw_ptr + slot * stride_dwg + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if HAS_DBIAS:
        if tile_k == 0:
            tl.store(dbias_ptr + slot * stride_dbias_g + offs_n, dbias.to(dbias_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _dw_reduce_kernel(part_ptr, out_ptr, bounds_ptr, L, chunk_rows, stride_out_g, BLOCK: tl.constexpr):
    """out[g, l] = sum_s part[s + g, l] over the chunks s = bounds[g] // chunk_rows ... (bounds[g+1] - 1) //
    chunk_rows that hold rows of group g, in increasing s (a fixed order: bitwise reproducible); zeros for an
    empty group. ``part (S + G - 1, L)`` fp32 contiguous, ``out`` rows of L contiguous elements.

    Grid: (G * cdiv(L, BLOCK),).
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(L, BLOCK)
    g = pid // blocks
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < L
    lo = tl.load(bounds_ptr + g)
    hi = tl.load(bounds_ptr + g + 1)
    s_lo = lo // chunk_rows
    s_hi = tl.where(hi > lo, (hi - 1) // chunk_rows + 1, s_lo)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        acc += tl.load(part_ptr + (s + g) * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + g.to(tl.int64) * stride_out_g + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays full fp32 unless the user allowed TF32 for matmuls, as torch.mm does.
    if dtype == torch.float32 and not is_interpreting() and fp32_matmul_allows_tf32():
        return "tf32"
    return "ieee" if dtype == torch.float32 else "tf32"


def _arch(device: torch.device) -> int:
    """The launch device's compute capability as one int (90 for sm_90; 0 off CUDA): an autotuner key."""
    if device.type != "cuda":
        return 0
    major, minor = _configs.current_capability(device)
    return 10 * major + minor


def _search_shape(n: int) -> dict:
    """Constexprs of ``_last_at_most`` over ``n`` keys: the fewest steps of at most 256 lanes, then the fewest
    lanes (a power of two, at least 16) that cover n."""
    steps = 1
    while _MAX_FANOUT**steps < n:
        steps += 1
    fanout = _MIN_FANOUT
    while fanout**steps < n:
        fanout *= 2
    return {"FANOUT": fanout, "STEPS": steps, "SPAN": fanout ** (steps - 1)}


def _group_table(offsets: torch.Tensor, T: int, G: int, tiles: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bounds (G+1,) int64, tile_start (5, G+1) int32)`` on the device (see ``_group_table_kernel``);
    ``tile_start`` is a placeholder when ``tiles`` is False."""
    bounds = torch.empty(G + 1, device=offsets.device, dtype=torch.int64)
    starts = (torch.empty((_TABLE_ROWS, G + 1), device=offsets.device, dtype=torch.int32) if tiles
              else placeholder(bounds))
    chunk = min(_TABLE_CHUNK, max(triton.next_power_of_2(G + 1), 16))
    _group_table_kernel[(1,)](offsets, bounds, starts, T, G, TILES=tiles, ROWS=_TABLE_ROWS, CHUNK=chunk,
                              num_warps=4)
    return bounds, starts


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    """SMs of the launch device (the AOT tool answers for its target). The interpreter pretends 8, so the CPU
    tests split small dW problems over rows too."""
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dw_row_splits(T: int, G: int, N: int, K: int, sms: int) -> int:
    """Row chunks ``S`` of the weight gradient: 1 while the dW tiles (``G x N x K`` over a nominal 128 x 128
    tile) fill the SMs; otherwise enough chunks for about two programs per SM, each of at least
    ``_DW_MIN_CHUNK_ROWS`` rows (32 in the interpreter), at most ``_DW_MAX_SPLIT``. Depends on sizes only, never on
    the group sizes (no host sync) nor on the config the autotuner picks."""
    tiles = G * triton.cdiv(N, _DW_NOMINAL_TILE) * triton.cdiv(K, _DW_NOMINAL_TILE)
    if tiles >= sms:
        return 1
    min_rows = 32 if is_interpreting() else _DW_MIN_CHUNK_ROWS
    return max(1, min(triton.cdiv(2 * sms, tiles), T // min_rows, _DW_MAX_SPLIT))


@on_first_tensor_device
def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    gather_a: bool = False,
    scatter_c: bool = False,
    transpose_w: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped product of row groups of ``a`` with per-group matrices of ``w``.

    Args:
        a: ``(T, K)`` rows in sorted order, or in original order with ``gather_a`` (read through ``rows``).
        w: ``(G, N, K)`` nn.Linear layout per group. ``transpose_w=False``: ``C = A @ W[g]^T`` (A has K
            columns, C has N). ``transpose_w=True``: ``C = A @ W[g]`` (A has N columns, C has K): the dX pass.
        offsets: ``(G+1,) int64``, group ``g`` is sorted positions ``offsets[g]:offsets[g+1]``, ending at T.
            Values are sanitized on the device (see ``_group_table_kernel``), never trusted. Any G.
        bias: optional ``(G, J)``, any strides, added to group ``g``'s rows.
        rows: ``(T,) int64`` original row of each sorted position (``GroupPlan.sorted_to_orig``); a value
            outside ``[0, T)`` masks its position.
        out: optional ``(T, J)`` buffer written in place (every element is written when ``rows`` is a
            permutation; pass zeros when it may not be).

    Returns:
        ``(T, J)`` in ``a``'s dtype (``J = N``, or ``K`` with ``transpose_w``).
    """
    T = a.shape[0]
    G = w.shape[0]
    if transpose_w:
        K, J, stride_bk, stride_bj = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    else:
        K, J, stride_bk, stride_bj = w.shape[2], w.shape[1], w.stride(2), w.stride(1)
    if out is None:
        out = torch.empty((T, J), device=a.device, dtype=a.dtype)
    if T == 0 or J == 0:
        return out
    if G == 0:  # no group owns a row
        return out.zero_()
    bounds, starts = _group_table(offsets, T, G, tiles=True)
    strides = (a.stride(0), a.stride(1), w.stride(0), stride_bk, stride_bj, out.stride(0), out.stride(1))
    grid = lambda meta: (  # noqa: E731
        min((T + G * (meta["BLOCK_M"] - 1)) // meta["BLOCK_M"], T) * triton.cdiv(J, meta["BLOCK_J"]),
    )
    _grouped_gemm_kernel[grid](
        a, w, bias if bias is not None else placeholder(a), bounds, starts, rows if rows is not None else bounds,
        out,
        T, K, J, G,
        a.stride(0), a.stride(1), w.stride(0), stride_bk, stride_bj,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GATHER_A=gather_a, SCATTER_C=scatter_c,
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=is_interpreting() and a.dtype == torch.bfloat16,
        ALIGNED=launch_is_aligned((a, w, out), (K, J) + strides, (a.stride(1), out.stride(1))),
        ARCH=_arch(a.device), **_search_shape(G),
    )
    return out


@on_first_tensor_device
def grouped_gemm_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    gathered: bool = False,
    compute_dbias: bool = False,
    gather_dy: bool | None = None,
    gather_x: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group weight (and bias) gradients.

    Args:
        dy: ``(T, N)`` output gradient; x: ``(T, K)`` forward input; both in sorted order, or in original
            order read through ``rows`` when ``gathered`` (``gather_dy`` / ``gather_x`` set it per operand).
        offsets: ``(G+1,) int64`` group bounds over sorted positions (sanitized on the device). Any G.

    Returns:
        ``dW (G, N, K)`` and ``dbias (G, N)`` (or None), in ``dy``'s dtype, accumulated in float32.
        Empty groups get exact zeros. Rows are split into :func:`dw_row_splits` chunks when the dW tiles alone
        would leave SMs idle; the pieces are summed in a fixed order.
    """
    G = offsets.shape[0] - 1
    T, N, K = dy.shape[0], dy.shape[1], x.shape[1]
    dw = torch.empty((G, N, K), device=dy.device, dtype=dy.dtype)
    dbias = torch.empty((G, N), device=dy.device, dtype=dy.dtype) if compute_dbias else None
    if G == 0 or N == 0 or K == 0 or T == 0:
        if dbias is not None:
            dbias.zero_()
        return dw.zero_(), dbias
    bounds, _ = _group_table(offsets, T, G, tiles=False)
    splits = dw_row_splits(T, G, N, K, _device_sms(dy.device))
    chunk_rows = triton.cdiv(T, splits)
    if splits > 1:
        items = splits + G - 1
        out = torch.empty((items, N, K), device=dy.device, dtype=torch.float32)
        out_b = torch.empty((items, N), device=dy.device, dtype=torch.float32) if compute_dbias else None
    else:
        items, out, out_b = G, dw, dbias
    grid = lambda meta: (items * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    _grouped_gemm_dw_kernel[grid](
        dy, x, bounds, rows if rows is not None else bounds,
        out, out_b if out_b is not None else placeholder(out),
        T, N, K, G, chunk_rows,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
        out_b.stride(0) if out_b is not None else 0,
        GATHER_DY=gathered if gather_dy is None else gather_dy, GATHER_X=gathered if gather_x is None else gather_x,
        HAS_DBIAS=compute_dbias, SPLIT=splits > 1,
        DOT_PRECISION=_dot_precision(dy.dtype), UPCAST=is_interpreting() and dy.dtype == torch.bfloat16,
        ALIGNED=launch_is_aligned((dy, x), (N, K, dy.stride(0), x.stride(0)), (dy.stride(1), x.stride(1))),
        ARCH=_arch(dy.device), **_search_shape(G),
    )
    if splits > 1:
        for part, final in ((out, dw), (out_b, dbias)):
            if final is not None:
                L = part[0].numel()
                _dw_reduce_kernel[(G * triton.cdiv(L, _DW_REDUCE_BLOCK),)](
                    part, final, bounds, L, chunk_rows, final.stride(0), BLOCK=_DW_REDUCE_BLOCK, num_warps=4,
                )
    return dw, dbias
