"""Grouped GEMM benchmark: every provider on the same inputs, in one process -> markdown tables + JSON rows.

Per shape: inputs -> higher-precision reference -> per mode and provider: validate -> time -> row.

    python -m benchmarks.bench_grouped_gemm [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--quick]
        [--modes forward,full] [--providers a,b] [--out DIR] [--time-budget SECONDS] [--threads N] [--seed S]

Providers (:data:`PROVIDERS`), each computing ``out (T, N)`` from ``x (T, K)`` and ``W (G, N, K)``:

* ``dense_mm``           - one ``torch.mm`` of ``x (T, K) @ W (K, N)``: the same FLOPs with no grouping (the ceiling);
* ``mask_loop``          - the MoT reference style: per group ``out[ids == g] = x[ids == g] @ W_g.T``;
* ``torch_grouped_mm``   - ``torch.nn.functional.grouped_mm`` on rows sorted by group;
* ``smk_grouped_mm``     - ``sparsemm_kernels.grouped_mm`` on rows sorted by group (default backend);
* ``smk_grouped_linear`` - ``sparsemm_kernels.grouped_linear``, rows interleaved at random, routed by a plan;
* ``smk_cpu``            - ``grouped_mm`` forced onto the C++ backend (CPU only).
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import sparsemm_kernels as smk
from benchmarks import harness
from benchmarks.shapes import Shape, shapes_for
from sparsemm_kernels.backend import select_backend, unsupported_reasons
from sparsemm_kernels.reference import grouped_linear_ref, grouped_mm_ref

OP = "grouped_gemm"


class Skip(Exception):
    """A provider cannot run here; the message says why (reported as SKIPPED, not timed)."""


class Case:
    """The inputs of one shape, shared by every provider, and their references (computed once per layout).

    Layouts: ``dense`` (``x (T, K)``, ``W (K, N)``), ``grouped`` (rows sorted by group, ``offsets``) and
    ``routed`` (the same rows interleaved at random; ``ids`` per row and a ``plan`` built here, untimed).
    """

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int):
        torch.manual_seed(seed)
        T, K, N, G = shape.T, shape.K, shape.N, shape.G
        counts = torch.tensor(shape.counts, dtype=torch.int64)
        self.shape, self.dtype = shape, dtype
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        perm = torch.randperm(T)
        self.ids = torch.repeat_interleave(torch.arange(G), counts)[perm].to(device)
        self.orig_of_sorted = torch.argsort(perm).to(device)  # routed row holding sorted row j
        x = torch.randn(T, K, device=device).to(dtype)
        w = (torch.randn(G, N, K, device=device) / K**0.5).to(dtype).requires_grad_()
        w_dense = (torch.randn(K, N, device=device) / K**0.5).to(dtype).requires_grad_()
        self.leaves = {
            "dense": (x.clone().requires_grad_(), w_dense),
            "grouped": (x.clone().requires_grad_(), w),
            "routed": (x[perm.to(device)].clone().requires_grad_(), w),
        }
        self.plan = smk.group_plan(self.ids, G)
        self.dy = torch.randn(T, N, device=device).to(dtype)
        self._refs: dict[str, tuple] = {}

    def reference(self, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out, dx, dw)`` of the layout in :func:`harness.reference_dtype`, by the package's reference loop."""
        if layout not in self._refs:
            rd = harness.reference_dtype(self.dtype)
            x, w = (t.detach().to(rd).requires_grad_() for t in self.leaves[layout])
            if layout == "dense":
                out = x @ w
            elif layout == "grouped":
                out = grouped_mm_ref(x, w, self.offsets)
            else:
                out = grouped_linear_ref(x, w, self.orig_of_sorted, self.offsets)
            out.backward(self.dy.to(rd))
            self._refs[layout] = (out.detach(), x.grad, w.grad)
        return self._refs[layout]


def _dense(c: Case):
    x, w = c.leaves["dense"]
    return lambda: x @ w


def _mask_loop(c: Case):
    """MoT keeps one nn.Linear per group; ``unbind`` gives the same autograd (one separate gradient per
    group, stacked once) where ``w[g]`` would build a full (G, N, K) gradient for every group."""
    x, w = c.leaves["routed"]
    ids, N = c.ids, c.shape.N

    def run():
        out = x.new_empty(x.shape[0], N)
        for g, w_g in enumerate(w.unbind(0)):
            mask = ids == g
            out[mask] = x[mask] @ w_g.T
        return out

    return run


def _torch_grouped_mm(c: Case):
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise Skip(f"torch {torch.__version__} has no grouped_mm")
    x, w = c.leaves["grouped"]
    ends = c.offsets[1:].to(torch.int32)  # grouped_mm takes the G end offsets, int32
    return lambda: fn(x, w.transpose(1, 2), offs=ends)


