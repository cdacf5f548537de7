"""Avg-K sparse FFN at several block sizes vs the FLOP-matched dense FFN and vs a PyTorch gather implementation.

    python -m benchmarks.bench_avgk [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--configs 2048,...]
        [--modes forward,full] [--providers ...] [--out DIR] [--time-budget S] [--threads N] [--cpu-budget S]

Per config (dim, cells, active cells, tokens, block sizes): ``top_k * block_size`` = the active cells for every
block size, so the mean number of (token, block) pairs per block is ``tokens * active / cells``. Providers:

* ``dense``         - ``w_out gelu(w_in x)`` with ``hidden`` = the active cells (``F.linear``): the FLOP-matched
  baseline;
* ``grouped_g{g}``  - :func:`sparsemm_kernels.avgk_ffn` at block size ``g``, ``strategy="grouped"`` (the pairs
  grouped by block, grouped GEMMs);
* ``gathered_g{g}`` - the same, ``strategy="gathered"`` (every token reads its own blocks' rows);
* ``gather_g{g}``   - the same weights the plain way: the mean keys, ``topk``, each token's blocks gathered with
  ``index_select`` into ``[N, k*g, d]`` key and value tensors, ``bmm``.

Configs: ``2048`` (the issue's shape: dim 2048, 16384 cells, 2048 active, 512 tokens) and ``cpu``; the crossover
sweeps ``xover-t{N}`` (dim 2048, GPU) and ``cpu-xover-t{N}`` (dim 256) at growing token counts, where the two
strategies trade places (``"auto"`` switches at ``GATHERED_BELOW`` pairs per block, sparsemm_kernels/ops/avgk.py).
Validation first (float32 copies): every ``grouped_g*`` / ``gathered_g*`` against its ``gather_g*`` (relative
Frobenius error <= 1e-4); where the gather implementation would not fit (``GATHER_MAX_ELEMENTS``) it is left out and
the two strategies are checked against each other. Goals on H100/H200 (bf16): avgk <= 1.3x dense at g >= 64, <= 2x
at g = 16, >= 3x faster than gather. Results: ``benchmarks/results/avgk-<device>-<dtype>-<time>.md`` and ``.json``.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness, layer_bench
from sparsemm_kernels.ops.avgk import avgk_ffn

OP = "avgk"
#: name -> (dim, cells, active cells, tokens, block sizes)
CONFIGS = {
    "2048": (2048, 16384, 2048, 512, (16, 32, 64, 128, 256)),
    "cpu": (256, 2048, 256, 256, (16, 64)),
    **{f"xover-t{n}": (2048, 16384, 2048, n, (16, 64, 256)) for n in (8, 32, 128, 2048)},
    **{f"cpu-xover-t{n}": (256, 2048, 256, n, (16, 64)) for n in (1, 2, 4, 8, 16, 64)},
}
STRATEGIES = ("grouped", "gathered")
# The gather implementation materialises [tokens, active, dim] keys and values (and their gradients): past this many
# elements per tensor (8 GiB in fp32, the float32 validation copy) it is left out of a config.
GATHER_MAX_ELEMENTS = 1 << 31


def gather_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """Avg-K the plain way: ``topk`` of the mean-key scores, the chosen blocks gathered per token, ``bmm``."""
    n_blocks, d = w_in.shape[0] // g, w_in.shape[1]
    with torch.no_grad():
        scores = x @ w_in.view(n_blocks, g, d).mean(1).t()
        blocks = torch.topk(scores, k, dim=1).indices  # the order within a token does not change the sum
    keys = w_in.view(n_blocks, g, d).index_select(0, blocks.reshape(-1)).view(-1, k * g, d)  # [N, k g, d]
    values = w_out.view(d, n_blocks, g).permute(1, 2, 0).index_select(0, blocks.reshape(-1)).view(-1, k * g, d)
    h = F.gelu(torch.bmm(keys, x[:, :, None]))  # [N, k g, 1]
    return torch.bmm(values.transpose(1, 2), h)[:, :, 0]


def _build(name: str, device: torch.device, dtype: torch.dtype, args) -> layer_bench.Case:
    dim, cells, active, tokens, sizes = CONFIGS[name]
    if args.quick and device.type == "cpu":
        tokens, sizes = 64, sizes[:1]
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(tokens, dim, **factory).requires_grad_(True)
    w_in = (torch.randn(cells, dim, **factory) / math.sqrt(dim)).requires_grad_(True)
    w_out = (torch.randn(dim, cells, **factory) / math.sqrt(active)).requires_grad_(True)
    d_in = (torch.randn(active, dim, **factory) / math.sqrt(dim)).requires_grad_(True)
    d_out = (torch.randn(dim, active, **factory) / math.sqrt(active)).requires_grad_(True)
    providers = {"dense": lambda t: F.linear(F.gelu(F.linear(t, d_in)), d_out)}
    leaves = {"dense": [x, d_in, d_out]}
    checked = {}
    w32 = [copy.deepcopy(t.detach()).float() for t in (x, w_in, w_out)]
    with_gather = tokens * active * dim <= GATHER_MAX_ELEMENTS
    for g in sizes:
        k = active // g
        for s in STRATEGIES:
            providers[f"{s}_g{g}"] = lambda t, g=g, k=k, s=s: avgk_ffn(t, w_in, w_out, g, k, "gelu", strategy=s)
            leaves[f"{s}_g{g}"] = [x, w_in, w_out]
        with torch.no_grad():
            got = {s: avgk_ffn(*w32, g, k, "gelu", strategy=s) for s in STRATEGIES}
            # The gather implementation is the reference where it fits; past that the strategies check each other.
            if with_gather:
                want = gather_ffn(*w32, g, k)
                errs = {s: harness.rel_err(got[s], want) for s in STRATEGIES}
                del want
            else:
                errs = dict.fromkeys(STRATEGIES, harness.rel_err(got["grouped"], got["gathered"]))
            del got
        for s in STRATEGIES:
            checked[f"{s}_g{g}"] = errs[s]
        if with_gather:
            providers[f"gather_g{g}"] = lambda t, g=g, k=k: gather_ffn(t, w_in, w_out, g, k)
            leaves[f"gather_g{g}"] = [x, w_in, w_out]
            checked[f"gather_g{g}"] = max(errs.values())  # the pair's disagreement
    return layer_bench.Case(x, torch.randn(tokens, dim, **factory), providers, leaves, checked,
                            {"dim": dim, "cells": cells, "active": active, "tokens": tokens,
                             "pairs_per_block": tokens * active / cells})


def _providers() -> list[str]:
    sizes = sorted({g for *_, gs in CONFIGS.values() for g in gs})
    return ["dense", *(f"{s}_g{g}" for g in sizes for s in (*STRATEGIES, "gather"))]


def _defaults(device: str, quick: bool) -> list[str]:
    if device == "cuda":
        # The crossover sweep first at few tokens (where it is), then up to 2048 tokens (512 is the "2048" config).
        return ["2048"] if quick else ["2048", "xover-t8", "xover-t32", "xover-t128", "xover-t2048"]
    return ["cpu"] if quick else ["cpu", *(c for c in CONFIGS if c.startswith("cpu-xover-"))]


def main(argv: list[str] | None = None) -> int:
    def ratios(p: str, medians: dict) -> dict:
        strategy, _, g = p.partition("_g")
        if strategy not in STRATEGIES:
            return {}
        out = {}
        if f"gather_g{g}" in medians:
            out["gather_over_this"] = medians[f"gather_g{g}"] / medians[p]
        if strategy == "gathered" and f"grouped_g{g}" in medians:
            out["gathered_over_grouped"] = medians[p] / medians[f"grouped_g{g}"]
        return out

    return layer_bench.run(
        OP, __doc__, argv, CONFIGS, _defaults, _providers(), _build, "dense", ratios,
        "x dense = median / the FLOP-matched dense FFN's; gather / this = the gather implementation's median over "
        "this provider's at the same block size; gathered / grouped = the gathered strategy's median over the "
        "grouped one's (below 1: gathered is faster); pairs/block = tokens x active / cells. Validation: float32 "
        "avgk vs gather (relative Frobenius error).",
        [("pairs/block", layer_bench.field_cells("pairs_per_block", "g")),
         ("median ms", layer_bench.median_cells), ("p20-p80 ms", layer_bench.spread_cells),
         ("x dense", layer_bench.field_cells("x_base")),
         ("gather / this", layer_bench.field_cells("gather_over_this", ".2f")),
         ("gathered / grouped", layer_bench.field_cells("gathered_over_grouped", ".2f"))],
    )


if __name__ == "__main__":
    sys.exit(main())
