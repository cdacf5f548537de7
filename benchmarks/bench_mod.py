"""Mixture-of-Depths around a MoT block vs the full block and vs a plain PyTorch gather/scatter MoD.

    python -m benchmarks.bench_mod [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--configs 443M|cpu]
        [--modes forward,full] [--providers ...] [--out DIR] [--time-budget S] [--threads N] [--cpu-budget S]

Per config one :class:`~sparsemm_kernels.nn.MoTBlock` (2 modalities, 50/50 text/image in spans), and per capacity
(12.5%, 25%) a :class:`~sparsemm_kernels.nn.MixtureOfDepths` around it with per-sequence routing. Providers:

* ``full``          - the block on every token: the baseline of every ratio (the goal on H100/H200 in bf16:
  ``mod12`` at <= 0.20x of it);
* ``mod12`` / ``mod25``  - the package's MoD (``mod_route`` + one ``index_select`` + the block + ``mod_combine``);
* ``mod12_plain`` / ``mod25_plain`` - the same parameters written in plain PyTorch the way public code does it, with
  its bugs fixed: ``torch.topk`` per sequence, the indices sorted so the block sees ascending positions, ``gather``,
  the block, ``scatter`` of ``x + r (y - x)``.

Validation first: every MoD provider against its plain twin in float32 (relative Frobenius error <= 1e-4; ties of
the router logits are measure-zero). Results: ``benchmarks/results/mod-<device>-<dtype>-<time>.md`` and ``.json``,
every number from this run.
"""

from __future__ import annotations

import copy
import sys

import torch

from benchmarks import harness, layer_bench
from sparsemm_kernels.nn import MixtureOfDepths, MoTBlock

OP = "mod"
#: name -> (dim, heads, hidden, batch, seq, image span)
CONFIGS = {
    "443M": (1024, 16, 2816, 4, 4096, 1024),
    "cpu": (256, 4, 704, 2, 512, 128),
}
CAPACITIES = {"mod12": 0.125, "mod25": 0.25}


def plain_mod(m: MixtureOfDepths, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """MoD in plain PyTorch on ``m``'s parameters: top-k per sequence, sorted, gather, block, scatter."""
    B, S, D = x.shape
    C = max(int(m.capacity * S + 0.999999), 1)  # ceil for the capacities used here
    logits = m.router(x).squeeze(-1)
    r = torch.sigmoid(logits)
    idx = torch.topk(logits, C, dim=1).indices.sort(dim=1).values
    xs = x.gather(1, idx[..., None].expand(B, C, D))
    y = m.block(xs, ids.gather(1, idx), position_ids=idx)
    new = xs + r.gather(1, idx)[..., None] * (y - xs)
    return x.scatter(1, idx[..., None].expand(B, C, D), new)


def _ids(batch: int, seq: int, span: int, device) -> torch.Tensor:
    return ((torch.arange(seq) // span) % 2).expand(batch, seq).contiguous().to(device)


def _validate(m: MixtureOfDepths, x: torch.Tensor, ids: torch.Tensor) -> float:
    m32 = copy.deepcopy(m).float()
    x32 = x.detach().float()
    with torch.no_grad():
        return harness.rel_err(m32(x32, ids), plain_mod(m32, x32, ids))


def _build(name: str, device: torch.device, dtype: torch.dtype, args) -> layer_bench.Case:
    dim, heads, hidden, batch, seq, span = CONFIGS[name]
    if args.quick and device.type == "cpu":
        batch = 1
    factory = {"device": device, "dtype": dtype}
    block = MoTBlock(dim, heads, hidden, 2, **factory)
    x = torch.randn(batch, seq, dim, **factory).requires_grad_(True)
    ids = _ids(batch, seq, span, device)
    providers, leaves, checked = {"full": lambda t: block(t, ids)}, {"full": [x, *block.parameters()]}, {}
    for p, cap in CAPACITIES.items():
        m = MixtureOfDepths(block, dim, capacity=cap, **factory)
        providers[p] = lambda t, m=m: m(t, ids)
        providers[f"{p}_plain"] = lambda t, m=m: plain_mod(m, t, ids)
        leaves[p] = leaves[f"{p}_plain"] = [x, *m.parameters()]
        checked[p] = checked[f"{p}_plain"] = _validate(m, x, ids)
    return layer_bench.Case(x, torch.randn(batch, seq, dim, **factory), providers, leaves, checked,
                            {"dim": dim, "hidden": hidden, "batch": batch, "seq": seq})


def _ratios(p: str, medians: dict) -> dict:
    if p in CAPACITIES and f"{p}_plain" in medians:
        return {"capacity": CAPACITIES[p], "plain_over_mod": medians[f"{p}_plain"] / medians[p]}
    return {"capacity": CAPACITIES.get(p.removesuffix("_plain"), 1.0)}


def main(argv: list[str] | None = None) -> int:
    return layer_bench.run(
        OP, __doc__, argv, CONFIGS, lambda device, quick: ["443M"] if device == "cuda" else ["cpu"],
        ["full", *CAPACITIES, *(f"{n}_plain" for n in CAPACITIES)], _build, "full", _ratios,
        "x full = median / the full block's median (goal on H100/H200, bf16: mod12 <= 0.20); plain / mod = the "
        "plain MoD's median over the package's. Validation: float32 MoD vs its plain twin (relative Frobenius error).",
        [("capacity", layer_bench.field_cells("capacity", "g")), ("median ms", layer_bench.median_cells),
         ("p20-p80 ms", layer_bench.spread_cells), ("x full", layer_bench.field_cells("x_base")),
         ("plain / mod", layer_bench.field_cells("plain_over_mod", ".2f"))],
    )


if __name__ == "__main__":
    sys.exit(main())
