"""Benchmark plumbing shared by every ``bench_*.py``: FLOP counts, validation, timing, environment, result files.

Per measurement: validate once against a higher-precision reference -> time -> one JSON row (:func:`make_row`).

Timing on CUDA is ``triton.testing.do_bench`` (CUDA events; it writes a 256 MB buffer before every timed run,
which flushes L2, so inputs are not rotated); on CPU a warm-up then a ``time.perf_counter`` loop. Both report the
p20/p50/p80 of the per-run times, and gradients are set to ``None`` between runs, outside the timed region.

Exit status of every benchmark's ``main`` (:data:`EXIT_OK`, :data:`EXIT_BAD_REQUEST`, :data:`EXIT_FAILED`): 0 when
every provider passed, 2 for a bad request, 3 when the run completed but a provider FAILED (validation, or a case
raised); an uncaught exception exits 1, so a crash is never mistaken for a failed provider.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import functools
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsemm_kernels.utils.device import fp32_matmul_allows_tf32

REPO = Path(__file__).resolve().parent.parent

EXIT_OK, EXIT_BAD_REQUEST, EXIT_FAILED = 0, 2, 3


def _process_age() -> float:
    """Seconds since this process started (Linux: its start time in /proc; elsewhere 0, i.e. since this import)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
    return age if 0.0 <= age < 3600.0 else 0.0  # a clock mismatch: fall back to this import


#: ``time.monotonic()`` when this process started: a --time-budget counts the imports and CUDA start-up too, as the
#: ``timeout`` that backs it does.
PROCESS_START = time.monotonic() - _process_age()

# FLOPs of a mode, in units of the forward 2*T*K*N: forward+backward adds dX (2*T*K*N) and dW (2*T*K*N).
MODES = {"forward": 1, "forward+backward": 3}

# Largest relative Frobenius error ||out - ref|| / ||ref|| accepted before timing, per input dtype. The
# reference runs in float64 for float32 inputs and float32 otherwise, on the same (already rounded) inputs.
# float32 allows TF32 (~3e-4); bf16/fp16 allow accumulation order and the rounding of the output.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

