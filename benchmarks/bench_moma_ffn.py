"""Expert-choice FFN layers (MoE-8x, MoMa 1t1i, MoMa 4t4i) vs the FLOP-matched dense SwiGLU FFN and vs loops.

    python -m benchmarks.bench_moma_ffn [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--configs 435M,1.4B|cpu]
        [--modes forward,full] [--providers ...] [--out DIR] [--time-budget S] [--threads N] [--cpu-budget S]

Per config (dim, SwiGLU hidden, batch x seq tokens, 50/50 text/image in spans of 1024 / 128): every layer at
capacity factor 1, so each token gets one expert's FLOPs on average, the dense FFN's. Providers:

* ``dense``    - ``w2(silu(w1 x) * w3 x)`` in plain PyTorch (``F.linear``): the baseline of every ratio;
* ``moe8x``    - :class:`sparsemm_kernels.nn.ExpertChoiceMoE` (8 experts, expert choice over all tokens);
* ``moma1t1i`` / ``moma4t4i`` - :class:`sparsemm_kernels.nn.MoMaFeedForward` ((1, 1) / (4, 4) experts);
* ``*_loop``   - the same parameters the way public code does it: per modality a boolean mask, per expert
  ``torch.topk`` + gather + the expert FFN + ``index_add`` (host syncs at the masks).

Validation first: each layer and its loop, run in float32 on float32 copies, must agree (relative Frobenius error
<= 1e-4; ties of the routing scores are measure-zero in float32); then timing in the run's dtype. CPU: all
providers of a config timed in alternating rounds. Results: ``benchmarks/results/moma_ffn-<device>-<dtype>-<time>.md``
and ``.json``, every number from this run.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness, layer_bench
from sparsemm_kernels.nn import ExpertChoiceMoE, MoMaFeedForward
from sparsemm_kernels.nn.moe import router_logits

OP = "moma_ffn"
#: name -> (dim, hidden, batch, seq, image span)
CONFIGS = {
    "435M": (1024, 4096, 6, 4096, 1024),
    "1.4B": (2048, 8192, 6, 4096, 1024),
    "cpu": (256, 704, 4, 512, 128),
}
LAYERS = {"moe8x": (8,), "moma1t1i": (1, 1), "moma4t4i": (4, 4)}


def _ids(batch: int, seq: int, span: int, device) -> torch.Tensor:
    """50/50 text/image: alternating text and image spans of ``span`` tokens."""
    return ((torch.arange(seq) // span) % 2).expand(batch, seq).contiguous().to(device)


def _dense_ffn(dim: int, hidden: int, factory: dict):
    w1 = torch.nn.Parameter(torch.randn(hidden, dim, **factory) / math.sqrt(dim))
    w3 = torch.nn.Parameter(torch.randn(hidden, dim, **factory) / math.sqrt(dim))
    w2 = torch.nn.Parameter(torch.randn(dim, hidden, **factory) / math.sqrt(hidden))

    def run(x, ids):
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    return run, [w1, w3, w2]


def _layer(experts, dim, hidden, factory):
    if len(experts) == 1:
        m = ExpertChoiceMoE(dim, hidden, experts[0], **factory)
        return m, (lambda x, ids: m(x))
    m = MoMaFeedForward(dim, hidden, experts, **factory)
    return m, (lambda x, ids: m(x, ids))


def loop_forward(m, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The published-code style on ``m``'s parameters: a mask per modality, ``topk`` + gather + FFN +
    ``index_add`` per expert.

    The router scores are computed as the layer computes them (:func:`router_logits`: at least float32), every
    router on all tokens in one ``sigmoid(cat(...))``, then each modality's rows picked: a router GEMM on the
    gathered rows alone may round the last bit differently and swap a token at the capacity boundary."""
    x2, flat = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    out = torch.zeros_like(x2)
    if isinstance(m, ExpertChoiceMoE):
        groups, c = [(torch.arange(x2.shape[0], device=x2.device), 0, m.num_experts)], 1.0
        scores = torch.sigmoid(router_logits(m.router, x2))
    else:
        groups, first = [], 0
        for g, E in enumerate(m.experts_per_modality):
            groups.append((torch.nonzero(flat == g).flatten(), first, E))  # host sync, as published code does
            first += E
        c = m.capacity_factor
        scores = torch.sigmoid(torch.cat([router_logits(r, x2) for r in m.routers], dim=1))  # [N, E_total]
    for rows, first, E in groups:
        b = rows.numel()
        if b == 0:
            continue
        xg = x2[rows]
        s = scores[rows, first:first + E]
        C = min(max(math.ceil(c * b / E), 1), b)
        for j in range(E):
            gate, pick = torch.topk(s[:, j], C)
            xe = xg[pick]
            e = first + j
            y = F.linear(F.silu(F.linear(xe, m.w1[e])) * F.linear(xe, m.w3[e]), m.w2[e])
            out = out.index_add(0, rows[pick], y * gate[:, None].to(y.dtype))  # gates cast back, as the layer
    return out.view(x.shape)