def _smk_grouped_mm(backend: str | None):
    def make(c: Case):
        if backend is not None:
            reasons = unsupported_reasons("grouped_mm", backend, c.offsets.device, c.dtype)
            if reasons:
                raise Skip("; ".join(reasons))
        x, w = c.leaves["grouped"]
        return lambda: smk.grouped_mm(x, w, c.offsets, backend=backend, validate=False)

    return make


def _smk_grouped_linear(c: Case):
    x, w = c.leaves["routed"]
    return lambda: smk.grouped_linear(x, w, c.plan)


@dataclass(frozen=True)
class Provider:
    """One line of the table. ``make(case)`` returns the zero-argument function to time, or raises :class:`Skip`.

    ``backend``: the sparsemm backend it runs (``"auto"`` = resolved at run time, None = not sparsemm).
    ``unsupported_raises``: an exception from this provider means "cannot run here" (SKIPPED) rather than a bug
    (FAILED). ``devices``: device types it is listed on.
    """

    name: str
    layout: str
    make: Callable[[Case], Callable[[], torch.Tensor]]
    backend: str | None = None
    unsupported_raises: bool = False
    devices: tuple[str, ...] = ("cuda", "cpu")


# dense_mm first: every other row's "x dense" is relative to it.
PROVIDERS = [
    Provider("dense_mm", "dense", _dense),
    Provider("mask_loop", "routed", _mask_loop),
    Provider("torch_grouped_mm", "grouped", _torch_grouped_mm, unsupported_raises=True),
    Provider("smk_grouped_mm", "grouped", _smk_grouped_mm(None), backend="auto"),
    Provider("smk_grouped_linear", "routed", _smk_grouped_linear, backend="auto"),
    Provider("smk_cpu", "grouped", _smk_grouped_mm("cpu"), backend="cpu", devices=("cpu",)),
]


def _validate(fn, case: Case, layout: str, mode: str) -> dict[str, float]:
    """Run ``fn`` once (NaN-poisoned allocations) and return its relative errors against the reference."""
    x, w = case.leaves[layout]
    x.grad = w.grad = None
    with harness.poisoned_empty():
        if mode == "forward":
            with torch.no_grad():
                out = fn()
        else:
            out = fn()
            out.backward(case.dy)
    ref_out, ref_dx, ref_dw = case.reference(layout)
    errors = {"out": harness.rel_err(out, ref_out)}
    if mode != "forward":
        errors.update(dx=harness.rel_err(x.grad, ref_dx), dw=harness.rel_err(w.grad, ref_dw))
    x.grad = w.grad = None
    return errors


