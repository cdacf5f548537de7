"""The report: ``report.json`` (everything measured), ``report.md`` (tables) and PNG plots; ``--compare``.

Results rows -> derived tables (relative to dense, MoT projection, kernels vs reference) -> markdown + json ->
plots. Every table says where its numbers come from: measured in this run (device and versions named), quoted
from a paper (marked "paper"), or projected (labelled as a projection).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from profiling import breakdown as _breakdown
from profiling.flops import FORMULA
from profiling.registry import MOT_PAPER, PAPER_RATIOS

SCHEMA = 1
#: Families whose two-modality configurations get the MoT wall-clock projection (Table 2).
PROJECTION_FAMILIES = {"mot", "mot_reference"}

SECTIONS = {
    "environment": "## Environment",
    "method": "## Method",
    "ceiling": "## Dense-matmul ceiling",
    "results": "## Results per configuration",
    "relative": "## Table 1: throughput relative to dense",
    "projection": "## Table 2: MoT wall-clock projection",
    "reference": "## Table 3: kernels vs the reference-style implementation",
    "breakdown": "## Per-layer time breakdown",
    "telemetry": "## Telemetry (NVML)",
    "plots": "## Plots",
    "notes": "## Notes",
}
PLOTS = {"step_time": "step_time.png", "relative": "relative_to_dense.png", "breakdown": "breakdown.png"}


# ----------------------------------------------------------------------------------------------------------------
# Derived tables
# ----------------------------------------------------------------------------------------------------------------


def _ok(results: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in results if r.get("status") == "ok"}


_SHAPE = ("dim", "n_layers", "n_heads", "hidden", "seq", "vocab", "batch")


def _differs(a: dict, b: dict, keys=_SHAPE) -> str:
    """What differs between two rows that a table compares (empty when they are like for like)."""
    return "; ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k))


def derive_tables(results: list[dict]) -> dict:
    """The three comparison tables as lists of dicts, from the measured rows (only rows with status ok)."""
    ok = _ok(results)
    relative, projection, reference = [], [], []
    for r in ok.values():
        base = ok.get(r.get("baseline") or "")
        if base is not None and base is not r:
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            paper = PAPER_RATIOS.get(r.get("paper_ratio") or "")
            relative.append({
                "name": r["name"], "family": r["family"], "mix": r["mix"], "baseline": base["name"],
                "batch": r["batch"], "tokens_per_s": r["tokens_per_s"], "baseline_tokens_per_s": base["tokens_per_s"],
                "ratio": ratio,
                "paper_ratio": paper.value if paper else None,
                "paper_derived": paper.derived if paper else None,
                "paper_source": paper.source if paper else None,
                "differs": _differs(r, base),
                "untrusted": untrusted(r) + untrusted(base, f"{base['name']}: "),
                "host_share": host_share(r), "baseline_host_share": host_share(base),
            })
            if r["family"] in PROJECTION_FAMILIES and r["num_modalities"] == 2:
                step_ratio = 1 / ratio  # time per token, MoT over dense
                row = {"name": r["name"], "family": r["family"], "mix": r["mix"], "baseline": base["name"],
                       "step_time_ratio": step_ratio}
                for kind in ("image", "text"):
                    row[f"{kind}_paper_steps_pct"] = MOT_PAPER[kind]["steps_pct"]
                    row[f"{kind}_projected_pct"] = MOT_PAPER[kind]["steps_pct"] * step_ratio
                    row[f"{kind}_paper_wallclock_pct"] = MOT_PAPER[kind]["wallclock_pct"]
                projection.append(row)
        kern = ok.get(r.get("reference_of") or "")
        if kern is not None:
            reference.append({
                "name": kern["name"], "reference": r["name"], "mix": r["mix"], "batch": r["batch"],
                "kernels_step_ms": kern["timing"]["median_ms"], "reference_step_ms": r["timing"]["median_ms"],
                "speedup": r["timing"]["median_ms"] / kern["timing"]["median_ms"]
                * (kern["tokens_per_step"] / r["tokens_per_step"]),
                "kernels_tokens_per_s": kern["tokens_per_s"], "reference_tokens_per_s": r["tokens_per_s"],
                "kernels_peak_mem_gib": kern.get("peak_mem_gib"), "reference_peak_mem_gib": r.get("peak_mem_gib"),
                "differs": _differs(kern, r, (*_SHAPE, "num_modalities", "mix")),
                "untrusted": untrusted(kern) + untrusted(r, f"{r['name']}: "),
            })
    return {"relative_to_dense": relative, "mot_projection": projection, "kernels_vs_reference": reference}


#: A ratio whose configuration or baseline spends more of its step than this on the host is marked
#: overhead-bound in Table 1: it says more about Python and launch costs than about the layers.
OVERHEAD_BOUND = 0.25


def host_share(row: dict) -> float | None:
    """The share of a configuration's step spent on host overhead rather than in ops, from its breakdown: on the
    CPU Python and autograd bookkeeping between operators (the "host" category over the sum over ops); on a GPU
    the device idle time (median step - kernel time) over the median step. None without a breakdown."""
    bd = row.get("breakdown") or {}
    if "categories" not in bd:
        return None
    if bd.get("device_total_ms") is not None:  # GPU
        median = row["timing"]["median_ms"]
        return bd.get("idle_ms", 0.0) / median if median > 0 else None
    total = bd.get("attributed_ms") or 0.0
    return bd["categories"].get(_breakdown.HOST, {}).get("ms", 0.0) / total if total > 0 else None


def untrusted(row: dict, prefix: str = "") -> list[str]:
    """The reasons a result row's timing cannot be trusted (see ``profiling.run.trust_warnings``), prefixed."""
    return [prefix + w for w in row.get("trust_warnings") or []]