def _validate(m, x: torch.Tensor, ids: torch.Tensor) -> float:
    m32 = copy.deepcopy(m).float()
    x32 = x.detach().float()
    call = (lambda t: m32(t)) if isinstance(m32, ExpertChoiceMoE) else (lambda t: m32(t, ids))
    with torch.no_grad():
        return harness.rel_err(call(x32), loop_forward(m32, x32, ids))


def _build(name: str, device: torch.device, dtype: torch.dtype, args) -> layer_bench.Case:
    dim, hidden, batch, seq, span = CONFIGS[name]
    if args.quick and device.type == "cpu":
        batch = 1
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(batch, seq, dim, **factory).requires_grad_(True)
    ids = _ids(batch, seq, span, device)
    dense, dense_params = _dense_ffn(dim, hidden, factory)
    providers, leaves = {"dense": lambda t: dense(t, ids)}, {"dense": [x, *dense_params]}
    checked = {}
    for layer, experts in LAYERS.items():
        m, call = _layer(experts, dim, hidden, factory)
        providers[layer] = lambda t, call=call: call(t, ids)
        providers[f"{layer}_loop"] = lambda t, m=m: loop_forward(m, t, ids)
        leaves[layer] = leaves[f"{layer}_loop"] = [x, *m.parameters()]
        checked[layer] = checked[f"{layer}_loop"] = _validate(m, x, ids)
    return layer_bench.Case(x, torch.randn(batch, seq, dim, **factory), providers, leaves, checked,
                            {"dim": dim, "hidden": hidden, "batch": batch, "seq": seq})


def _ratios(p: str, medians: dict) -> dict:
    layer = p.removesuffix("_loop")
    if layer not in LAYERS or layer not in medians or f"{layer}_loop" not in medians:
        return {}
    return {"loop_over_layer": medians[f"{layer}_loop"] / medians[layer]}


def main(argv: list[str] | None = None) -> int:
    return layer_bench.run(
        OP, __doc__, argv, CONFIGS,
        lambda device, quick: (["435M"] if quick else ["435M", "1.4B"]) if device == "cuda" else ["cpu"],
        ["dense", *LAYERS, *(f"{n}_loop" for n in LAYERS)], _build, "dense", _ratios,
        "Layers at capacity factor 1 (FLOP-matched with dense); x dense = median / dense median; loop / layer = the "
        "loop's median over the layer's. Validation: float32 layer vs its loop (relative Frobenius error).",
        [("median ms", layer_bench.median_cells), ("p20-p80 ms", layer_bench.spread_cells),
         ("x dense", layer_bench.field_cells("x_base")),
         ("loop / layer", layer_bench.field_cells("loop_over_layer", ".2f"))],
    )


if __name__ == "__main__":
    sys.exit(main())