QUANTILES = (0.2, 0.5, 0.8)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops(T: int, K: int, N: int, mode: str) -> int:
    """Useful FLOPs of one run: forward ``2*T*K*N``; forward+backward ``3 * 2*T*K*N`` (out, dX, dW)."""
    return MODES[mode] * 2 * T * K * N


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references are computed in: float64 for float32/float64 inputs, float32 for fp16/bf16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """``||actual - ref||_F / ||ref||_F`` in ``ref``'s dtype (NaN if ``actual`` has a NaN; absolute if ref is 0)."""
    diff = torch.linalg.vector_norm(actual.detach().to(ref.dtype) - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def within_tolerance(errors: dict[str, float], dtype: torch.dtype) -> bool:
    """True when every error is finite and at most :data:`TOLERANCE` for ``dtype`` (NaN never passes)."""
    return all(e <= TOLERANCE[dtype] for e in errors.values())


@contextmanager
def poisoned_empty():
    """While active, ``torch.empty`` (and so every fresh output) is filled with NaN: unwritten elements show.

    Uses PyTorch's deterministic mode in warn-only form; its warnings are silenced. Validation only.
    """
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev[2]


def _reset(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def time_cuda(fn: Callable[[], object], grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> list[float]:
    """p20/p50/p80 ms of ``fn`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run)."""
    from triton.testing import do_bench

    return [
        float(q)
        for q in do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
    ]


def time_cpu(
    fn: Callable[[], object],
    grad_to_none=None,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 100,
    budget_s: float = 0.25,
) -> list[float]:
    """p20/p50/p80 ms of ``fn`` on the host clock: ``warmup`` untimed runs, then at least ``min_runs`` timed runs,
    more until ``budget_s`` seconds have passed or ``max_runs`` were taken."""
    for _ in range(warmup):
        _reset(grad_to_none)
        fn()
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < stop):
        _reset(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return [deciles[1], statistics.median(samples), deciles[7]]


def time_cpu_alternating(
    fns: list[Callable[[], object]],
    grads_to_none: list | None = None,
    warmup: int = 2,
    min_rounds: int = 7,
    max_rounds: int = 200,
    budget_s: float = 2.0,
    samples_out: list | None = None,
) -> list[list[float]]:
    """p20/p50/p80 ms of each of ``fns``, timed side by side: every round runs each function once, in turn, so
    drift of the machine (other load, clocks, caches) falls on all of them alike. At least ``min_rounds``
    rounds, more until ``budget_s`` seconds have passed or ``max_rounds`` were taken. ``samples_out``: a list
    that receives each function's ms per round (for ratios paired by round, :func:`paired_ratio`)."""
    grads_to_none = grads_to_none or [None] * len(fns)
    for _ in range(warmup):
        for fn, g in zip(fns, grads_to_none):
            _reset(g)
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    stop = time.perf_counter() + budget_s
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < stop):
        for i, (fn, g) in enumerate(zip(fns, grads_to_none)):
            _reset(g)
            t0 = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    if samples_out is not None:
        samples_out[:] = samples
    return [p20_p50_p80(s) for s in samples]


def p20_p50_p80(values: list[float]) -> list[float]:
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return [deciles[1], statistics.median(values), deciles[7]]


def paired_ratio(num: list[float], den: list[float]) -> list[float]:
    """p20/p50/p80 of ``num[i] / den[i]`` over the rounds of :func:`time_cpu_alternating`: the two were timed
    back to back in each round, so a slow round slows both and cancels from the ratio."""
    return p20_p50_p80([a / b for a, b in zip(num, den)])


def timer(device: torch.device) -> tuple[Callable[..., list[float]], str]:
    """The timing function for ``device`` and a one-line description of the method for the report."""
    if device.type == "cuda":
        return time_cuda, (
            "triton.testing.do_bench (CUDA events; warm-up 25 ms, 100 ms of timed runs; L2 flushed before every "
            "run by do_bench's 256 MB buffer write, inputs not rotated; grads set to None before every run)"
        )
    return time_cpu, (
        "time.perf_counter around each run after 2 warm-up runs; 5-100 runs within 0.25 s "
        "(grads set to None before every run, outside the timed region)"
    )


def set_cpu_threads(n: int) -> None:
    """Run CPU work on ``n`` threads: PyTorch's pool and the OpenMP (libgomp) pool the C++ extension uses.

    ``OMP_NUM_THREADS`` covers a libgomp not loaded yet; ``omp_set_num_threads`` one already loaded (it sets the
    calling thread's default, and the extension is called from this thread).
    """
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(n)
    except (OSError, AttributeError):
        pass


def exception_line(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (160 characters at most), for a FAILED row's note."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}".strip()


def free_device_memory(device: torch.device) -> None:
    """After a failure (out of memory above all): drop what the failed case held so the next one can run."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def case_fits(budget_s: float | None, elapsed_s: float, longest_s: float) -> bool:
    """The --time-budget rule: start a case only if it would end within the budget when it takes as long as the
    longest case so far (0 before the first: the first case always starts while time is left)."""
    return budget_s is None or elapsed_s + longest_s <= budget_s


class CaseBudget:
    """--time-budget over a loop of cases: :meth:`try_start` before a case (False: stop, the reason printed),
    :meth:`done` after it. Elapsed time counts from ``start`` (default: this process's start)."""

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s = budget_s
        self.start = PROCESS_START if start is None else start
        self.longest = 0.0
        self._case_start: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def try_start(self, label: str) -> bool:
        elapsed = self.elapsed()
        if not case_fits(self.budget_s, elapsed, self.longest):
            print(f"time budget {self.budget_s:g} s: {elapsed:.1f} s spent + {self.longest:.1f} s for the longest "
                  f"case so far would pass it: stopping before {label}", flush=True)
            return False
        self._case_start = time.monotonic()
        return True

    def done(self) -> None:
        if self._case_start is not None:
            self.longest = max(self.longest, time.monotonic() - self._case_start)
            self._case_start = None


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvml_facts(index: int) -> dict:
    """Driver version and clocks from NVML; empty when NVML is missing (never raises)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        facts = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        }
        pynvml.nvmlShutdown()
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in facts.items()}
    except Exception:  # noqa: BLE001 - telemetry is optional: any NVML failure means "not available"
        return {}


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the code measured: the environment variables ``SPARSEMM_GIT_COMMIT`` and
    ``SPARSEMM_GIT_DIRTY`` (1/true/yes or 0/false/no) where set (a copied tree has no .git), else ``git`` (None
    for what neither says)."""
    commit = os.environ.get("SPARSEMM_GIT_COMMIT", "").strip() or None
    dirty_text = os.environ.get("SPARSEMM_GIT_DIRTY", "").strip().lower()
    dirty = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(dirty_text)
    if commit is None:
        commit = _git("rev-parse", "HEAD")
        if commit is not None and dirty is None:
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return commit, dirty


@functools.cache
def _collect_env(device_type: str, index: int) -> dict:
    commit, dirty = git_state()
    env = {
        "device_type": device_type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            allow_tf32=fp32_matmul_allows_tf32(),
            **_nvml_facts(index),
        )
    else:
        env.update(device=_cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    return env


def collect_env(device: torch.device) -> dict:
    """Facts about this run's machine and software, collected once per device."""
    return dict(_collect_env(device.type, device.index or 0))


def slug(text: str, limit: int = 40) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (for file names)."""
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-") or "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_row(env: dict, **fields) -> dict:
    """One measurement as a flat dict: the given fields plus device, versions, git commit and timestamp, and
    the machine's 1-minute load average with the cores there were (``load_avg``, ``cores``)."""
    keep = ("device", "torch", "triton", "cuda", "git_commit", "git_dirty")
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return {**fields, **{k: env.get(k) for k in keep}, "timestamp": now_utc(), "load_avg": load,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def trust_note(row: dict, max_spread: float = 0.10) -> str:
    """Why a timed row cannot be trusted ("" when it can): a p20-p80 spread over ``max_spread`` of the median, or
    a load average over the cores (another job competed for the machine)."""
    notes = []
    if row.get("ms_p50"):
        spread = (row["ms_p80"] - row["ms_p20"]) / row["ms_p50"]
        if spread > max_spread:
            notes.append(f"p20-p80 spread {spread:.0%} of the median")
    if row.get("load_avg") is not None and row.get("cores") and row["load_avg"] > row["cores"]:
        notes.append(f"load average {row['load_avg']:.1f} > {row['cores']} cores")
    return ("do not trust: " + "; ".join(notes)) if notes else ""


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[dict], mode: str) -> str:
    """The rows of one mode as a markdown table (shape, G, split, provider, median ms, TFLOP/s, x dense, note)."""
    head = "| T | K | N | G | split | provider | backend | median ms | p20-p80 ms | TFLOP/s | x dense | note |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    by_shape = sorted(
        (r for r in rows if r["mode"] == mode), key=lambda r: (r["T"], r["K"], r["N"], r["G"], r["split"])
    )
    for r in by_shape:
        spread = f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}" if r["status"] == "ok" else ""
        note = r.get("note") or ""
        if r["status"] != "ok":
            note = f"**{r['status']}** {note}".strip()
        cells = [
            r["T"],
            r["K"],
            r["N"],
            r["G"],
            r["split"],
            r["provider"],
            r.get("backend") or "",
            _fmt(r.get("ms_p50"), ".4g"),
            spread,
            _fmt(r.get("tflops"), ".3g"),
            _fmt(r.get("x_dense"), ".2f"),
            note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_results(stem: Path, header: list[str], env: dict, rows: list[dict], modes: list[str], complete: bool):
    """Write ``stem.md`` (header lines + one table per mode) and ``stem.json`` (environment + rows)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    status = "complete" if complete else "PARTIAL (stopped before every shape ran; see the rows present)"
    md = [*header, f"- status: {status}", ""]
    for mode in modes:
        md += [f"## {mode}", "", markdown_table(rows, mode), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "complete": complete, "rows": rows}, indent=1) + "\n"
    )
    return stem.with_suffix(".md"), stem.with_suffix(".json")


CLI_MODES = {"forward": "forward", "full": "forward+backward"}


def cli_parser(prog: str, description: str, quick_help: str, threads_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares; a script adds its own before calling :func:`parse_cli`."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--modes", default="forward,full", help="comma list of: forward, full (= forward+backward)")
    ap.add_argument("--providers", default=None, help="comma list (default: all for the device)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for .md/.json")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="start no case that would end past this many seconds after the process started, were it "
                    "as long as the longest case so far")
    ap.add_argument("--threads", type=int, default=1, help=threads_help)
    ap.add_argument("--cpu-budget", type=float, default=2.0,
                    help="CPU: seconds of alternating timed rounds per case (at least 7 rounds; default 2)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse_cli(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse, turning ``--modes`` into the harness's mode names."""
    args = ap.parse_args(argv)
    args.modes = [CLI_MODES[m.strip()] for m in args.modes.split(",") if m.strip()]
    return args
