"""What the layer benchmarks (``bench_moma_ffn``, ``bench_mod``, ``bench_token_choice``, ``bench_avgk``) share: the
command line and device, one config's providers validated then timed per mode (CPU: in alternating rounds), and the
results files, rewritten after every mode so a run killed half-way leaves what it measured.

A script describes a config as a :class:`Case` (its providers, their leaves, the validation errors, the row fields)
and how to format its table; :func:`run` does the rest. A config whose build raises, or a provider that raises while
timed (out of memory, a Triton compile error), becomes a FAILED row and the run goes on; exit status as
:mod:`benchmarks.harness` says (0 / 2 / 3, 1 only for a crash).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
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
    (providers without one are not checked), ``fields`` the row fields of the config (sizes), ``skipped`` name ->
    why it is left out."""

    x: torch.Tensor
    dy: torch.Tensor
    providers: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    leaves: dict[str, list[torch.Tensor]]
    checked: dict[str, float] = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    #: providers left out of this config, with the reason (a SKIPPED row each, not a failure)
    skipped: dict[str, str] = field(default_factory=dict)


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
    and write ``<op>-<device>-<dtype>-<time>.md/.json`` (rewritten after every mode, marked PARTIAL until the run
    completes). ``defaults(device_type, quick)``: the configs run when none are named; ``ratios(provider, timed
    medians)``: extra row fields; ``columns``: the table's (header, cell of a timed row) after the provider column.
    A config whose ``build`` raises, or a provider that raises while timed, is a FAILED row and the run goes on.
    Returns 0, 3 if a provider FAILED (validation, or it or its config raised), 2 on a bad request."""
    ap = harness.cli_parser(f"python -m benchmarks.{op}", doc.split("\n")[0], "fewer tokens on the CPU",
                            "CPU threads for torch (default 1; 0: leave defaults)")
    ap.add_argument("--configs", default=None, help=f"comma list of {list(configs)} (default: "
                    f"{defaults('cuda', False)} on cuda, {defaults('cpu', False)} on the CPU)")
    args = harness.parse_cli(ap, argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    names = [c.strip() for c in args.configs.split(",")] if args.configs else defaults(device.type, args.quick)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        print(f"error: unknown configs {unknown}; known: {list(configs)}", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    wanted = [p for p in providers if not args.providers or p in args.providers.split(",")]
    if device.type == "cpu" and args.threads > 0:
        harness.set_cpu_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = harness.DTYPES[dtype_name]
    env = harness.collect_env(device)
    time_fn, method = harness.timer(device)
    if device.type == "cpu":
        method = (f"time.perf_counter, every provider of a config in alternating rounds (at least 7 rounds, "
                  f"{args.cpu_budget:g} s) after one trial run each, grads set to None before every run")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{op}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    title = [f"# {op} benchmark: {env['device']}, {dtype_name}", "",
             f"Measured in this run ({harness.now_utc()}), one process; torch {env['torch']}, triton {env['triton']}, "
             f"git {env['git_commit']}. Timing: {method}. {intro} A provider that raises (e.g. out of memory) is "
             "FAILED and not timed; a config whose setup raised has one FAILED row, provider (setup), per mode."]
    budget = harness.CaseBudget(args.time_budget)
    rows: list[dict] = []
    done = 0
    for name in names:
        if not budget.try_start(name):
            break
        torch.manual_seed(args.seed)
        case, failure = None, None
        try:
            case = build(name, device, dtype, args)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory or a compile error building it: report, go on
            failure = f"setup raised {harness.exception_line(exc)}"
        if failure is not None:  # outside the except: its traceback (holding tensors) is gone
            harness.free_device_memory(device)
        for mode in args.modes:
            if case is None:
                row = harness.make_row(env, op=op, config=name, provider="(setup)", mode=mode, dtype=dtype_name,
                                       validation_rel_err=None, status="FAILED", note=failure)
                mode_rows = [row]
            else:
                fields = dict(op=op, config=name, mode=mode, dtype=dtype_name, **case.fields)
                mode_rows = _measure_mode(case, wanted, mode, device, time_fn, args.cpu_budget, baseline, ratios,
                                          env, fields)
            for row in mode_rows:
                shown = (f"{row['ms_p50']:.4g} ms  x {baseline} {row['x_base']:.3f}" if row["status"] == "ok"
                         else row["note"])
                print(f"{name:13s} {mode:16s} {row['provider']:12s} {row['status']:7s} {shown}", flush=True)
            rows += mode_rows
            _write(stem, title, env, columns, rows, complete=False)
        done += 1
        del case
        harness.free_device_memory(device)
        budget.done()
    _write(stem, title, env, columns, rows, complete=done == len(names))
    failed = sum(r["status"] == "FAILED" for r in rows)
    print(f"{len(rows)} rows ({failed} FAILED) in {budget.elapsed():.1f} s -> {stem}.md, .json", flush=True)
    return harness.EXIT_FAILED if failed else harness.EXIT_OK


def _attempt(fn: Callable[[], object], leaves: list[torch.Tensor], device: torch.device):
    """``(fn(), None)``, or ``(None, "raised Type: message")`` once the memory the failure held is freed; the
    leaves' grads are reset either way."""
    result, failure = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a provider that raises (out of memory, a compile error) is reported
        failure = f"raised {harness.exception_line(exc)}"
    for t in leaves:
        t.grad = None
    if failure is not None:  # outside the except: its traceback (holding activations) is gone
        harness.free_device_memory(device)
    return result, failure