def _measure(p: Provider, case: Case, mode: str, time_fn) -> dict:
    """Validate then time one provider in one mode; returns the row's measurement fields.

    A provider that raises, while validated or timed (out of memory included), is FAILED (SKIPPED where
    ``unsupported_raises``) and the run goes on."""
    s, dtype = case.shape, case.dtype
    backend = p.backend
    if backend == "auto":
        backend = select_backend("grouped_mm", case.offsets.device, dtype)
    fields = dict(provider=p.name, backend=backend, status="ok", note="", rel_err=None)
    x, w = case.leaves[p.layout]
    failure = None
    try:
        fn = p.make(case)
        fields["rel_err"] = errors = _validate(fn, case, p.layout, mode)
        if not harness.within_tolerance(errors, dtype):
            worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
            note = f"rel. error {worst} {errors[worst]:.3g} > {harness.TOLERANCE[dtype]:g}; not timed"
            return {**fields, "status": "FAILED", "note": note}
        if mode == "forward":
            with torch.no_grad():
                q = time_fn(fn)
        else:
            q = time_fn(lambda: fn().backward(case.dy), grad_to_none=[x, w])
    except Skip as exc:
        return {**fields, "status": "SKIPPED", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a provider that raises is reported, never fatal to the run
        failure = f"raised {harness.exception_line(exc)}"
    if failure is not None:  # outside the except: its traceback (holding activations) is gone
        x.grad = w.grad = None
        harness.free_device_memory(x.device)
        return {**fields, "status": "SKIPPED" if p.unsupported_raises else "FAILED", "note": failure}
    fl = harness.flops(s.T, s.K, s.N, mode)
    return {**fields, "ms_p20": q[0], "ms_p50": q[1], "ms_p80": q[2], "tflops": fl / (q[1] * 1e-3) / 1e12}


def _parse(argv):
    ap = harness.cli_parser(
        "python -m benchmarks.bench_grouped_gemm", __doc__.split("\n")[0], "a few shapes only",
        "CPU threads for torch and the C++ backend (default 1: stable on a shared machine; 0: leave defaults)",
    )
    return harness.parse_cli(ap, argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, 3 if any provider FAILED (validation, or it raised), 2 on a bad request."""
    args = _parse(argv)
    budget = harness.CaseBudget(args.time_budget)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = harness.DTYPES[dtype_name]
    providers = [p for p in PROVIDERS if device.type in p.devices]
    if args.providers:
        wanted = [n.strip() for n in args.providers.split(",")]
        unknown = set(wanted) - {p.name for p in providers}
        if unknown:
            print(f"error: unknown providers {sorted(unknown)}; known: {[p.name for p in providers]}", file=sys.stderr)
            return harness.EXIT_BAD_REQUEST
        providers = [p for p in providers if p.name in wanted]
    if device.type == "cpu" and args.threads > 0:
        harness.set_cpu_threads(args.threads)
    shapes = shapes_for(device.type, args.quick)
    env = harness.collect_env(device)
    time_fn, method = harness.timer(device)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{OP}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    header = [
        f"# {OP} benchmark: {env['device']}, {dtype_name}",
        "",
        f"Every number below was measured in this run ({harness.now_utc()}), in one process on this device, "
        "all providers on the same inputs; compare numbers only within this file.",
        "",
        f"- device: {env['device']}"
        + (
            f" (sm_{env['capability'].replace('.', '')}, {env.get('sm_count')} SMs, driver {env.get('driver', 'n/a')})"
            if device.type == "cuda"
            else f" ({env['cpu_count']} cores, {env['torch_threads']} threads for torch and the C++ backend)"
        ),
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}",
        f"- git: {env['git_commit'] or 'n/a'}" + (" (uncommitted changes)" if env["git_dirty"] else ""),
        f"- dtype: {dtype_name}; shapes: {'quick' if args.quick else 'full'} {device.type} set of benchmarks/shapes.py",
        f"- timing: {method}; median = p50",
        "- TFLOP/s = FLOPs / median time; FLOPs: forward 2*T*K*N, forward+backward 3*2*T*K*N (dX and dW each 2*T*K*N)",
        "- x dense = dense_mm median / provider median, same shape and mode (1.0 = as fast as one torch.mm "
        "of the same FLOPs)",
        f"- validation: before timing, each provider's output (and dX, dW in forward+backward) is compared with a "
        f"{str(harness.reference_dtype(dtype)).replace('torch.', '')} reference by relative Frobenius error; above "
        f"{harness.TOLERANCE[dtype]:g} it is FAILED and not timed",
        "- forward mode runs under torch.no_grad()",
    ]
    print("\n".join(header), flush=True)
    rows: list[dict] = []
    done = 0
    for shape in shapes:
        if not budget.try_start(shape.label()):
            break
        case, failure = None, None
        try:
            case = Case(shape, device, dtype, args.seed)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory making the inputs: report, go on
            failure = f"setup raised {harness.exception_line(exc)}"
        if failure is not None:  # outside the except: its traceback (holding tensors) is gone
            harness.free_device_memory(device)
        for mode in args.modes:
            dense_ms = None
            for p in providers:
                if case is None:
                    m = dict(provider=p.name, backend=None, status="FAILED", note=failure, rel_err=None)
                else:
                    m = _measure(p, case, mode, time_fn)
                if p.name == "dense_mm" and m["status"] == "ok":
                    dense_ms = m["ms_p50"]
                x_dense = dense_ms / m["ms_p50"] if dense_ms and m.get("ms_p50") else None
                row = harness.make_row(
                    env,
                    op=OP,
                    mode=mode,
                    T=shape.T,
                    K=shape.K,
                    N=shape.N,
                    G=shape.G,
                    split=shape.split,
                    counts=shape.counts,
                    dtype=dtype_name,
                    flops=harness.flops(shape.T, shape.K, shape.N, mode),
                    timing="do_bench" if device.type == "cuda" else "perf_counter",
                    **m,
                    x_dense=x_dense,
                )
                rows.append(row)
                ms = f"{row['ms_p50']:.4g} ms  {row['tflops']:.3g} TFLOP/s" if row["status"] == "ok" else row["note"]
                print(f"{shape.label():32s} {mode:16s} {p.name:18s} {row['status']:7s} {ms}", flush=True)
        done += 1
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
        budget.done()
        harness.write_results(stem, header, env, rows, args.modes, complete=done == len(shapes))
    md, js = harness.write_results(stem, header, env, rows, args.modes, complete=done == len(shapes))
    for mode in args.modes:
        print(f"\n## {mode}\n\n{harness.markdown_table(rows, mode)}")
    failed = [r for r in rows if r["status"] == "FAILED"]
    print(f"\n{len(rows)} rows ({len(failed)} FAILED) in {budget.elapsed():.1f} s -> {md}, {js}", flush=True)
    return harness.EXIT_FAILED if failed else harness.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
