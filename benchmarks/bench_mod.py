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
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness
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
    ap = harness.cli_parser("python -m benchmarks.bench_mod", __doc__.split("\n")[0],
                            "one batch on the CPU", "CPU threads for torch (default 1; 0: leave defaults)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(CONFIGS)} (default: 443M on cuda, cpu "
                    "on the CPU)")
    args = harness.parse_cli(ap, argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",")] if args.configs else (
        ["443M"] if device.type == "cuda" else ["cpu"])
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        print(f"error: unknown configs {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    wanted = [p for p in ("full", *CAPACITIES, *(f"{n}_plain" for n in CAPACITIES))
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
        dim, heads, hidden, batch, seq, span = CONFIGS[name]
        if args.quick and device.type == "cpu":
            batch = 1
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(f"time budget spent: stopping before {name}", flush=True)
            break
        torch.manual_seed(args.seed)
        factory = {"device": device, "dtype": dtype}
        block = MoTBlock(dim, heads, hidden, 2, **factory)
        x = torch.randn(batch, seq, dim, **factory).requires_grad_(True)
        dy = torch.randn(batch, seq, dim, **factory)
        ids = _ids(batch, seq, span, device)
        fns = {"full": (block, list(block.parameters()))}
        checked = {}
        for p, cap in CAPACITIES.items():
            m = MixtureOfDepths(block, dim, capacity=cap, **factory)
            fns[p] = ((lambda t, i, m=m: m(t, i)), list(m.parameters()))
            fns[f"{p}_plain"] = ((lambda t, i, m=m: plain_mod(m, t, i)), list(m.parameters()))
            if p in wanted or f"{p}_plain" in wanted:
                checked[p] = checked[f"{p}_plain"] = _validate(m, x, ids)
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
            base = timed.get("full", [None, None, None])[1]
            for p in wanted:
                row = harness.make_row(env, op=OP, config=name, dim=dim, hidden=hidden, batch=batch, seq=seq,
                                       provider=p, mode=mode, dtype=dtype_name, validation_rel_err=checked.get(p),
                                       capacity=CAPACITIES.get(p.removesuffix("_plain")))
                if p in timed:
                    q = timed[p]
                    row.update(status="ok", ms_p20=q[0], ms_p50=q[1], ms_p80=q[2],
                               x_full=q[1] / base if base else None, tokens_per_s=batch * seq / (q[1] * 1e-3))
                    if p in CAPACITIES and f"{p}_plain" in timed:
                        row["plain_over_mod"] = timed[f"{p}_plain"][1] / q[1]
                else:
                    row.update(status="FAILED", note=f"validation error {checked.get(p)} > 1e-4: not timed")
                    failed += 1
                rows.append(row)
                shown = (f"{row['ms_p50']:.4g} ms  x full {row['x_full']:.3f}" if row["status"] == "ok"
                         else row["note"])
                print(f"{name:5s} {mode:16s} {p:12s} {row['status']:6s} {shown}", flush=True)
        del x, dy, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{OP}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {OP} benchmark: {env['device']}, {dtype_name}", "",
             f"Measured in this run ({harness.now_utc()}), one process; torch {env['torch']}, triton "
             f"{env['triton']}, git {env['git_commit']}. Timing: {method}. x full = median / the full block's "
             "median (goal on H100/H200, bf16: mod12 <= 0.20); plain / mod = the plain MoD's median over the "
             "package's. Validation: float32 MoD vs its plain twin (relative Frobenius error).", "",
             "| config | mode | provider | capacity | median ms | p20-p80 ms | x full | plain / mod | validation | "
             "status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = r.get("capacity")
        cap = f"{cap:g}" if cap is not None else "1"
        val = r["validation_rel_err"] if r["validation_rel_err"] is not None else "-"
        if r["status"] == "ok":
            lines.append(f"| {r['config']} | {r['mode']} | {r['provider']} | {cap} | {r['ms_p50']:.4g} | "
                         f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g} | {r['x_full']:.3f} | "
                         f"{r.get('plain_over_mod') or 0:.2f} | {val} | ok |")
        else:
            lines.append(f"| {r['config']} | {r['mode']} | {r['provider']} | {cap} | | | | | {val} | FAILED |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    print(f"{len(rows)} rows ({failed} FAILED) -> {stem}.md, .json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
