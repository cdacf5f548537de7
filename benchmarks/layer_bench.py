"""What the layer benchmarks (``bench_moma_ffn``, ``bench_mod``, ``bench_token_choice``) share: the command line and
device, one config's providers validated then timed per mode (CPU: in alternating rounds), and the results files.

A script describes a config as a :class:`Case` (its providers, their leaves, the validation errors, the row fields)
and how to format its table; :func:`run` does the rest.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import harness

#: A provider is validated against its reference before timing; above this relative error it is FAILED, not timed.
MAX_REL_ERR = 1e-4


@dataclass
class Case:
    """One config: ``providers`` name -> a function of the input ``x`` returning the output, ``leaves`` name -> the
    tensors whose gradients are reset before each run (the input included), ``checked`` name -> validation error
    (providers without one are not checked), ``fields`` the row fields of the config (sizes)."""

    x: torch.Tensor
    dy: torch.Tensor
    providers: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    leaves: dict[str, list[torch.Tensor]]
    checked: dict[str, float] = field(default_factory=dict)
    fields: dict = field(default_factory=dict)


def _step(fn, x, dy, mode):
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(x)
    else:
        def run():
            fn(x).backward(dy)
    return run


def run(
    op: str,
    doc: str,
    argv: list[str] | None,
    configs: dict,
    defaults: Callable[[str, bool], list[str]],
    providers: list[str],
    build: Callable[[str, torch.device, torch.dtype, argparse.Namespace], Case],
    baseline: str,
    ratios: Callable[[str, dict], dict],
    intro: str,
    columns: list[tuple[str, Callable[[dict], str]]],
) -> int:
    """Parse the command line, then for every config ``build`` its :class:`Case`, time its valid providers per mode,
    and write ``<op>-<device>-<dtype>-<time>.md/.json``. ``defaults(device_type, quick)``: the configs run when
    none are named; ``ratios(provider, timed medians)``: extra row fields; ``columns``: the table's (header,
    cell of a timed row) after the provider column. Returns 0, 1 if a provider FAILED validation, 2 on a bad
    request."""
    ap = harness.cli_parser(f"python -m benchmarks.{op}", doc.split("\n")[0], "fewer tokens on the CPU",
                            "CPU threads for torch (default 1; 0: leave defaults)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(configs)} (default: "
                    f"{defaults('cuda', False)} on cuda, {defaults('cpu', False)} on the CPU)")
    args = harness.parse_cli(ap, argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",")] if args.configs else defaults(device.type, args.quick)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        print(f"error: unknown configs {unknown}; known: {list(configs)}", file=sys.stderr)
        return 2
    wanted = [p for p in providers if not args.providers or p in args.providers.split(",")]
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
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(f"time budget spent: stopping before {name}", flush=True)
            break
        torch.manual_seed(args.seed)
        case = build(name, device, dtype, args)
        present = [p for p in wanted if p in case.providers]  # a config may run a subset (e.g. its block sizes)
        for mode in args.modes:
            runs = {p: _step(case.providers[p], case.x, case.dy, mode) for p in present}
            ok = [p for p in present if case.checked.get(p, 0.0) <= MAX_REL_ERR]
            if device.type == "cpu":
                qs = harness.time_cpu_alternating([runs[p] for p in ok], [case.leaves[p] for p in ok],
                                                  budget_s=args.cpu_budget)
                timed = dict(zip(ok, qs))
            else:
                timed = {p: time_fn(runs[p], grad_to_none=case.leaves[p]) for p in ok}
            medians = {p: q[1] for p, q in timed.items()}
            base = medians.get(baseline)
            for p in present:
                row = harness.make_row(env, op=op, config=name, provider=p, mode=mode, dtype=dtype_name,
                                       validation_rel_err=case.checked.get(p), **case.fields)
                if p in timed:
                    q = timed[p]
                    row.update(status="ok", ms_p20=q[0], ms_p50=q[1], ms_p80=q[2],
                               x_base=q[1] / base if base else None, **ratios(p, medians))
                else:
                    row.update(status="FAILED", note=f"validation error {case.checked.get(p)} > {MAX_REL_ERR}: "
                               "not timed")
                    failed += 1
                rows.append(row)
                shown = (f"{row['ms_p50']:.4g} ms  x {baseline} {row['x_base']:.3f}" if row["status"] == "ok"
                         else row["note"])
                print(f"{name:13s} {mode:16s} {p:12s} {row['status']:6s} {shown}", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stem = _write(op, env, dtype_name, args.out, f"Timing: {method}. {intro}", columns, rows)
    print(f"{len(rows)} rows ({failed} FAILED) -> {stem}.md, .json", flush=True)
    return 1 if failed else 0


def _write(op: str, env: dict, dtype_name: str, out: str, intro: str, columns, rows: list[dict]) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(out) / f"{op}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    heads = ["config", "mode", "provider", *(h for h, _ in columns), "validation", "status"]
    lines = [f"# {op} benchmark: {env['device']}, {dtype_name}", "",
             f"Measured in this run ({harness.now_utc()}), one process; torch {env['torch']}, triton {env['triton']}, "
             f"git {env['git_commit']}. {intro}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        val = r["validation_rel_err"] if r["validation_rel_err"] is not None else "-"
        cells = [cell(r) if r["status"] == "ok" else "" for _, cell in columns]
        lines.append("| " + " | ".join([r["config"], r["mode"], r["provider"], *cells, str(val), r["status"]]) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    return stem


def median_cells(r: dict) -> str:
    return f"{r['ms_p50']:.4g}"


def spread_cells(r: dict) -> str:
    return f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}"


def field_cells(name: str, spec: str = ".3f") -> Callable[[dict], str]:
    """A table cell showing a row's ``name`` field (blank where the row has none)."""
    return lambda r: format(r[name], spec) if r.get(name) is not None else ""
