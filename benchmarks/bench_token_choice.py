"""Token-choice MoE layers (E8 top-2, fine-grained E128 top-8) vs a ``torch._grouped_mm`` implementation and a loop.

    python -m benchmarks.bench_token_choice [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--configs ...]
        [--modes forward,full] [--providers ...] [--out DIR] [--time-budget S] [--threads N] [--cpu-budget S]

Per config (dim, expert hidden, E, top_k, tokens): providers

* ``ours``        - :class:`sparsemm_kernels.nn.TokenChoiceMoE`;
* ``routing``     - the same layer's router, routing, plan and row moves with the expert GEMMs left out (what the
  goal "routing + permutation <= 10% of the layer's time for E8 top-2" measures);
* ``grouped_mm``  - the usual fast PyTorch path: ``torch.topk`` + softmax, a stable sort of the (token, expert)
  pairs by expert, ``bincount`` offsets, ``torch._grouped_mm`` for W1 / W3 / W2, the rows unsorted and summed;
* ``loop``        - per expert a boolean mask, ``nonzero``, gather, the FFN and ``index_add`` (host syncs).

Validation first (float32 copies): ``ours`` and ``grouped_mm`` against ``loop`` (relative Frobenius error <= 1e-4;
ties of the router logits are measure-zero). Ratios: ``x ours`` = provider median / ours. Results:
``benchmarks/results/token_choice-<device>-<dtype>-<time>.md`` and ``.json``, every number from this run.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from sparsemm_kernels.nn import TokenChoiceMoE
from sparsemm_kernels.nn.moe import _flat_tokens
from sparsemm_kernels.ops.slots import pick_rows_op, sum_rows_op
from sparsemm_kernels.ops.token_routing import token_choice_route
from sparsemm_kernels.plan import build_plan

OP = "token_choice"
#: name -> (dim, expert hidden, experts, top_k, tokens)
CONFIGS = {
    "E8-top2": (2048, 5632, 8, 2, 32768),
    "E128-top8": (2048, 768, 128, 8, 32768),
    "cpu-E8-top2": (256, 704, 8, 2, 1024),
    "cpu-E64-top8": (256, 96, 64, 8, 1024),
}
GPU_CONFIGS, CPU_CONFIGS = ["E8-top2", "E128-top8"], ["cpu-E8-top2", "cpu-E64-top8"]


def grouped_mm_forward(m: TokenChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The ``torch._grouped_mm`` path on ``m``'s parameters."""
    x2 = x.reshape(-1, m.dim)
    N, E, k = x2.shape[0], m.num_experts, m.top_k
    logits = m.router(x2)
    top, idx = torch.topk(logits, k, dim=-1)
    gates = torch.softmax(top.to(torch.float64 if x2.dtype == torch.float64 else torch.float32), -1).to(x2.dtype)
    order = torch.sort(idx.reshape(-1), stable=True).indices
    offs = torch.cumsum(torch.bincount(idx.reshape(-1), minlength=E), 0).to(torch.int32)
    xs = x2.index_select(0, order // k)
    h = F.silu(torch._grouped_mm(xs, m.w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(
        xs, m.w3.transpose(1, 2), offs=offs)
    ys = torch._grouped_mm(h, m.w2.transpose(1, 2), offs=offs)
    y = torch.empty_like(ys).index_copy(0, order, ys).view(N, k, m.dim)  # back to pair order
    return (y * gates[..., None]).sum(1).view(x.shape)


def loop_forward(m: TokenChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Per expert: a mask, ``nonzero``, the FFN, ``index_add``."""
    x2 = x.reshape(-1, m.dim)
    logits = m.router(x2)
    top, idx = torch.topk(logits, m.top_k, dim=-1)
    gates = torch.softmax(top.to(torch.float64 if x2.dtype == torch.float64 else torch.float32), -1).to(x2.dtype)
    out = torch.zeros_like(x2)
    for e in range(m.num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x2[tok]
        y = F.linear(F.silu(F.linear(xe, m.w1[e])) * F.linear(xe, m.w3[e]), m.w2[e])
        out = out.index_add(0, tok, y * gates[tok, slot][:, None])
    return out.view(x.shape)


def routing_only(m: TokenChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer without its expert GEMMs: router, routing, plan, the rows copied out and gathered back."""
    x2 = _flat_tokens(x, m.dim)
    N, E, k = x2.shape[0], m.num_experts, m.top_k
    idx, gates = token_choice_route(m.router(x2), k)
    pairs = build_plan(idx.reshape(-1), E, backend=None, validate=False, name="expert_idx")
    slots = torch.div(pairs.sorted_to_orig, k, rounding_mode="floor")
    inverse = pairs.orig_to_sorted.view(N, k)
    xe = pick_rows_op(x2, slots, inverse)
    g = gates.reshape(-1).index_select(0, pairs.sorted_to_orig)
    return sum_rows_op(xe * g[:, None], inverse, slots).view(x.shape)


def _validate(m: TokenChoiceMoE, x: torch.Tensor, fn) -> float:
    m32 = copy.deepcopy(m).float()
    x32 = x.detach().float()
    with torch.no_grad():
        return harness.rel_err(fn(m32, x32), loop_forward(m32, x32))


def _step(fn, x, dy, mode):
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(x)
    else:
        def run():
            fn(x).backward(dy)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = harness.cli_parser("python -m benchmarks.bench_token_choice", __doc__.split("\n")[0],
                            "fewer tokens on the CPU", "CPU threads for torch (default 1; 0: leave defaults)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(CONFIGS)} (default: {GPU_CONFIGS} on "
                    f"cuda, {CPU_CONFIGS} on the CPU)")
    args = harness.parse_cli(ap, argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",")] if args.configs else (
        GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        print(f"error: unknown configs {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    wanted = [p for p in ("ours", "routing", "grouped_mm", "loop") if not args.providers or p in args.providers]
    if not hasattr(torch, "_grouped_mm"):
        wanted = [p for p in wanted if p != "grouped_mm"]
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
        dim, hidden, E, k, tokens = CONFIGS[name]
        if args.quick and device.type == "cpu":
            tokens = 256
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(f"time budget spent: stopping before {name}", flush=True)
            break
        torch.manual_seed(args.seed)
        factory = {"device": device, "dtype": dtype}
        m = TokenChoiceMoE(dim, hidden, E, top_k=k, **factory)
        x = torch.randn(tokens, dim, **factory).requires_grad_(True)
        dy = torch.randn(tokens, dim, **factory)
        fns = {"ours": m, "routing": lambda t, m=m: routing_only(m, t),
               "grouped_mm": lambda t, m=m: grouped_mm_forward(m, t), "loop": lambda t, m=m: loop_forward(m, t)}
        checked = {p: _validate(m, x, fn) for p, fn in (("ours", lambda mm, t: mm(t)),
                                                         ("grouped_mm", grouped_mm_forward)) if p in wanted}
        for mode in args.modes:
            run = {p: _step(fns[p], x, dy, mode) for p in wanted}
            grads = {p: [x, *m.parameters()] for p in wanted}
            ok = [p for p in wanted if checked.get(p, 0.0) <= 1e-4]
            if device.type == "cpu":
                qs = harness.time_cpu_alternating([run[p] for p in ok], [grads[p] for p in ok],
                                                  budget_s=args.cpu_budget)
                timed = dict(zip(ok, qs))
            else:
                timed = {p: time_fn(run[p], grad_to_none=grads[p]) for p in ok}
            base = timed.get("ours", [None, None, None])[1]
            for p in wanted:
                row = harness.make_row(env, op=OP, config=name, dim=dim, hidden=hidden, experts=E, top_k=k,
                                       tokens=tokens, provider=p, mode=mode, dtype=dtype_name,
                                       validation_rel_err=checked.get(p))
                if p in timed:
                    q = timed[p]
                    row.update(status="ok", ms_p20=q[0], ms_p50=q[1], ms_p80=q[2],
                               x_ours=q[1] / base if base else None, tokens_per_s=tokens / (q[1] * 1e-3))
                else:
                    row.update(status="FAILED", note=f"validation error {checked.get(p)} > 1e-4: not timed")
                    failed += 1
                rows.append(row)
                shown = (f"{row['ms_p50']:.4g} ms  x ours {row['x_ours']:.3f}" if row["status"] == "ok"
                         else row["note"])
                print(f"{name:13s} {mode:16s} {p:11s} {row['status']:6s} {shown}", flush=True)
        del x, dy, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{OP}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {OP} benchmark: {env['device']}, {dtype_name}", "",
             f"Measured in this run ({harness.now_utc()}), one process; torch {env['torch']}, triton "
             f"{env['triton']}, git {env['git_commit']}. Timing: {method}. x ours = median / ours' median (goals on "
             "H100/H200, bf16: grouped_mm >= 1.2x ours for E128 top-8; routing <= 0.10x ours for E8 top-2). "
             "Validation: float32, against the loop (relative Frobenius error).", "",
             "| config | mode | provider | median ms | p20-p80 ms | x ours | validation | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = r["validation_rel_err"] if r["validation_rel_err"] is not None else "-"
        if r["status"] == "ok":
            lines.append(f"| {r['config']} | {r['mode']} | {r['provider']} | {r['ms_p50']:.4g} | "
                         f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g} | {r['x_ours']:.3f} | {val} | ok |")
        else:
            lines.append(f"| {r['config']} | {r['mode']} | {r['provider']} | | | | {val} | FAILED |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    print(f"{len(rows)} rows ({failed} FAILED) -> {stem}.md, .json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