def _measure_mode(case: Case, wanted: list[str], mode: str, device: torch.device, time_fn, cpu_budget: float,
                  baseline: str, ratios: Callable[[str, dict], dict], env: dict, fields: dict) -> list[dict]:
    """One config in one mode: a row per wanted provider (ok and timed, FAILED, or SKIPPED by the config), each
    with the row ``fields``."""
    present = [p for p in wanted if p in case.providers]  # a config may run a subset (e.g. its block sizes)
    runs = {p: _step(case.providers[p], case.x, case.dy, mode) for p in present}
    valid = [p for p in present if case.checked.get(p, 0.0) <= MAX_REL_ERR]
    timed, raised = {}, {}
    if device.type == "cpu":
        for p in valid:  # a trial run each: one provider that raises must not sink the alternating rounds
            _, raised[p] = _attempt(runs[p], case.leaves[p], device)
        ok = [p for p in valid if raised[p] is None]
        if ok:
            leaves = [t for p in ok for t in case.leaves[p]]
            qs, failure = _attempt(lambda: harness.time_cpu_alternating(
                [runs[p] for p in ok], [case.leaves[p] for p in ok], budget_s=cpu_budget), leaves, device)
            if failure is not None:
                raised.update(dict.fromkeys(ok, f"{failure} (in the alternating rounds)"))
            else:
                timed = dict(zip(ok, qs))
    else:
        for p in valid:
            q, raised[p] = _attempt(lambda p=p: time_fn(runs[p], grad_to_none=case.leaves[p]), case.leaves[p], device)
            if q is not None:
                timed[p] = q
    medians = {p: q[1] for p, q in timed.items()}
    base = medians.get(baseline)
    rows = []
    for p in present:
        row = harness.make_row(env, provider=p, validation_rel_err=case.checked.get(p), **fields)
        if p in timed:
            q = timed[p]
            row.update(status="ok", ms_p20=q[0], ms_p50=q[1], ms_p80=q[2], x_base=q[1] / base if base else None,
                       **ratios(p, medians))
        elif p in valid:
            row.update(status="FAILED", note=f"{raised[p]}: not timed")
        else:
            row.update(status="FAILED", note=f"validation error {case.checked.get(p)} > {MAX_REL_ERR}: not timed")
        rows.append(row)
    for p in wanted:
        if p in case.skipped:
            rows.append(harness.make_row(env, provider=p, validation_rel_err=None, status="SKIPPED",
                                         note=case.skipped[p], **fields))
    return rows


def _write(stem: Path, title: list[str], env: dict, columns, rows: list[dict], complete: bool) -> Path:
    stem.parent.mkdir(parents=True, exist_ok=True)
    status = "complete" if complete else "PARTIAL (stopped before every config ran; see the rows present)"
    heads = ["config", "mode", "provider", *(h for h, _ in columns), "validation", "status", "note"]
    lines = [*title, "", f"- status: {status}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        val = r["validation_rel_err"] if r["validation_rel_err"] is not None else "-"
        cells = [cell(r) if r["status"] == "ok" else "" for _, cell in columns]
        note = (r.get("note") or "").replace("|", "/")
        lines.append("| " + " | ".join([r["config"], r["mode"], r["provider"], *cells, str(val), r["status"], note])
                     + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "complete": complete, "rows": rows}, indent=1, default=str))
    return stem


def median_cells(r: dict) -> str:
    return f"{r['ms_p50']:.4g}"


def spread_cells(r: dict) -> str:
    return f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}"


def field_cells(name: str, spec: str = ".3f") -> Callable[[dict], str]:
    """A table cell showing a row's ``name`` field (blank where the row has none)."""
    return lambda r: format(r[name], spec) if r.get(name) is not None else ""
