"""Measuring training steps: the dense-matmul ceiling, the auto batch size, and one configuration's numbers.

Per configuration: build (seeded) -> batch (``auto``: the largest every member of the group fits, found on the
GPU by doubling then bisection, one step per try) -> warm-up steps -> N timed steps (NVML sampled) -> peak
memory -> one profiled step (breakdown) -> FLOPs, TFLOP/s, MFU.

The step (:data:`STEP`): forward, next-token cross-entropy, backward; gradients set to None before every step,
outside the timed region; by default no optimizer update (``--optimizer sgd|adamw`` adds one inside the step).
Timing: CUDA events around each step on a GPU (no host sync between steps, so launch gaps and host syncs inside a
step count), ``time.perf_counter`` on the CPU.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from profiling import breakdown as _breakdown
from profiling import nvml
from profiling.flops import flop_count, param_count
from profiling.registry import ModelConfig, family

STEP = (
    "forward + next-token cross-entropy (on the model-dtype logits) + backward; gradients set to None before each "
    "step, outside the timed region"
)
OPTIMIZER_NOTE = {
    "none": "no optimizer update (MoT's larger parameter count would cost proportionally more in one)",
    "sgd": "plus torch.optim.SGD(lr=1e-6).step() inside the step",
    "adamw": "plus torch.optim.AdamW(lr=1e-6).step() inside the step (fused on CUDA)",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


@dataclass
class Settings:
    """How to measure. warmup/steps: untimed and timed steps per configuration; max_batch: the auto-batch cap;
    memory_fraction: a try "fits" when its peak allocation stays under this share of the GPU's memory;
    time_budget_s: start no new configuration after this many seconds (None: no limit); trace_dir: where the
    profiled step of each configuration goes as a Chrome trace (None: no traces); first_batch: the auto
    search's first try (near the answer for the GPU sizes, so Triton autotunes at a realistic token count)."""

    device: torch.device
    dtype: torch.dtype
    warmup: int = 3
    steps: int = 20
    seed: int = 0
    optimizer: str = "none"
    breakdown: bool = True
    progress: bool = True
    max_batch: int = 64
    first_batch: int = 8
    memory_fraction: float = 0.9
    time_budget_s: float | None = None
    trace_dir: str | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when torch sees one, else the CPU. ``cuda`` without a GPU raises."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"--device {name}: torch sees no CUDA device on this machine")
        if device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceUnavailableError(f"--device {name}: only cpu and cuda are supported")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU (bf16 matmuls are very slow there, and the Triton interpreter lacks bf16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal (logs get :func:`log` lines instead)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def log(message: str) -> None:
    """One line on stderr, drawn above any progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


def make_step(work, inputs: dict, optimizer: str) -> tuple[Callable[[], None], Callable[[], None], object]:
    """``(step, zero, opt)``: one training step, the gradient reset done before each, and the optimizer or None."""
    params = [p for p in work.model.parameters() if p.requires_grad]
    opt = None
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-6)
    elif optimizer == "adamw":
        fused = params[0].is_cuda if params else False
        opt = torch.optim.AdamW(params, lr=1e-6, fused=fused or None)
    elif optimizer != "none":
        raise ValueError(f"`optimizer` must be none, sgd or adamw, got {optimizer!r}")

    def step() -> None:
        work.loss(work.model, inputs).backward()
        if opt is not None:
            opt.step()

    def zero() -> None:
        for p in params:
            p.grad = None

    return step, zero, opt


def time_steps(step, zero, device: torch.device, n: int, desc: str = "", progress: bool = False) -> list[float]:
    """Milliseconds of each of ``n`` steps: CUDA events on a GPU, the host clock on the CPU."""
    it = progress_bar(range(n), n, desc, progress)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i in it:
            zero()
            events[i][0].record()
            step()
            events[i][1].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in it:
        zero()
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# A measurement is flagged as untrustworthy past these (the report and the console summary say so).
MAX_SPREAD = 0.10  # (p80 - p20) / median
LOAD_PER_CORE = 1.0  # 1-minute load average per core


def machine_load() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def trust_warnings(timing: dict, load: float | None, cores: int) -> list[str]:
    """Why a timing cannot be trusted (empty when it can): a wide p20-p80 spread, or a busy machine."""
    warnings = []
    spread = (timing["p80_ms"] - timing["p20_ms"]) / timing["median_ms"] if timing["median_ms"] > 0 else 0.0
    if spread > MAX_SPREAD:
        warnings.append(f"p20-p80 spread {spread:.0%} of the median (> {MAX_SPREAD:.0%})")
    if load is not None and load > LOAD_PER_CORE * cores:
        warnings.append(f"load average {load:.1f} > {cores} cores (other work was running)")
    return warnings


def summarize(ms: list[float]) -> dict:
    """Median, p20, p80, min, max, mean and count of a list of times."""
    if len(ms) >= 2:
        q = statistics.quantiles(ms, n=10, method="inclusive")
        p20, p80 = q[1], q[7]
    else:
        p20 = p80 = ms[0]
    return {
        "median_ms": statistics.median(ms), "p20_ms": p20, "p80_ms": p80, "min_ms": min(ms), "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms), "n": len(ms),
    }


# ----------------------------------------------------------------------------------------------------------------
# The dense-matmul ceiling
# ----------------------------------------------------------------------------------------------------------------


def measure_ceiling(device: torch.device, dtype: torch.dtype, reps: int | None = None) -> dict:
    """TFLOP/s of one large ``torch.mm`` (random inputs) in ``dtype``: 8192^3 on a GPU, 1024^3 on the CPU.

    Median over ``reps`` runs after warm-up; the MFU denominator, measured in the same run as the models.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    reps = reps or (30 if cuda else 8)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(5 if cuda else 2):
        torch.mm(a, b, out=c)
    _sync(device)
    ms = time_steps(lambda: torch.mm(a, b, out=c), lambda: None, device, reps)
    stats = summarize(ms)
    flops = 2 * n**3
    return {
        "shape": f"{n}x{n} @ {n}x{n}",
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": stats["median_ms"],
        "tflops": flops / (stats["median_ms"] / 1e3) / 1e12,
        "reps": reps,
        "method": f"torch.mm {n}^3, random inputs, median of {reps} runs ({'CUDA events' if cuda else 'perf_counter'})",
    }


# ----------------------------------------------------------------------------------------------------------------
# Auto batch
# ----------------------------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits(work, batch: int, settings: Settings) -> bool:
    """One step at ``batch``: True when it runs and its peak allocation stays under the memory fraction."""
    device = settings.device
    inputs = work.make_batch(batch, settings.seed)
    step, zero, opt = make_step(work, inputs, settings.optimizer)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        step()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer; anything else is re-raised
        if not _is_oom(exc):
            raise
        ok = False
    zero()
    del inputs, step, opt
    _release(device)
    if ok:
        total = torch.cuda.get_device_properties(device).total_memory
        ok = torch.cuda.max_memory_allocated(device) <= settings.memory_fraction * total
    return ok


def largest_fitting(fits: Callable[[int], bool], cap: int, first: int = 1) -> int:
    """The largest ``b`` in ``[1, cap]`` with ``fits(b)`` (0 if none), assuming fitting is monotone: doubling from
    ``first`` until a try fails or ``cap`` is reached, then bisection between the last fit and the first failure."""
    good, bad = 0, cap + 1
    b = max(1, min(first, cap))
    while True:
        if fits(b):
            good = b
            if b >= cap:
                break
            b = min(2 * b, cap)
        else:
            bad = b
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _search_batch(cfg: ModelConfig, settings: Settings, cap: int, first: int, log: list[str]) -> int:
    """The largest batch in ``[1, cap]`` that ``cfg`` fits (0 if none); its model lives only in this call."""
    torch.manual_seed(settings.seed)
    work = cfg.build(settings.device, settings.dtype)

    def fits(b: int) -> bool:
        ok = _fits(work, b, settings)
        log.append(f"{cfg.name}@{b}:{'ok' if ok else 'no'}")
        return ok

    return largest_fitting(fits, cap, first)


def resolve_batches(cfgs: list[ModelConfig], settings: Settings) -> dict[str, tuple[int, str]]:
    """``{name: (batch, how)}``. Fixed batches stay; ``auto`` is shared by a group: on a GPU the largest batch
    every ``auto`` member of the group fits (the first member searched by doubling from ``first_batch``, or
    bisecting below it; each next one tried at the running answer and bisected down if it does not fit); on the
    CPU 1."""
    out: dict[str, tuple[int, str]] = {}
    groups: dict[str, list[ModelConfig]] = {}
    for cfg in cfgs:
        if cfg.batch == "auto":
            groups.setdefault(cfg.group or cfg.name, []).append(cfg)
        else:
            out[cfg.name] = (int(cfg.batch), "fixed")
    for group, members in groups.items():
        if settings.device.type != "cuda":
            for cfg in members:
                out[cfg.name] = (1, "auto (CPU: 1)")
            continue
        batch, tried, searched, broken = settings.max_batch, [], 0, {}
        for cfg in progress_bar(members, len(members), f"auto batch [{group}]", settings.progress):
            try:
                batch = _search_batch(cfg, settings, batch, settings.first_batch if searched == 0 else batch, tried)
                searched += 1
            except Exception as exc:  # noqa: BLE001 - a member that cannot run must not stop the others
                broken[cfg.name] = f"failed while searching the batch: {type(exc).__name__}: {exc}"
            _release(settings.device)
            if batch == 0:
                break
        how = (
            f"auto: largest fitting every member of group {group!r} under {settings.memory_fraction:.0%} of memory "
            f"(tries: {', '.join(tried)})"
        )
        for cfg in members:
            out[cfg.name] = (0, broken[cfg.name]) if cfg.name in broken else (batch, how)
    return out


# ----------------------------------------------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------------------------------------------


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def describe(cfg: ModelConfig, batch: int | None) -> dict:
    """The configuration's fields, parameter and FLOP counts (no measurement)."""
    params, fl = param_count(cfg), flop_count(cfg)
    row = {
        "name": cfg.name, "family": cfg.family, "kernels": family(cfg.family).kernels, "dim": cfg.dim,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "hidden": cfg.hidden, "num_modalities": cfg.num_modalities,
        "seq": cfg.seq, "vocab": cfg.vocab, "mix": cfg.mix, "image_fraction": cfg.image_fraction,
        "image_span": cfg.image_span, "group": cfg.group or cfg.name, "baseline": cfg.baseline,
        "reference_of": cfg.reference_of, "paper_ratio": cfg.paper_ratio, "description": cfg.description,
        "options": dict(cfg.options), "params_total": params.total, "params_active": params.active,
        "flops_forward_per_token": fl.forward_per_token, "flops_components_per_token": fl.components,
        "flops_train_per_token": fl.train_per_token, "batch": batch,
    }
    if batch:
        row["tokens_per_step"] = batch * cfg.seq
        row["flops_per_step"] = fl.train_per_step(batch, cfg.seq)
    return row


@dataclass
class _Live:
    """A configuration being measured: its model, input batch and step, and the times taken so far."""

    cfg: ModelConfig
    row: dict
    work: object
    inputs: dict
    step: Callable[[], None]
    zero: Callable[[], None]
    opt: object
    ms: list


def _prepare(cfg: ModelConfig, batch: int, settings: Settings) -> _Live:
    """Build (seeded), make the step, run the warm-up steps."""
    device = settings.device
    row = describe(cfg, batch)
    torch.manual_seed(settings.seed)
    work = cfg.build(device, settings.dtype)
    inputs = work.make_batch(batch, settings.seed)
    step, zero, opt = make_step(work, inputs, settings.optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    time_steps(step, zero, device, settings.warmup, f"{cfg.name} warm-up", settings.progress)
    _sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    return _Live(cfg, row, work, inputs, step, zero, opt, [])


def _finish(live: _Live, settings: Settings, ceiling_tflops: float, loads: list, telemetry: dict) -> dict:
    """Timing statistics, throughput, peak memory and the breakdown of a measured configuration; frees it."""
    device, cuda = settings.device, settings.device.type == "cuda"
    row, step, zero, opt = live.row, live.step, live.zero, live.opt
    ms = live.ms
    row["telemetry"] = telemetry
    row["step_ms"] = ms
    row["timing"] = summarize(ms)
    loads = [v for v in loads if v is not None]
    row["load_avg"] = max(loads) if loads else None
    row["cores"] = usable_cores()
    row["trust_warnings"] = trust_warnings(row["timing"], row["load_avg"], row["cores"])
    median_s = row["timing"]["median_ms"] / 1e3
    row["tokens_per_s"] = row["tokens_per_step"] / median_s
    row["tflops"] = row["flops_per_step"] / median_s / 1e12
    row["mfu"] = row["tflops"] / ceiling_tflops if ceiling_tflops else None
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_mem_method"] = "torch.cuda.max_memory_allocated over warm-up and timed steps"
    else:
        row["peak_mem_gib"] = None
        row["peak_mem_method"] = "n/a (needs the breakdown's profiler on the CPU)"
    if settings.breakdown:
        try:
            zero()
            resident = _bytes(live.work.model.parameters()) + _bytes(live.inputs.values())
            if opt is not None:
                resident += sum(_bytes(s.values()) for s in opt.state.values())
            trace = None
            if settings.trace_dir:
                trace = f"{settings.trace_dir}/trace-{re.sub(r'[^A-Za-z0-9._-]+', '_', live.cfg.name)}.json"
            bd = _breakdown.profile_step(step, zero, live.work.roles, device, trace)
            if trace:
                bd["trace"] = trace
            if cuda:
                bd["idle_ms"] = max(0.0, row["timing"]["median_ms"] - bd["device_total_ms"])
            elif bd.get("cpu_peak_delta_bytes") is not None:
                row["peak_mem_gib"] = (resident + bd["cpu_peak_delta_bytes"]) / 2**30
                row["peak_mem_method"] = (
                    "parameters + inputs + the largest net allocation during one profiled step (profiler "
                    "allocation events)"
                )
            row["breakdown"] = bd
        except Exception as exc:  # noqa: BLE001 - a failed breakdown must not lose the timings
            row["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
    zero()
    live.work = live.inputs = live.step = live.opt = None
    _release(device)
    row["status"] = "ok"
    return row


def measure_config(cfg: ModelConfig, batch: int, settings: Settings, ceiling_tflops: float) -> dict:
    """Everything the report shows for one configuration (see the module docstring), timed on its own."""
    device, cuda = settings.device, settings.device.type == "cuda"
    live = _prepare(cfg, batch, settings)
    load_before = machine_load()
    with nvml.Sampler(device.index or 0, enabled=cuda) as sampler:
        live.ms = time_steps(live.step, live.zero, device, settings.steps, f"{cfg.name} timed", settings.progress)
    row = _finish(live, settings, ceiling_tflops, [load_before, machine_load()], sampler.summary(settings.steps))
    row["timing_order"] = "alone"
    return row


def measure_interleaved(members: list[tuple[ModelConfig, int]], settings: Settings, ceiling_tflops: float) -> list:
    """The rows of several configurations timed in alternation: every member is built and warmed up, then each
    of ``settings.steps`` rounds times one step of every member in turn, so a slow drift of the machine (another
    tenant, frequency changes) reaches every member alike instead of biasing whichever ran during it. For the
    CPU, where the members of a group fit in memory together and such drift is the largest error of a ratio.
    A member that fails is reported as failed (``{"name", "status": "failed: ..."}``); the others go on."""
    device = settings.device
    lives, rows = [], {}
    for cfg, batch in members:
        try:
            lives.append(_prepare(cfg, batch, settings))
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
            rows[cfg.name] = {**describe(cfg, batch), "status": f"failed: {type(exc).__name__}: {exc}"}
    load_before = machine_load()
    names = ", ".join(live.cfg.name for live in lives)
    for _ in progress_bar(range(settings.steps), settings.steps, f"timed, alternating ({names})", settings.progress):
        for live in list(lives):
            try:
                live.ms += time_steps(live.step, live.zero, device, 1)
            except Exception as exc:  # noqa: BLE001
                rows[live.cfg.name] = {**live.row, "status": f"failed: {type(exc).__name__}: {exc}"}
                lives.remove(live)
                _release(device)
    load_after = machine_load()
    for live in lives:
        rows[live.cfg.name] = _finish(live, settings, ceiling_tflops, [load_before, load_after],
                                      nvml.Sampler(0, enabled=False).summary(settings.steps))
        rows[live.cfg.name]["timing_order"] = f"alternating with {len(members) - 1} other configuration(s)"
    return [rows[cfg.name] for cfg, _ in members]
