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
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from sparsemm_kernels.nn import ExpertChoiceMoE, MoMaFeedForward

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
    ``index_add`` per expert."""
    x2, flat = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    out = torch.zeros_like(x2)
    if isinstance(m, ExpertChoiceMoE):
        groups, routers, c = [(torch.arange(x2.shape[0], device=x2.device), 0, m.num_experts)], [m.router], 1.0
    else:
        groups, first = [], 0
        for g, E in enumerate(m.experts_per_modality):
            groups.append((torch.nonzero(flat == g).flatten(), first, E))  # host sync, as published code does
            first += E
        routers, c = list(m.routers), m.capacity_factor
    for (rows, first, E), router in zip(groups, routers):
        b = rows.numel()
        if b == 0:
            continue
        xg = x2[rows]
        s = torch.sigmoid(router(xg))
        C = min(max(math.ceil(c * b / E), 1), b)
        for j in range(E):
            gate, pick = torch.topk(s[:, j], C)
            xe = xg[pick]
            e = first + j
            y = F.linear(F.silu(F.linear(xe, m.w1[e])) * F.linear(xe, m.w3[e]), m.w2[e])
            out = out.index_add(0, rows[pick], y * gate[:, None])
    return out.view(x.shape)


def _validate(m, x: torch.Tensor, ids: torch.Tensor) -> float:
    m32 = copy.deepcopy(m).float()
    x32 = x.detach().float()
    call = (lambda t: m32(t)) if isinstance(m32, ExpertChoiceMoE) else (lambda t: m32(t, ids))
    with torch.no_grad():
        return harness.rel_err(call(x32), loop_forward(m32, x32, ids))


def _step(fn, x, ids, dy, mode):
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(x, ids)
    else:
        def run():
            fn(x, ids).backward(dy)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = harness.cli_parser("python -m benchmarks.bench_moma_ffn", __doc__.split("\n")[0],
                            "the 435M config only on cuda; fewer tokens on cpu",
                            "CPU threads for torch (default 1; 0: leave defaults)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(CONFIGS)} (default: 435M,1.4B on cuda, "
                    "cpu on the CPU)")
    args = harness.parse_cli(ap, argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",")] if args.configs else (
        (["435M"] if args.quick else ["435M", "1.4B"]) if device.type == "cuda" else ["cpu"])
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        print(f"error: unknown configs {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    wanted = [p for p in ("dense", *LAYERS, *(f"{n}_loop" for n in LAYERS))
              if not args.providers or p in args.providers.split(",")]
    if device.type == "cpu" and args.threads > 0:
        harness.set_cpu_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = harness.DTYPES[dtype_name]
    env = harness.collect_env(device)
    time_fn, method = harness.timer(device)
    if device.type == "cpu":
        method = (f"time.perf_counter, every provider of a config in alternating rounds (at least 7 rounds, "
                  f"{args.cpu_budget:g} s), grads set to None before every run")
    start, rows, failed = time.monotonic(), [], 0
    for name in names:
        dim, hidden, batch, seq, span = CONFIGS[name]
        if args.quick and device.type == "cpu":
            batch = 1
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(f"time budget spent: stopping before {name}", flush=True)
            break
        torch.manual_seed(args.seed)
        factory = {"device": device, "dtype": dtype}
        x = torch.randn(batch, seq, dim, **factory).requires_grad_(True)
        dy = torch.randn(batch, seq, dim, **factory)
        ids = _ids(batch, seq, span, device)
        dense, dense_params = _dense_ffn(dim, hidden, factory)
        fns = {"dense": (dense, dense_params, None)}
        for layer, experts in LAYERS.items():
            m, call = _layer(experts, dim, hidden, factory)
            fns[layer] = (call, list(m.parameters()), m)
            fns[f"{layer}_loop"] = ((lambda t, i, m=m: loop_forward(m, t, i)), list(m.parameters()), None)
        checked = {}
        for p in wanted:
            _, _, module = fns[p]
            if module is not None:
                err = _validate(module, x, ids)
                checked[p] = err
                checked[f"{p}_loop"] = err
        for mode in args.modes:
            run = {p: _step(fns[p][0], x, ids, dy, mode) for p in wanted}
            grads = {p: [x, *fns[p][1]] for p in wanted}
            ok = [p for p in wanted if checked.get(p, 0.0) <= 1e-4]
            if device.type == "cpu":
                qs = harness.time_cpu_alternating([run[p] for p in ok], [grads[p] for p in ok],
                                                  budget_s=args.cpu_budget)
                timed = dict(zip(ok, qs))
            else:
                timed = {p: time_fn(run[p], grad_to_none=grads[p]) for p in ok}
            base = timed.get("dense", [None, None, None])[1]
            for p in wanted:
                row = harness.make_row(env, op=OP, config=name, dim=dim, hidden=hidden, batch=batch, seq=seq,
                                       provider=p, mode=mode, dtype=dtype_name, validation_rel_err=checked.get(p))
                if p in timed:
                    q = timed[p]
                    row.update(status="ok", ms_p20=q[0], ms_p50=q[1], ms_p80=q[2],
                               x_dense=q[1] / base if base else None, tokens_per_s=batch * seq / (q[1] * 1e-3))
                    layer = p.removesuffix("_loop")
                    if p in LAYERS and f"{p}_loop" in timed:
                        row["loop_over_layer"] = timed[f"{p}_loop"][1] / q[1]
                    elif layer in LAYERS and layer in timed:
                        row["loop_over_layer"] = q[1] / timed[layer][1]
                else:
                    row.update(status="FAILED", note=f"validation error {checked.get(p)} > 1e-4: not timed")
                    failed += 1
                rows.append(row)
                shown = (f"{row['ms_p50']:.4g} ms  x dense {row['x_dense']:.3f}" if row["status"] == "ok"
                         else row["note"])
                print(f"{name:5s} {mode:16s} {p:14s} {row['status']:6s} {shown}", flush=True)
        del x, dy, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{OP}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {OP} benchmark: {env['device']}, {dtype_name}", "",
             f"Measured in this run ({harness.now_utc()}), one process; torch {env['torch']}, triton "
             f"{env['triton']}, git {env['git_commit']}. Timing: {method}. Layers at capacity factor 1 (FLOP-"
             "matched with dense); x dense = median / dense median; loop / layer = the loop's median over the "
             "layer's. Validation: float32 layer vs its loop (relative Frobenius error).", "",
             "| config | mode | provider | median ms | p20-p80 ms | x dense | loop / layer | validation | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['provider']} | {r['ms_p50']:.4g} | "
            f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g} | {r['x_dense']:.3f} | {r.get('loop_over_layer') or 0:.2f} | "
            f"{r['validation_rel_err'] if r['validation_rel_err'] is not None else '-'} | ok |" if ok else
            f"| {r['config']} | {r['mode']} | {r['provider']} | | | | | {r['validation_rel_err']} | FAILED |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    print(f"{len(rows)} rows ({failed} FAILED) -> {stem}.md, .json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