def _overhead_bound(t: dict) -> bool:
    return any(v is not None and v > OVERHEAD_BOUND for v in (t.get("host_share"), t.get("baseline_host_share")))


def _note(t: dict) -> str:
    parts = [f"not like for like: {t['differs']}"] if t.get("differs") else []
    if _overhead_bound(t):
        parts.append(f"overhead-bound (host share > {OVERHEAD_BOUND:.0%}): the ratio reflects per-op overhead "
                     "more than the layers")
    if t.get("untrusted"):
        parts.append("**do not trust**: " + "; ".join(t["untrusted"]))
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".3g") -> str:
    if value is None or value == "n/a" or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value).replace("|", "/")


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c.replace("|", "/") for c in row) + " |"
              for row in rows]
    return lines


def _versions(env: dict) -> str:
    return (f"{env.get('device', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda') or 'n/a (CPU build)'}")


def _caption(data: dict, quoted: str | None = None, projected: str | None = None) -> str:
    s = data["settings"]
    text = (f"_Measured here: {_versions(data['environment'])}; {s['dtype']}, median of {s['steps']} timed steps "
            f"after {s['warmup']} warm-up steps._")
    if quoted:
        text += f" _Quoted from papers (not measured here): {quoted}._"
    if projected:
        text += f" _Projected (not measured): {projected}._"
    return text


