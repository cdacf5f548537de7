"""``python -m profiling``: measure the registered model configurations and write the report.

    python -m profiling [--configs NAMES] [--device auto|cpu|cuda[:N]] [--dtype auto|bf16|fp16|fp32] [--quick]
        [--out DIR] [--mix 50/50[,80/20]] [--set [CONFIG:]FIELD=VALUE ...] [--steps N] [--warmup N]
        [--optimizer none|sgd|adamw] [--no-breakdown] [--trace] [--max-batch N] [--time-budget S] [--threads N]
        [--seed S] [--no-progress]
    python -m profiling --list
    python -m profiling --compare A B [--out DIR]

Steps: device -> configurations (preset or names, overrides, mixes) -> ceiling -> batch sizes -> each
configuration measured (the report rewritten after each) -> plots. Exit status 0; 1 if a configuration failed;
2 for a bad request (unknown configuration, missing device).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", help="comma-separated configuration and preset names (default: the preset for the "
                   "device: cpu without a GPU, gpu or gpu-quick with one); --list shows them")
    p.add_argument("--device", default="auto", help="auto (default: cuda if torch sees one, else cpu), cpu, cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--quick", action="store_true", help="fewer steps; on a GPU the gpu-quick preset")
    p.add_argument("--out", type=Path, help="output directory (default: reports/<date>-<device>/); with --compare, "
                   "where compare.md goes")
    p.add_argument("--mix", default="50/50", help="text/image token mix(es) for multi-modality configurations, "
                   "e.g. 80/20 or 50/50,80/20 (several: one variant per mix, named CONFIG[T/I])")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[CONFIG:]FIELD=VALUE",
                   help="override a configuration field for every selected configuration, or for one with "
                   "CONFIG: (e.g. --set batch=4, --set dense-1.5b:seq=2048); repeatable")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default 20 GPU / 12 CPU; --quick 10 / 3)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 3 GPU / 2 CPU; --quick 2/1)")
    p.add_argument("--optimizer", default="none", choices=["none", "sgd", "adamw"],
                   help="optimizer update inside the timed step (default none)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--trace", action="store_true", help="also write each profiled step as a Chrome trace "
                   "(trace-<config>.json in the output directory; large on a GPU)")
    p.add_argument("--max-batch", type=int, default=64, help="upper bound of the auto batch search (default 64)")
    p.add_argument("--time-budget", type=float, help="start no new configuration after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list configurations and presets, then exit")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two report.json (files or directories)")
    return p


def _apply_overrides(cfgs, overrides: list[str]):
    from profiling.registry import get_config

    names = {c.name for c in cfgs}
    parsed = []
    for text in overrides:
        lhs, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--set wants [CONFIG:]FIELD=VALUE, got {text!r}")
        target, _, key = lhs.rpartition(":")
        if target:
            get_config(target)  # unknown names raise with the list of valid ones
            if target not in names:
                raise ValueError(f"--set {text}: configuration {target!r} is not selected (--configs)")
        parsed.append((target or None, key.strip(), value.strip()))
    out = []
    for cfg in cfgs:
        changes = {k: v for t, k, v in parsed if t in (None, cfg.name)}
        out.append(cfg.override(**changes) if changes else cfg)
    return out


def _apply_mixes(cfgs, mixes: list[str]):
    from profiling.registry import with_mix

    if len(mixes) == 1:
        return [with_mix(c, mixes[0], rename=False) for c in cfgs]
    out = []
    for cfg in cfgs:
        if cfg.num_modalities == 1:
            out.append(cfg)
        else:
            out += [with_mix(cfg, m, rename=True) for m in mixes]
    return out


def _list() -> str:
    from profiling.registry import PRESETS, REGISTRY

    lines = ["Configurations:"]
    for c in REGISTRY.values():
        lines.append(f"  {c.name:18s} {c.family:14s} dim {c.dim:5d}  layers {c.n_layers:3d}  heads {c.n_heads:3d}  "
                     f"hidden {c.hidden:5d}  M {c.num_modalities}  seq {c.seq:5d}  batch {c.batch!s:5s}  "
                     f"vocab {c.vocab}  {c.description}")
    lines.append("Presets:")
    lines += [f"  {p:10s} {', '.join(m)}" for p, m in PRESETS.items()]
    return "\n".join(lines)


def _out_dir(args, device_name: str) -> Path:
    from benchmarks.harness import slug

    if args.out is not None:
        return args.out
    base = REPO / "reports" / f"{_dt.date.today().isoformat()}-{slug(device_name)}"
    out, i = base, 2
    while (out / "report.json").exists():  # never overwrite an earlier run of the same day
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.compare:
        from profiling.report import compare, load

        try:
            text = compare(load(args.compare[0]), load(args.compare[1]))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --compare: {exc}", file=sys.stderr)
            return 2
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "compare.md").write_text(text)
            print(f"written: {args.out / 'compare.md'}")
        return 0
    if args.list:
        print(_list())
        return 0

    import torch

    from benchmarks.harness import collect_env
    from profiling import nvml, report
    from profiling.registry import UnknownConfigError, default_preset, preset_reason, resolve
    from profiling.run import (
        OPTIMIZER_NOTE,
        STEP,
        DeviceUnavailableError,
        Settings,
        default_dtype,
        describe,
        log,
        measure_ceiling,
        measure_config,
        measure_interleaved,
        progress_bar,
        resolve_batches,
        resolve_device,
    )

    try:
        device = resolve_device(args.device)
        names = args.configs.split(",") if args.configs else [default_preset(device.type, args.quick)]
        preset = None if args.configs else names[0]
        why = ("configurations named by --configs" if args.configs
               else preset_reason(device.type, args.quick))
        cfgs = _apply_mixes(_apply_overrides(resolve(names), args.overrides), args.mix.split(","))
    except (DeviceUnavailableError, UnknownConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        # Less fragmentation after the out-of-memory tries of the auto batch search (read when CUDA first
        # allocates, which has not happened yet in this process).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = default_dtype(device) if args.dtype == "auto" else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                                "fp32": torch.float32}[args.dtype]
    # default (warm-up, timed) steps by (GPU?, quick?)
    warmup, steps = {(True, False): (3, 20), (True, True): (2, 10), (False, False): (2, 12), (False, True): (1, 3)}[
        (cuda, args.quick)
    ]
    settings = Settings(
        device=device, dtype=dtype,
        warmup=warmup if args.warmup is None else args.warmup, steps=steps if args.steps is None else args.steps,
        seed=args.seed, optimizer=args.optimizer, breakdown=not args.no_breakdown, progress=not args.no_progress,
        max_batch=args.max_batch, time_budget_s=args.time_budget,
    )
    if settings.steps < 1 or settings.warmup < 0:
        print("error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if not cuda and any(c.seq * c.dim >= 1024 * 1024 for c in cfgs):
        print("warning: GPU-size configurations on the CPU will be very slow", file=sys.stderr)

    t_start = time.perf_counter()
    env = collect_env(device)
    env["cudnn"] = torch.backends.cudnn.version() if cuda else None
    nv_ok, nv_why = nvml.status()
    env["nvml"] = "available" if nv_ok else f"n/a ({nv_why})"
    if cuda:
        env.update({k: v for k, v in nvml.device_facts(device.index or 0).items() if k != "reason" and v != "n/a"})
    out_dir = _out_dir(args, env.get("device", device.type))
    if args.trace:
        out_dir.mkdir(parents=True, exist_ok=True)
        settings.trace_dir = str(out_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    data = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m profiling " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                              else sys.argv[1:])),
        "complete": False,
        "environment": env,
        "settings": {
            "device": str(device), "dtype": dtype_name, "warmup": settings.warmup, "steps": settings.steps,
            "preset": preset, "selection": why,
            "seed": settings.seed, "optimizer": settings.optimizer,
            "optimizer_note": OPTIMIZER_NOTE[settings.optimizer],
            "step": STEP,
            "timing": "CUDA events around each step, no host sync between steps" if cuda
            else "time.perf_counter around each step; the members of a group (a dense baseline and the "
            "configurations compared with it) built and warmed up together, then timed in alternating steps, one "
            "step of each in turn per round, so drift of a shared machine reaches every member alike",
            "batch_rule": "the configuration's batch, or `auto`: on a GPU the largest batch that every member of the "
            "configuration's group fits (one step per try, doubling from 8 then bisection, peak allocation under "
            f"{settings.memory_fraction:.0%} of the GPU's memory, at most {settings.max_batch}); on the CPU 1. "
            "Members of a group share the batch, so ratios compare equal tokens per step.",
            "data": "random tokens in [0, vocab) and next-token targets; modality ids: per sequence, text runs "
            "and non-text spans of `image_span` tokens (image, then speech, ... in turn) at random cut points "
            "reaching the configuration's image fraction; all drawn from the seed, identical across "
            "configurations of one batch shape",
            "peak_memory": "GPU: torch.cuda.max_memory_allocated over the warm-up and timed steps; CPU: parameters "
            "+ inputs + the largest net allocation during the profiled step (profiler allocation events)",
            "max_batch": settings.max_batch, "memory_fraction": settings.memory_fraction, "mix": args.mix,
            "overrides": args.overrides,
        },
        "results": [],
        "notes": [
            "The dense model is MoTTransformer(num_modalities=1), which runs plain dense ops (F.linear, "
            "F.rms_norm, SDPA) with the same parameter layout; MoT runs the package's grouped kernels.",
            "The CPU presets shrink the vocabulary (cpu: 8,192, tiny: 256; each row's `vocab` in report.json) so "
            "the LM head does not dominate a CPU step; the GPU sizes use Chameleon's.",
            "Vocabulary 65,536 (Chameleon's), input and output embeddings untied: with it the MoT paper's 443M and "
            "1.5B are exact parameter counts. Image spans are 1,024 tokens (one Chameleon image) at seq 4096.",
            "dense-435m-moma uses MoMa's 'ffn 4096' as the SwiGLU width, which gives more than 435M parameters; "
            "if the paper's 4096 is the width before the 2/3 SwiGLU scaling, that model is dense-443m "
            "(--set dense-435m-moma:hidden=2816).",
            "Paper numbers are from A100 (AWS p4de) runs of the authors' own code and model sizes (MoT 7B; MoMa "
            "435M FLOP-matched on 256 GPUs): they are context, not a like-for-like comparison.",
            "Not measured: optimizer update (unless --optimizer), data loading, communication across GPUs, "
            "activation checkpointing.",
        ],
    }
    chosen = f"preset {preset}" if preset else "--configs"
    print(f"profiling {len(cfgs)} configuration(s) on {env.get('device')} ({dtype_name}; {chosen}: {why}) "
          f"-> {out_dir}", file=sys.stderr)
    data["ceiling"] = measure_ceiling(device, dtype)
    log(f"dense-matmul ceiling: {data['ceiling']['tflops']:.4g} TFLOP/s")
    batches = resolve_batches(cfgs, settings)
    if any(c.batch == "auto" for c in cfgs) and cuda:
        log("batches: " + ", ".join(f"{n}={b}" for n, (b, _) in batches.items()))
    failed = False

    def record(row: dict) -> None:
        nonlocal failed
        failed = failed or row["status"].startswith("failed")
        data["results"].append(row)
        done = f"{row['timing']['median_ms']:.4g} ms/step, batch {row['batch']}" if row["status"] == "ok" \
            else row["status"]
        log(f"[{len(data['results'])}/{len(cfgs)}] {row['name']}: {done} ({time.perf_counter() - t_start:.0f} s)")
        report.write(data, out_dir, plots=False)

    # On the CPU the members of a group are timed in alternating steps (drift of a shared machine reaches all
    # alike); on a GPU one after another (memory; GPU timings do not drift that way).
    units = _groups(cfgs) if not cuda else [[c] for c in cfgs]
    for unit in progress_bar(units, len(units), "configurations" if cuda else "groups", settings.progress):
        runnable = []
        for cfg in unit:
            batch, how = batches[cfg.name]
            if settings.time_budget_s is not None and time.perf_counter() - t_start > settings.time_budget_s:
                row = {**describe(cfg, batch or None), "status": "skipped (time budget)"}
            elif batch == 0:
                why = how if how.startswith("failed") else "batch 1 does not fit in memory"
                row = {**describe(cfg, None), "status": f"failed: {why.removeprefix('failed ')}"}
            else:
                runnable.append((cfg, batch))
                continue
            row["batch_how"] = how
            record(row)
        if not runnable:
            continue
        try:
            if len(runnable) == 1:
                rows = [measure_config(*runnable[0], settings, data["ceiling"]["tflops"])]
            else:
                rows = measure_interleaved(runnable, settings, data["ceiling"]["tflops"])
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
            rows = [{**describe(cfg, batch), "status": f"failed: {type(exc).__name__}: {exc}"}
                    for cfg, batch in runnable]
        # a failed step's tensors die with its traceback, above; return their memory before the next model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        for (cfg, _), row in zip(runnable, rows):
            row["batch_how"] = batches[cfg.name][1]
            record(row)
    data["complete"] = all(r.get("status") != "skipped (time budget)" for r in data["results"])
    data["elapsed_s"] = time.perf_counter() - t_start
    paths = report.write(data, out_dir, plots=True)
    _summary(data, paths)
    return 1 if failed else 0


def _groups(cfgs) -> list[list]:
    """The configurations by comparison group (a dense baseline and what is compared with it), in order."""
    out: dict[str, list] = {}
    for cfg in cfgs:
        out.setdefault(cfg.group or cfg.name, []).append(cfg)
    return list(out.values())


def _summary(data: dict, paths: dict) -> None:
    from profiling.report import OVERHEAD_BOUND

    print(f"\n{'config':22s} {'batch':>5s} {'step ms':>10s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}  status")
    for r in data["results"]:
        if r.get("status") == "ok":
            print(f"{r['name']:22s} {r['batch']:5d} {r['timing']['median_ms']:10.4g} {r['tokens_per_s']:10.4g} "
                  f"{r['tflops']:8.3g} {r['mfu'] or 0:6.1%}  ok")
        else:
            print(f"{r['name']:22s} {'-':>5s} {'-':>10s} {'-':>10s} {'-':>8s} {'-':>6s}  {r.get('status')}")
    for t in data["tables"]["relative_to_dense"]:
        source = "derived from the paper's figures" if t.get("paper_derived") else "paper, A100"
        paper = "" if t["paper_ratio"] is None else f" ({source}: {t['paper_ratio']:.2f})"
        shares = [v for v in (t.get("host_share"), t.get("baseline_host_share")) if v is not None]
        host = f"; host share {t['host_share']:.0%} / {t['baseline_host_share']:.0%}" if len(shares) == 2 else ""
        print(f"  {t['name']} vs {t['baseline']}: {t['ratio']:.3f}x dense throughput{paper}{host}")
        if any(v > OVERHEAD_BOUND for v in shares):
            print(f"    overhead-bound: more than {OVERHEAD_BOUND:.0%} of a step is host overhead")
        if t.get("untrusted"):
            print(f"    WARNING, do not trust this ratio: {'; '.join(t['untrusted'])}")
    for r in data["results"]:
        for w in r.get("trust_warnings") or []:
            print(f"WARNING: {r['name']}: {w}; its timing is not trustworthy")
    print(f"ceiling {data['ceiling']['tflops']:.3g} TFLOP/s; {data['elapsed_s']:.1f} s; report: {paths['md']}")


if __name__ == "__main__":
    sys.exit(main())
