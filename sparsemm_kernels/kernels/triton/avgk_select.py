"""Avg-K block selection in one kernel: the scores ``x . mean_key_b`` and every token's ``k`` best blocks.

One program per tile of ``BLOCK_N`` tokens computes their scores against every block's mean key (``tl.dot`` over
chunks of ``d``, float32 accumulation) into registers (``BLOCK_B >= n_blocks`` columns), maps them to
order-preserving int32 keys, finds each row's threshold key (the k-th best) by a 32-step binary search of counts,
takes the keys above it and the first ties at it (ties go to the lower block), and writes the chosen blocks in
ascending order (a running count of the chosen columns gives each one its place). The
``[N, n_blocks]`` scores never reach memory and nothing is sorted. NaN scores count as ``-inf``. The mean keys come
from the weights of this call (their launcher averages them on the device first: one read of ``w_in``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsemm_kernels.utils.device import is_interpreting, on_first_tensor_device

_INT32_MIN = tl.constexpr(-2147483648)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _avgk_select_kernel(
    x_ptr, mk_ptr, out_ptr,
    N, D, NB, K,
    stride_xn, stride_xd, stride_mb, stride_md, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[t, :] = the K best blocks of token t, ascending. Grid: (cdiv(N, BLOCK_N),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)  # int32: the launcher keeps every key offset below 2^31 (int64 spilled)
    rmask = rows < N
    bmask = cols < NB
    acc = tl.zeros((BLOCK_N, BLOCK_B), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = dd < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd, mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        # The mean keys transposed, (BLOCK_D, BLOCK_B), straight from memory.
        mt = tl.load(mk_ptr + cols[None, :] * stride_mb + dd[:, None] * stride_md,
                     mask=dmask[:, None] & bmask[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; see platform-notes
            xt = xt.to(tl.float32)
            mt = mt.to(tl.float32)
        acc = tl.dot(xt, mt, acc, input_precision=DOT_PRECISION)
    # Order-preserving int32 keys of the scores (NaN as -inf, -0.0 as +0.0), then per row the threshold key T of
    # the k-th best by a binary search over the key range: no sort, and only the keys stay live.
    s = tl.where(acc == acc, acc, float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    real = (cols[None, :] < NB) & (rows[:, None] >= 0)  # padding columns are never chosen
    lo = tl.full((BLOCK_N,), _INT32_MIN, tl.int64)
    hi = tl.full((BLOCK_N,), _INT32_MAX, tl.int64)
    for _ in range(32):  # 2^32 key values: 32 halvings reach one
        mid = lo + (hi - lo + 1) // 2
        # mid lies in the int32 range: compare in int32 (int64 temporaries would double the registers).
        count = tl.sum((real & (key >= mid.to(tl.int32)[:, None])).to(tl.int32), 1)
        enough = count >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    threshold = lo.to(tl.int32)
    above = real & (key > threshold[:, None])
    equal = (real & (key == threshold[:, None])).to(tl.int32)
    take_equal = K - tl.sum(above.to(tl.int32), 1)  # ties at the threshold: the lowest blocks first
    chosen = above | ((equal != 0) & ((tl.cumsum(equal, 1) - equal) < take_equal[:, None]))
    place = tl.cumsum(chosen.to(tl.int32), axis=1) - 1  # ascending: a chosen block's rank among the chosen
    tl.store(out_ptr + rows[:, None] * stride_on + place, (cols[None, :] + 0 * place).to(tl.int64),
             mask=chosen & rmask[:, None] & (place < K))


def max_blocks(dtype: torch.dtype) -> int:
    """The most blocks the kernel takes (a row of scores lives in registers; wider selections go to the GEMM + top-k
    path): 512 for 16-bit inputs, 256 for float32 (its operand tiles are twice as wide). Past these, every tile
    spilled in the AOT check."""
    return 256 if dtype == torch.float32 else 512


def fits(n_blocks: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes ``n_blocks`` mean keys of width ``d``: at most :func:`max_blocks`, and every key
    offset (int32 in the kernel: int64 block indices spilled) below 2^31."""
    return n_blocks <= max_blocks(dtype) and max(triton.next_power_of_2(n_blocks), 16) * max(d, 1) < 2**31


def _dot_precision(dtype: torch.dtype) -> str:
    from sparsemm_kernels.kernels.triton.grouped_gemm import _dot_precision as precision

    return precision(dtype)


def select_tiles(n_blocks: int, precision: str) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_B, BLOCK_D, num_warps)``: all the blocks in a row; a score tile of at most 4096 (2048 for
    full-fp32 dots, FMA loops that hold their operands in registers), at least the 16 token rows a dot needs (8192
    at 512 blocks); about 16 scores a thread (4-16 warps); a mean-key tile of at most 8K elements, 16 rows deep for
    full-fp32 dots. AOT-checked without spills up to :func:`max_blocks`."""
    block_b = max(triton.next_power_of_2(n_blocks), 16)
    block_n = max(16, min(64, (2048 if precision == "ieee" else 4096) // block_b))
    block_d = 16 if precision == "ieee" else max(16, min(64, 8192 // block_b))
    warps = max(4, min(16, block_n * block_b // 512))  # about 16 scores a thread
    return block_n, block_b, block_d, warps


@on_first_tensor_device
def avgk_select_triton(x: torch.Tensor, mean_keys: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` int64, ascending: per row of ``x [N, d]`` the ``k`` blocks with the largest ``x . mean_keys[b]``
    (``mean_keys [n_blocks, d]``, ``n_blocks <= max_blocks(x.dtype)``, cast to ``x``'s dtype), ties to the lower
    block."""
    N, D = x.shape
    NB = mean_keys.shape[0]
    if not fits(NB, D, x.dtype):
        raise ValueError(f"the triton Avg-K selection holds at most {max_blocks(x.dtype)} blocks of {x.dtype} in a "
                         f"row, with (blocks x d) < 2^31, got {NB} x {D}")
    out = torch.empty(N, k, dtype=torch.int64, device=x.device)
    if N == 0:
        return out
    mean_keys = mean_keys.to(x.dtype).contiguous()  # its offsets are then below blocks x d
    precision = _dot_precision(x.dtype)
    block_n, block_b, block_d, warps = select_tiles(NB, precision)
    _avgk_select_kernel[(triton.cdiv(N, block_n),)](
        x, mean_keys, out, N, D, NB, k,
        x.stride(0), x.stride(1), mean_keys.stride(0), mean_keys.stride(1), out.stride(0),
        BLOCK_N=block_n, BLOCK_B=block_b, BLOCK_D=block_d, DOT_PRECISION=precision,
        UPCAST=is_interpreting() and x.dtype == torch.bfloat16, num_warps=warps,
    )
    return out