def _mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def render_markdown(data: dict) -> str:
    """The whole ``report.md`` from the ``report.json`` dict."""
    env, s, results, tables = data["environment"], data["settings"], data["results"], data["tables"]
    ok = _ok(results)
    md = [f"# sparsemm_kernels profiling report: {env.get('device', '?')}", ""]
    md += [f"{data['created']} · `{data['command']}` · git {env.get('git_commit') or 'n/a'}"
           f"{' (uncommitted changes)' if env.get('git_dirty') else ''}", ""]
    if not data.get("complete", True):
        md += ["**PARTIAL: the run stopped before every configuration was measured.**", ""]
    md += ["Numbers are measured in this run on the device below unless a column says *paper* (quoted from the "
           "papers, A100) or *projected*.", ""]
    preset = f"preset `{s['preset']}`" if s.get("preset") else "configurations chosen with `--configs`"
    md += [f"**What ran**: {preset} ({s.get('selection', 'n/a')}).", ""]
    if env.get("device_type") != "cuda":
        md += ["**CPU run**: without a GPU the layers run in fp32 on the CPU through the package's CPU paths "
               "(ATen per-group GEMMs into slices, torch norms), not its Triton/CUDA kernels. The ratios show how "
               "much the MoT bookkeeping costs next to the matmuls on this machine; the GPU goal (MoT <= 1.05x a "
               "dense step on H100/H200 in bf16) is measured by `make gpu-check` on a GPU, and the host share in "
               "Table 1 tells a layer-bound ratio from an overhead-bound one.", ""]

    md += [SECTIONS["environment"], ""]
    keys = ["device", "device_type", "capability", "memory_gib", "sm_count", "driver", "power_limit_w",
            "sm_clock_max_mhz", "mem_clock_max_mhz", "torch", "triton", "cuda", "cudnn", "python", "cpu_count",
            "torch_threads", "allow_tf32", "nvml", "git_commit"]
    md += _table(["item", "value"], [[k, _f(env[k])] for k in keys if k in env and env[k] is not None])
    md += [""]

    md += [SECTIONS["method"], ""]
    md += [
        f"- **Step**: {s['step']}; {s['optimizer_note']}.",
        f"- **Precision**: weights, activations and gradients in {s['dtype']} (no autocast, no fp32 master "
        "weights).",
        f"- **Timing**: {s['timing']}; {s['warmup']} warm-up steps (Triton autotuning and compilation happen "
        f"there), then {s['steps']} timed steps; median and p20-p80 reported.",
        f"- **FLOPs**: {FORMULA}",
        "- **TFLOP/s** = FLOPs per step / median step time. **MFU** = achieved TFLOP/s / the dense-matmul ceiling "
        "below, measured on this device in this run (not a datasheet peak).",
        f"- **Batch**: {s['batch_rule']}",
        f"- **Data**: {s['data']}",
        f"- **Peak memory**: {s['peak_memory']}",
        f"- **Seed**: {s['seed']} (model initialisation and data).",
        "",
    ]

    md += [SECTIONS["ceiling"], "", f"_Measured here: {_versions(data['environment'])}._", ""]
    c = data["ceiling"]
    md += _table(["matmul", "dtype", "median ms", "TFLOP/s"], [[c["shape"], c["dtype"], c["median_ms"], c["tflops"]]])
    md += ["", c["method"] + ".", ""]

    md += [SECTIONS["results"], "", _caption(data), ""]
    rows = []
    for r in results:
        if r.get("status") != "ok":
            rows.append([r["name"], r.get("family", ""), r.get("mix", ""), *["-"] * 10, f"**{r.get('status')}**"])
            continue
        t = r["timing"]
        rows.append([
            r["name"], r["family"], r["mix"], _f(r["params_total"] / 1e6, ".4g"), _f(r["params_active"] / 1e6, ".4g"),
            r["batch"], r["tokens_per_step"], _f(t["median_ms"], ".4g"), f"{t['p20_ms']:.4g}-{t['p80_ms']:.4g}",
            _f(r["tokens_per_s"], ".4g"), _f(r["tflops"], ".3g"), _f(r["mfu"], ".1%") if r["mfu"] else "n/a",
            _f(r.get("peak_mem_gib"), ".3g"),
            "ok" if not untrusted(r) else "ok, **do not trust**: " + "; ".join(untrusted(r)),
        ])
    md += _table(["config", "family", "text/image", "params M", "active M", "batch", "tokens/step", "step ms",
                  "p20-p80 ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "status"], rows)
    md += [""]
    batch_notes = sorted({r.get("batch_how") for r in results if r.get("batch_how")} - {"fixed"})
    md += ["Batch: " + ("; ".join(batch_notes) if batch_notes else "as set in each configuration") + ".", ""]

    md += [SECTIONS["relative"], ""]
    md += [_caption(data, quoted="the *paper ratio* column (MoMa Table 2, 256 A100, 435M FLOP-matched; the MoT "
                    "row is derived by us from the MoT paper's step and wall-clock fractions, marked †)"), ""]
    md += ["Ratio = tokens/s of the configuration / tokens/s of its dense baseline at the same batch "
           "(higher is faster; 1.0 = as fast as dense).", ""]
    rows = []
    for t in tables["relative_to_dense"]:
        paper = "-" if t["paper_ratio"] is None else f"{t['paper_ratio']:.2f}{' †' if t['paper_derived'] else ''}"
        rows.append([t["name"], t["baseline"], t["mix"], t["batch"], _f(t["tokens_per_s"], ".4g"),
                     _f(t["baseline_tokens_per_s"], ".4g"), _f(t["ratio"], ".3f"),
                     f"{_f(t.get('host_share'), '.0%')} / {_f(t.get('baseline_host_share'), '.0%')}", paper,
                     _note(t)])
    md += _table(["config", "dense baseline", "text/image", "batch", "tokens/s", "dense tokens/s",
                  "ratio (measured)", "host share (config / dense)", "paper ratio (A100)", "note"], rows)
    cuda = env.get("device_type") == "cuda"
    md += ["", "Host share: the part of a step spent on host overhead rather than in ops, from the profiled step "
           "of the breakdown below: " + (
               "device idle time (median step - kernel time) / median step: launch gaps and host syncs."
               if cuda else "the host category of the breakdown (Python and autograd bookkeeping between "
               "operators) / the sum over ops (profiler overhead included, so an upper bound).")
           + f" Above {OVERHEAD_BOUND:.0%} for either side the ratio is marked overhead-bound: per-op costs, not "
           "the layers' work, set it; n/a without a breakdown (--no-breakdown)."]
    used = {t["name"] for t in tables["relative_to_dense"]}
    used_keys = {ok[n].get("paper_ratio") for n in used if n in ok}
    md += ["", "Paper sources:"]
    md += [f"- `{k}` = {v.value:.2f}{' †' if v.derived else ''}: {v.source}"
           f"{'' if k in used_keys else ' *(no configuration registered for it yet)*'}"
           for k, v in PAPER_RATIOS.items()]
    md += [""]

    md += [SECTIONS["projection"], ""]
    md += [_caption(
        data,
        quoted=f"the step-matched fractions and the published wall-clock fractions ({MOT_PAPER['setting']})",
        projected="projected wall-clock = the paper's step fraction x our measured MoT/dense time per token; it "
                  "assumes the paper's step counts (7B) carry over to this size and that the measured step-time "
                  "ratio holds for the whole run",
    ), ""]
    rows = []
    for t in tables["mot_projection"]:
        rows.append([t["name"], t["mix"], _f(t["step_time_ratio"], ".3f"),
                     _f(t["image_paper_steps_pct"], ".1f"), _f(t["image_projected_pct"], ".1f"),
                     _f(t["image_paper_wallclock_pct"], ".1f"),
                     _f(t["text_paper_steps_pct"], ".1f"), _f(t["text_projected_pct"], ".1f"),
                     _f(t["text_paper_wallclock_pct"], ".1f")])
    md += _table(["config", "text/image", "MoT/dense step time (measured)", "image: steps % (paper)",
                  "image: wall-clock % (projected)", "image: wall-clock % (paper, A100)", "text: steps % (paper)",
                  "text: wall-clock % (projected)", "text: wall-clock % (paper, A100)"], rows)
    md += ["", "Two-modality MoT configurations only (the paper's fractions are for text + image). The paper's "
           "own step-time ratio, implied by its figures, is 47.2/34.8 = 1.36 (image) and 75.6/55.8 = 1.35 (text).",
           ""]

    md += [SECTIONS["reference"], "", _caption(data), ""]
    md += ["Same parameters, same data and batch; the reference runs every block with "
           "`sparsemm_kernels.reference.mot_block_ref(block, h, ids, math_attention=False)` (boolean masks, a loop "
           "over modalities, host syncs at each mask: the published code's style) and the final norm the same way. "
           "Speedup = reference time per token / kernels time per token.", ""]
    rows = [[t["name"], t["reference"], t["mix"], t["batch"], _f(t["kernels_step_ms"], ".4g"),
             _f(t["reference_step_ms"], ".4g"), _f(t["speedup"], ".2f") + "x", _f(t["kernels_tokens_per_s"], ".4g"),
             _f(t["reference_tokens_per_s"], ".4g"), _f(t["kernels_peak_mem_gib"], ".3g"),
             _f(t["reference_peak_mem_gib"], ".3g"), _note(t)]
            for t in tables["kernels_vs_reference"]]
    md += _table(["kernels", "reference", "text/image", "batch", "kernels step ms", "reference step ms", "speedup",
                  "kernels tokens/s", "reference tokens/s", "kernels peak GiB", "reference peak GiB", "note"], rows)
    md += [""]

    md += [SECTIONS["breakdown"], "", _caption(data), ""]
    md += _breakdown_section(results, data["environment"].get("device_type") == "cuda")

    md += [SECTIONS["telemetry"], "", _caption(data), ""]
    rows = []
    for r in results:
        tel = r.get("telemetry")
        if not tel:
            continue
        rows.append([r["name"], _f(tel.get("gpu_name")), _f(tel.get("sm_clock_mhz_mean"), ".0f"),
                     _f(tel.get("mem_clock_mhz_mean"), ".0f"), _f(tel.get("power_w_mean"), ".0f"),
                     _f(tel.get("power_w_max"), ".0f"), _f(tel.get("energy_j_per_step"), ".3g"),
                     _f(tel.get("util_gpu_pct_mean"), ".0f"), _f(tel.get("util_mem_pct_mean"), ".0f"),
                     _f(tel.get("temperature_c_max"), ".0f"), _f(tel.get("clock_limits_seen"))])
    md += _table(["config", "GPU", "SM MHz (mean)", "mem MHz (mean)", "power W (mean)", "power W (max)",
                  "energy J/step", "GPU util %", "mem util %", "temp C (max)", "clock limits seen"], rows)
    reasons = sorted({r["telemetry"]["reason"] for r in results if r.get("telemetry", {}).get("reason")})
    md += [""] + [f"n/a: {why}" for why in reasons]
    md += ["", "Sampled every 50 ms on a background thread over the timed steps; energy from NVML's total-energy "
           "counter (or the power integral where the counter is unsupported), divided by the timed steps.", ""]

    md += [SECTIONS["plots"], ""]
    plots = data.get("plots") or {}
    if plots.get("error"):
        md += [f"Plots not drawn: {plots['error']}", ""]
    for key, title in (("step_time", "Step time"), ("relative", "Throughput relative to dense"),
                       ("breakdown", "Per-layer breakdown")):
        if key in plots:
            md += [f"![{title}]({plots[key]})", ""]

    md += [SECTIONS["notes"], ""]
    md += [f"- {n}" for n in data.get("notes", [])] + [""]
    return "\n".join(md)


def _breakdown_section(results: list[dict], cuda: bool) -> list[str]:
    have = [r for r in results if r.get("status") == "ok" and "categories" in (r.get("breakdown") or {})]
    failed = [r for r in results if r.get("status") == "ok" and (r.get("breakdown") or {}).get("error")]
    out = []
    if have:
        unit = "device ms per step" if cuda else "CPU ms per step (profiler overhead included)"
        out += [f"Time per category in {unit} (share of the sum over ops); forward and backward together "
                "(split in report.json). Method: " + have[0]["breakdown"]["method"] + ".", ""]
        cats = [c for c in _ordered_categories(have) if any(c in r["breakdown"]["categories"] for r in have)]
        rows = []
        for c in cats:
            row = [c]
            for r in have:
                bd = r["breakdown"]
                v = bd["categories"].get(c, {}).get("ms", 0.0)
                share = v / bd["attributed_ms"] if bd["attributed_ms"] else 0.0
                row.append(f"{v:.3g} ({share:.0%})")
            rows.append(row)
        rows.append(["sum over ops", *[f"{r['breakdown']['attributed_ms']:.4g}" for r in have]])
        if cuda:
            rows.append(["kernels not linked to an op", *[_f(r["breakdown"].get("unattributed_ms"), ".3g")
                                                          for r in have]])
            rows.append(["device idle (median step - kernels)", *[_f(r["breakdown"].get("idle_ms"), ".3g")
                                                                  for r in have]])
        else:
            rows.append(["profiled step wall ms", *[_f(r["breakdown"].get("step_wall_ms"), ".4g") for r in have]])
        out += _table(["category", *[r["name"] for r in have]], rows)
        out += ["", "Categories: attention = the SDPA kernels; qkv/o projections = the attention module's GEMMs "
                "(+ rotary, weight concat); FFN = the FFN module (GEMMs + SwiGLU); GEMMs, unsplit = the reference "
                "block's matmuls (projections and FFN, not told apart); norms = the norm modules; plan = the model's "
                "work outside its layers (the modality plan); mask gather/scatter = boolean-mask indexing, "
                "nonzero and index_put in the reference; embedding, LM head, loss; host = on the CPU, Python running "
                "between operators and the self time of what is not an operator (Python autograd Functions, the "
                "autograd engine's node wrappers); other = residual adds, elementwise work of the reference (SwiGLU "
                "gate, rotary) and the rest.", ""]
    for r in failed:
        out += [f"{r['name']}: breakdown failed: {r['breakdown']['error']}", ""]
    if not have and not failed:
        out += ["n/a (breakdown not run: --no-breakdown)", ""]
    return out


def _ordered_categories(rows: list[dict]) -> list[str]:
    extra = sorted({c for r in rows for c in r["breakdown"]["categories"]} - set(_breakdown.CATEGORIES))
    return [*_breakdown.CATEGORIES, *extra]


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------

_FAMILY_COLOURS = {"dense": "#4c72b0", "mot": "#55a868", "mot_reference": "#c44e52"}


def plot(data: dict, out_dir: Path) -> dict:
    """Draw the PNGs into ``out_dir``; ``{key: file name}`` or ``{"error": why}`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"error": f"matplotlib not importable ({exc})"}
    ok = [r for r in data["results"] if r.get("status") == "ok"]
    device = data["environment"].get("device", "?")
    files = {}
    if ok:
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(ok) + 1.8))
        names = [f"{r['name']} (batch {r['batch']})" for r in ok]
        med = [r["timing"]["median_ms"] for r in ok]
        err = [[m - r["timing"]["p20_ms"] for m, r in zip(med, ok)],
               [r["timing"]["p80_ms"] - m for m, r in zip(med, ok)]]
        colours = [_FAMILY_COLOURS.get(r["family"], "#8172b2") for r in ok]
        ax.barh(names, med, xerr=err, color=colours, capsize=3)
        for y, (m, r) in enumerate(zip(med, ok)):
            ax.text(r["timing"]["p80_ms"], y, f"  {m:.3g} ms, {r['tokens_per_s']:.3g} tokens/s", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("training step time, ms (median, p20-p80)")
        ax.set_title(f"Training-step time, measured on {device}", fontsize=10)
        ax.set_xlim(0, max(med) * 1.6)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["step_time"], dpi=120)
        plt.close(fig)
        files["step_time"] = PLOTS["step_time"]

    rel = data["tables"]["relative_to_dense"]
    if rel:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rel) + 2), 4.5))
        xs = range(len(rel))
        by_name = {r["name"]: r for r in ok}
        ax.bar(xs, [t["ratio"] for t in rel], color=[_FAMILY_COLOURS.get(by_name[t["name"]]["family"], "#8172b2")
                                                     for t in rel], label="measured here")
        for x, t in zip(xs, rel):
            ax.text(x, t["ratio"], f"{t['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        px = [x for x, t in zip(xs, rel) if t["paper_ratio"] is not None]
        if px:
            ax.scatter(px, [rel[x]["paper_ratio"] for x in px], marker="D", color="black", zorder=3,
                       label="paper (A100; MoT: derived)")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(list(xs), [t["name"] for t in rel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s relative to dense baseline")
        ax.set_title(f"Throughput relative to dense, measured on {device}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["relative"], dpi=120)
        plt.close(fig)
        files["relative"] = PLOTS["relative"]

    have = [r for r in ok if "categories" in (r.get("breakdown") or {})]
    if have:
        cats = [c for c in _ordered_categories(have) if any(c in r["breakdown"]["categories"] for r in have)]
        fig, ax = plt.subplots(figsize=(10, 0.5 * len(have) + 2.2))
        cmap = plt.get_cmap("tab10")
        left = [0.0] * len(have)
        for i, c in enumerate(cats):
            share = [100 * r["breakdown"]["categories"].get(c, {}).get("ms", 0.0) / (r["breakdown"]["attributed_ms"]
                                                                                     or 1) for r in have]
            ax.barh([r["name"] for r in have], share, left=left, color=cmap(i % 10), label=c)
            left = [a + b for a, b in zip(left, share)]
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the step's op time, %")
        ax.set_title(f"Per-layer breakdown (torch.profiler), measured on {device}", fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS["breakdown"], dpi=120)
        plt.close(fig)
        files["breakdown"] = PLOTS["breakdown"]
    return files


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write(data: dict, out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Recompute the tables, draw the plots (when ``plots``) and write ``report.json`` and ``report.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data["schema"] = SCHEMA
    data["tables"] = derive_tables(data["results"])
    if plots:
        data["plots"] = plot(data, out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(_clean(data), indent=1) + "\n")
    paths["md"].write_text(render_markdown(data))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# --compare A B
# ----------------------------------------------------------------------------------------------------------------


def load(path: str | Path) -> dict:
    """A ``report.json``, given its path or its directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(f"no report.json at {path}")
    data = json.loads(p.read_text())
    data["_path"] = str(p)
    return data


def compare(a: dict, b: dict) -> str:
    """Markdown: the two runs' environments, ceilings and per-configuration numbers side by side."""
    ea, eb = a["environment"], b["environment"]
    md = ["# Profiling reports compared", "", f"- **A**: `{a.get('_path', '?')}`: {_versions(ea)}, "
          f"{a['settings']['dtype']}, {a.get('created')}",
          f"- **B**: `{b.get('_path', '?')}`: {_versions(eb)}, {b['settings']['dtype']}, {b.get('created')}", "",
          "All numbers are measured (each in its own run); B/A < 1 means B is faster.", ""]
    ca, cb = a["ceiling"]["tflops"], b["ceiling"]["tflops"]
    md += _table(["", "A", "B", "B/A"], [["dense-matmul ceiling TFLOP/s", _f(ca), _f(cb), _f(cb / ca, ".3f")]])
    md += [""]
    ra, rb = _ok(a["results"]), _ok(b["results"])
    names = [*ra, *[n for n in rb if n not in ra]]
    rows = []
    for n in names:
        x, y = ra.get(n), rb.get(n)

        def g(r, *keys):
            for k in keys:
                r = None if r is None else r.get(k)
            return r

        ratio = (g(y, "timing", "median_ms") / g(x, "timing", "median_ms")) if x and y else None
        rows.append([n, _f(g(x, "batch")), _f(g(y, "batch")), _f(g(x, "timing", "median_ms"), ".4g"),
                     _f(g(y, "timing", "median_ms"), ".4g"), _f(ratio, ".3f"), _f(g(x, "tokens_per_s"), ".4g"),
                     _f(g(y, "tokens_per_s"), ".4g"), _f(g(x, "mfu"), ".1%"), _f(g(y, "mfu"), ".1%"),
                     _f(g(x, "peak_mem_gib"), ".3g"), _f(g(y, "peak_mem_gib"), ".3g")])
    md += _table(["config", "batch A", "batch B", "step ms A", "step ms B", "B/A time", "tokens/s A", "tokens/s B",
                  "MFU A", "MFU B", "peak GiB A", "peak GiB B"], rows)
    ta = {t["name"]: t for t in derive_tables(a["results"])["relative_to_dense"]}
    tb = {t["name"]: t for t in derive_tables(b["results"])["relative_to_dense"]}
    if ta or tb:
        md += ["", "Throughput relative to dense (each run against its own dense baseline):", ""]
        rows = [[n, _f(ta.get(n, {}).get("ratio"), ".3f"), _f(tb.get(n, {}).get("ratio"), ".3f"),
                 _f((ta.get(n) or tb.get(n))["paper_ratio"], ".2f")] for n in [*ta, *[n for n in tb if n not in ta]]]
        md += _table(["config", "ratio A", "ratio B", "paper (A100)"], rows)
    return "\n".join(md) + "\n"
