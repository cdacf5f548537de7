"""Avg-K sparse FFN: each token computes only the FFN blocks whose mean key matches it best.

The FFN is a key-value memory: keys = rows of ``w_in [d_ff, d]``, values = columns of ``w_out [d, d_ff]``, cells in
``n_blocks = d_ff / g`` contiguous blocks of ``g``. ``avgk_select``: the mean key of every block from the current
weights, scores ``x . mean_key_b``, each token's ``top_k`` blocks (ties to the lower block), ascending.
``avgk_ffn``: ``y_t = sum_{b in T(x_t)} sum_{i in b} act(x_t . w_in[i] + b_in[i]) w_out[:, i] (+ b_out)``.

Two strategies, chosen by shape (``strategy="auto"``) or forced:

* ``"grouped"``: the (token, block) pairs grouped by block through a plan, so block ``b`` is group ``b`` of a grouped
  GEMM whose weights are views of ``w_in`` / ``w_up`` / ``w_out`` (no copy), the tokens copied into the pair rows
  (``pick_rows``) and the pairs summed back per token (``sum_rows``). A block's weights are read once for all the
  tokens that chose it: the strategy for many tokens per block.
* ``"gathered"``: every token reads its own blocks' rows (:mod:`sparsemm_kernels.ops.block_gather`): no plan, no
  row copies in the forward; the weights are read once per (token, block). The strategy for few tokens per block
  (decoding, small batches, very many blocks).

``"auto"`` takes "gathered" when the mean number of pairs per block, ``N * top_k / n_blocks``, is below
:data:`GATHERED_BELOW` for the device (the crossover swept by the ``*xover-t*`` configs of
``benchmarks/bench_avgk.py``; measured on CPU, not yet on a GPU). Both strategies: autograd for every input, weight
gradients per block without atomics, no host sync. The selection (``sparsemm::avgk_topk``) is one Triton kernel on
the GPU: the scores stay in registers, the top-k comes out ascending without a sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsemm_kernels.backend import check_backend_name, prefer, select_backend
from sparsemm_kernels.ops.block_gather import block_gather_mm_op, block_scatter_mm_op
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.ops.grouped_linear import grouped_mm
from sparsemm_kernels.ops.slots import pair_rows, pick_rows_op, sum_rows_op
from sparsemm_kernels.ops.token_routing import token_topk_op
from sparsemm_kernels.plan import build_plan
from sparsemm_kernels.utils.checks import (
    accumulation_dtype,
    autocast_to,
    check_dim,
    check_float_tensor,
    check_positive_int,
    check_same_device,
    check_same_dtype,
)

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
STRATEGIES = ("auto", "grouped", "gathered")

# "auto" takes "gathered" below this many (token, block) pairs per block on average, per device type. CPU: measured
# (benchmarks/results/avgk-intel-xeon-processor-fp32-20261202-170320.md: Intel Xeon, fp32, 1 thread, dim 256, 2048
# cells, 256 active): gathered / grouped at 0.125 / 0.25 / 0.5 / 1 pairs per block = 0.50 / 0.51 / 0.61 / 0.76
# (forward) and 0.75 / 0.80 / 0.88 / 1.00 (forward+backward) at block 16; 0.65 / 0.72 / 0.82 / 1.04 and 0.99 / 1.12 /
# 1.20 / 1.43 at block 64. CUDA: NOT measured yet (no GPU has run it): 1.0 is the point where the gathered strategy
# starts to read more weight bytes than the grouped one (which reads every chosen block once); the xover-t* configs
# of the same benchmark measure it (make gpu-check).
GATHERED_BELOW = {"cpu": 0.5, "cuda": 1.0}


def choose_strategy(num_tokens: int, top_k: int, n_blocks: int, device: torch.device) -> str:
    """The strategy ``"auto"`` runs for this shape: ``"gathered"`` when ``num_tokens * top_k / n_blocks`` (pairs
    per block) is below ``GATHERED_BELOW[device.type]``, else ``"grouped"``."""
    below = GATHERED_BELOW.get(device.type, GATHERED_BELOW["cuda"])
    return "gathered" if num_tokens * top_k < below * n_blocks else "grouped"


def _blocks(w_in: torch.Tensor, block_size, top_k) -> tuple[int, int, int]:
    """``(g, n_blocks, k)`` checked against ``w_in [d_ff, d]``."""
    g = check_positive_int(block_size, "block_size")
    d_ff = w_in.shape[0]
    if d_ff % g:
        raise ValueError(f"`block_size` {g} must divide d_ff = {d_ff} (the rows of `w_in`)")
    n_blocks = d_ff // g
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"`top_k` must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_blocks:
        raise ValueError(f"`top_k` must be in [1, {n_blocks}] (the number of blocks), got {top_k}")
    return g, n_blocks, top_k


def _check_x_w(x: torch.Tensor, w_in: torch.Tensor) -> None:
    check_float_tensor(x, "x")
    check_float_tensor(w_in, "w_in")
    check_dim(w_in, 2, "w_in", "[d_ff, d] (rows are the keys)")
    if x.dim() < 1 or x.shape[-1] != w_in.shape[1]:
        raise ValueError(f"`x` must be [..., d] with d = {w_in.shape[1]} (the columns of `w_in`), got shape "
                         f"{tuple(x.shape)}")
    check_same_device("x", x, "w_in", w_in)
    check_same_dtype("x", x, "w_in", w_in)


def _select(x2d: torch.Tensor, w_in: torch.Tensor, g: int, n_blocks: int, k: int, backend) -> torch.Tensor:
    with torch.no_grad():  # no gradient through the choice
        # The mean keys of the current weights, every call (at least float32: a bf16 average of g keys would round).
        mean_keys = w_in.detach().view(n_blocks, g, w_in.shape[1]).mean(1, dtype=accumulation_dtype(w_in.dtype))
        return avgk_topk_op(x2d.detach(), mean_keys, k, backend)


def _avgk_topk(x: torch.Tensor, mean_keys: torch.Tensor, k: int, backend: str | None) -> torch.Tensor:
    """``[N, k]`` int64: per row of ``x`` the ``k`` blocks with the largest ``x . mean_keys[b]``, ascending, ties to
    the lower block. ``triton``: one fused kernel (scores in registers, no sort) up to ``max_blocks`` blocks;
    ``cpu`` / ``torch``: a GEMM then the token top-k of that backend and a sort."""
    name = select_backend("avgk_select", x.device, x.dtype, backend)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.avgk_select import avgk_select_triton, fits

        if fits(mean_keys.shape[0], x.shape[1], x.dtype):
            return avgk_select_triton(x, mean_keys, k)
    # Descending, ties to the lower block; a preference, so rows wider than the kernel takes sort instead.
    best = token_topk_op(_block_scores(x, mean_keys), k, prefer(name))
    return best.sort(dim=1).values


def _block_scores(x: torch.Tensor, mean_keys: torch.Tensor) -> torch.Tensor:
    """``[N, n_blocks]`` scores ``x . mean_keys[b]`` as the fused kernel ranks them: the keys rounded to ``x``'s
    dtype, products accumulated and kept in at least float32 (16-bit scores would tie far more often, so the
    choice would depend on the path)."""
    keys = mean_keys.to(x.dtype)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(x, keys.t(), out_dtype=torch.float32)  # tensor cores, float32 out
        except (RuntimeError, TypeError):  # a torch or GPU without the float32-out GEMM: the upcast below
            pass
    acc = accumulation_dtype(x.dtype)
    return x.to(acc) @ keys.to(acc).t()


def _avgk_topk_fake(x, mean_keys, k, backend):
    return x.new_empty(x.shape[0], k, dtype=torch.int64)


avgk_topk_op = Op("sparsemm::avgk_topk", _avgk_topk, _avgk_topk_fake)


def avgk_select(x: torch.Tensor, w_in: torch.Tensor, block_size: int, top_k: int, *,
                backend: str | None = None) -> torch.Tensor:
    """Each token's ``top_k`` blocks by ``x . mean_key_b``: ``[N, top_k]`` int64, ascending block order, ties to the
    lower block. ``x [N, d]`` (or ``[..., d]``: then ``[..., top_k]``), ``w_in [d_ff, d]`` with ``block_size``
    dividing ``d_ff``; the mean keys come from ``w_in`` as it is now. No gradient."""
    _check_x_w(x, w_in)
    g, n_blocks, k = _blocks(w_in, block_size, top_k)
    x2 = x.reshape(-1, x.shape[-1])
    return _select(x2, w_in, g, n_blocks, k, check_backend_name(backend)).view(*x.shape[:-1], k)


def _check_param(t, name: str, shape: tuple, x: torch.Tensor) -> None:
    if t is None:
        return
    check_float_tensor(t, name)
    if tuple(t.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}")
    check_same_device("x", x, name, t)
    check_same_dtype("x", x, name, t)


def avgk_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    block_size: int,
    top_k: int,
    activation: str = "gelu",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    w_up: torch.Tensor | None = None,
    *,
    strategy: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """The Avg-K sparse FFN (see the module docstring).

    Args:
        x: ``[..., d]``.
        w_in: ``[d_ff, d]`` keys; ``w_out``: ``[d, d_ff]`` values; ``b_in [d_ff]``, ``b_out [d]`` optional;
            ``w_up [d_ff, d]`` optional: the GLU variant ``act(x w_in[i] + b_in[i]) * (x w_up[i])`` (selection still
            by the mean of the ``w_in`` keys).
        block_size: ``g``, dividing ``d_ff``; top_k: blocks per token, ``1 <= top_k <= d_ff / g``.
        activation: ``"gelu"`` (exact), ``"relu"`` or ``"silu"``.
        strategy: ``"grouped"`` ((token, block) pairs grouped by block, one grouped GEMM per projection),
            ``"gathered"`` (every token reads its own blocks' rows) or ``"auto"`` (:func:`choose_strategy`).

    Returns:
        ``[..., d]``, differentiable in ``x``, ``w_in``, ``w_out``, ``b_in``, ``b_out``, ``w_up`` (not through the
        choice). With ``top_k = d_ff / g`` it is the dense FFN. Under ``torch.autocast`` every tensor is cast to the
        autocast dtype first (like ``nn.Linear``), so activations and weights may then differ in dtype.
    """
    if isinstance(x, torch.Tensor) and all(isinstance(t, torch.Tensor) or t is None
                                           for t in (w_in, w_out, b_in, b_out, w_up)):
        x, w_in, w_out, b_in, b_out, w_up = autocast_to(x, w_in, w_out, b_in, b_out, w_up)
    _check_x_w(x, w_in)
    g, n_blocks, k = _blocks(w_in, block_size, top_k)
    d_ff, d = w_in.shape
    check_float_tensor(w_out, "w_out")
    if tuple(w_out.shape) != (d, d_ff):
        raise ValueError(f"`w_out` must have shape [d, d_ff] = {(d, d_ff)}, got {tuple(w_out.shape)}")
    check_same_device("x", x, "w_out", w_out)
    check_same_dtype("x", x, "w_out", w_out)
    _check_param(b_in, "b_in", (d_ff,), x)
    _check_param(b_out, "b_out", (d,), x)
    _check_param(w_up, "w_up", (d_ff, d), x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    backend = check_backend_name(backend)
    x2 = x.reshape(-1, d)
    blocks = _select(x2, w_in, g, n_blocks, k, backend)  # [N, k]
    if strategy == "auto":
        strategy = choose_strategy(x2.shape[0], k, n_blocks, x.device)
    act = ACTIVATIONS[activation]
    if strategy == "gathered":
        y = _gathered_ffn(x2, w_in, w_out, b_in, w_up, blocks, g, n_blocks, act, backend)
    else:
        y = _grouped_ffn(x2, w_in, w_out, b_in, w_up, blocks, g, n_blocks, act, backend)
    if b_out is not None:
        y = y + b_out
    return y.view(x.shape)


def _grouped_ffn(x2, w_in, w_out, b_in, w_up, blocks, g: int, n_blocks: int, act, backend) -> torch.Tensor:
    d = x2.shape[1]
    pairs, slots, inverse = pair_rows(blocks, n_blocks, backend=backend, name="block_idx")
    xe = pick_rows_op(x2, slots, inverse)
    # Block b = group b: its g keys (and up-projections) are rows b*g..b*g+g-1, its values columns of w_out.
    h = grouped_mm(xe, w_in.view(n_blocks, g, d), pairs.offsets,
                   b_in.view(n_blocks, g) if b_in is not None else None, backend=backend)
    h = act(h)
    if w_up is not None:
        h = h * grouped_mm(xe, w_up.view(n_blocks, g, d), pairs.offsets, backend=backend)
    ye = grouped_mm(h, w_out.view(d, n_blocks, g).permute(1, 0, 2), pairs.offsets, backend=backend)
    return sum_rows_op(ye, inverse, slots)


def _gathered_ffn(x2, w_in, w_out, b_in, w_up, blocks, g: int, n_blocks: int, act, backend) -> torch.Tensor:
    order = offsets = None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (w_in, w_out, b_in, w_up)):
        # One plan of the pairs by block for every weight gradient (a forward without them needs none).
        plan = build_plan(blocks.reshape(-1), n_blocks, backend=backend, validate=False, name="block_idx")
        order, offsets = plan.sorted_to_orig, plan.offsets
    h = act(block_gather_mm_op(x2, w_in, b_in, blocks, g, order, offsets, backend))  # [N, k, g]
    if w_up is not None:
        h = h * block_gather_mm_op(x2, w_up, None, blocks, g, order, offsets, backend)
    # w_out's columns are the values: its transpose (a view) has them as rows.
    return block_scatter_mm_op(h, w_out.t(), blocks, g, order, offsets, backend)
