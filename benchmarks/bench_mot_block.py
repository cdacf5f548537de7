"""Mixture-of-Transformers block benchmark: MoT block vs the dense block vs the mask-loop reference style.

Per (block config, text/image split, modality layout): one dense block, one MoT block made from it, inputs and
modality ids -> higher-precision references -> per mode: every provider validated -> timed (on the CPU side by
side, alternating runs) -> peak memory -> rows -> markdown + JSON.

    python -m benchmarks.bench_mot_block [--device auto|cuda|cpu] [--dtype bf16|fp16|fp32] [--quick]
        [--configs 443M,1.5B] [--layouts spans,random] [--batch N] [--modes forward,full] [--providers a,b]
        [--out DIR] [--time-budget SECONDS] [--threads N] [--seed S]

Providers (:data:`PROVIDERS`), each one block forward ``y (B, S, dim)`` of ``x (B, S, dim)`` (post-norm, RMSNorm,
rotary, causal attention, SwiGLU; the defaults of :class:`sparsemm_kernels.nn.MoTBlock`):

* ``plain``     - the same dense block written by hand in plain PyTorch (2-D weights, ``F.linear``, ``F.rms_norm``,
  SDPA, ``silu * up``): the baseline, what a user would write themselves;
* ``dense``     - :class:`sparsemm_kernels.nn.DenseBlock`, the package's block with one modality;
* ``mot``       - :class:`sparsemm_kernels.nn.MoTBlock` with 2 modalities (text, image), made by ``from_dense`` and
  then perturbed per modality; the timed forward builds the plan, ``smk.group_plan(ids, 2)``, as a model does
  once per forward;
* ``mask_loop`` - :func:`sparsemm_kernels.reference.mot.mot_block_ref` on the same MoT parameters: the published
  code's style (boolean masks, a Python loop over modalities, SDPA attention).
"""

from __future__ import annotations

import copy
import datetime as _dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsemm_kernels as smk
from benchmarks import harness
from benchmarks.shapes import (
    MOT_BLOCK_CONFIGS,
    MOT_LAYOUTS,
    MOT_SPLITS,
    BlockConfig,
    modality_layout_ids,
    mot_block_set,
)
from sparsemm_kernels.backend import select_backend
from sparsemm_kernels.nn import DenseBlock, MoTBlock
from sparsemm_kernels.ops.attention import apply_rotary, rotary_cos_sin
from sparsemm_kernels.reference.mot import mot_block_ref

OP = "mot_block"
NUM_MODALITIES = 2  # 0 = text, 1 = image
BASELINE = "plain"  # "step time x dense" is relative to this provider (to "dense" when plain did not run)
PERTURB = 0.1  # each MoT weight += PERTURB * rms(weight) * N(0, 1), independently per modality
GOAL_X_DENSE = 1.05  # MoT step time <= 1.05 x dense
GOAL_VS_MASK_LOOP = 1.3  # MoT >= 1.3 x faster than the mask loop
#: The CPU goals of the sorted-stream issue (fp32, forward+backward, default threads): MoT's step time over the
#: plain dense block per config, and the package's one-modality block over the plain one at any config.
CPU_GOALS_MOT = {"cpu256": 1.10, "cpu512": 1.05}
CPU_GOAL_DENSE = 1.02

FLOP_FORMULA = (
    "FLOPs of one forward = B*S * (8*dim^2 + 6*dim*hidden + 2*S*dim): per token the Q, K, V and O projections "
    "2*(3*dim*dim + dim*dim) = 8*dim^2 (n_heads*head_dim = dim, no GQA), the SwiGLU FFN 2*3*dim*hidden = "
    "6*dim*hidden, and attention scores + values 4*S*dim halved for the causal mask = 2*S*dim; norms, rotary, "
    "SwiGLU's elementwise product, residuals and routing count 0. forward+backward = 3 x forward (backward = 2 x "
    "forward; the attention backward's recomputation not counted). Same FLOPs for every provider (MoT FLOPs per "
    "token equal dense)."
)


def block_flops(dim: int, hidden: int, batch: int, seq: int, mode: str) -> int:
    """Useful FLOPs of one block run (see :data:`FLOP_FORMULA`)."""
    per_token = 8 * dim * dim + 6 * dim * hidden + 2 * seq * dim
    return harness.MODES[mode] * batch * seq * per_token


class Case:
    """One config and split: the blocks, inputs and modality ids shared by every provider, and the references.

    ``dense`` is a :class:`DenseBlock`; ``mot`` = ``MoTBlock.from_dense(dense, 2)`` with every weight perturbed per
    modality (so text and image differ). ``x`` is one leaf shared by all providers; ``dy`` the output gradient.
    """

    def __init__(
        self,
        cfg: BlockConfig,
        split: str,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        layout: str = "spans",
    ):
        torch.manual_seed(seed)
        self.cfg, self.split, self.batch, self.dtype, self.layout = cfg, split, batch, dtype, layout
        self.tokens = batch * cfg.seq
        factory = {"device": device, "dtype": dtype}
        self.dense = DenseBlock(cfg.dim, cfg.n_heads, cfg.hidden, norm="rms", norm_placement="post", **factory)
        self.mot = MoTBlock.from_dense(self.dense, NUM_MODALITIES)
        with torch.no_grad():
            for p in self.mot.parameters():
                rms = p.float().pow(2).mean().sqrt().item()
                p.add_(torch.randn(p.shape, device=device).mul_(PERTURB * rms).to(dtype))
        self.plain = PlainBlock(self.dense)
        self.ids = modality_layout_ids(layout, batch, cfg.seq, MOT_SPLITS[split], cfg.image_span, seed).to(device)
        self.image_fraction = self.ids.float().mean().item()
        self.x = torch.randn(batch, cfg.seq, cfg.dim, device=device).to(dtype).requires_grad_()
        self.dy = torch.randn(batch, cfg.seq, cfg.dim, device=device).to(dtype)
        self._refs: dict[str, tuple] = {}

    def block(self, name: str) -> nn.Module:
        return {"dense": self.dense, "plain": self.plain}.get(name, self.mot)

    def leaves(self, block: str) -> list[torch.Tensor]:
        """The tensors that get gradients: ``x`` and every parameter of the block."""
        return [self.x, *self.block(block).parameters()]

    def reference(self, block: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(out, dx, {param: grad})`` of the mask-loop reference on a :func:`harness.reference_dtype` copy of the
        block (float32 for bf16/fp16 runs, float64 for fp32), SDPA attention, computed once."""
        if block not in self._refs:
            rd = harness.reference_dtype(self.dtype)
            ref_block = copy.deepcopy(self.block(block)).to(rd)
            for p in ref_block.parameters():
                p.grad = None
            x = self.x.detach().to(rd).requires_grad_()
            if block == "plain":  # the same function as the dense block: its reference, on the plain weights
                ref_block = copy.deepcopy(self.dense).to(rd)
                with torch.no_grad():
                    for (_, p), q in zip(ref_block.named_parameters(), self.plain.parameters()):
                        p.copy_(q.detach().view(p.shape))
            ids = None if block in ("dense", "plain") else self.ids
            out = mot_block_ref(ref_block, x, ids, math_attention=False)
            out.backward(self.dy.to(rd))
            grads = {n: p.grad for n, p in ref_block.named_parameters()}
            self._refs[block] = (out.detach(), x.grad, grads)
            del ref_block, out
        return self._refs[block]


class PlainBlock(nn.Module):
    """The dense block as one would write it by hand: 2-D weights, ``F.linear``, ``F.rms_norm``, rotary, causal
    SDPA, ``silu(x W1^T) * (x W3^T)``; post-norm, as :class:`DenseBlock` (whose weights it copies, in the same
    order and under the same names without the modality axis)."""

    def __init__(self, dense: MoTBlock):
        super().__init__()
        for name, p in dense.named_parameters():
            self.register_parameter(name.replace(".", "_"), nn.Parameter(p.detach()[0].clone()))
        a = dense.attn
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = a.n_heads, a.n_kv_heads, a.head_dim, a.rope_theta
        self.eps = dense.attn_norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = F.linear(x, self.attn_wq).view(B, S, H, dh)
        k = F.linear(x, self.attn_wk).view(B, S, Hkv, dh)
        v = F.linear(x, self.attn_wv).view(B, S, Hkv, dh)
        cos, sin = rotary_cos_sin(torch.arange(S, device=x.device).expand(B, S), dh, self.theta, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=Hkv != H
        )
        a = F.linear(o.transpose(1, 2).reshape(B, S, H * dh), self.attn_wo)
        h = x + F.rms_norm(a, (D,), self.attn_norm_weight, self.eps)
        f = F.linear(F.silu(F.linear(h, self.ffn_w1)) * F.linear(h, self.ffn_w3), self.ffn_w2)
        return h + F.rms_norm(f, (D,), self.ffn_norm_weight, self.eps)


def _plain(c: Case) -> Callable[[], torch.Tensor]:
    return lambda: c.plain(c.x)


def _dense(c: Case) -> Callable[[], torch.Tensor]:
    return lambda: c.dense(c.x)


def _mot(c: Case) -> Callable[[], torch.Tensor]:
    def run():
        plan = smk.group_plan(c.ids, NUM_MODALITIES)  # a model builds it once per forward: timed here
        return c.mot(c.x, c.ids, plan=plan)

    return run


def _mask_loop(c: Case) -> Callable[[], torch.Tensor]:
    return lambda: mot_block_ref(c.mot, c.x, c.ids, math_attention=False)


def _mot_backends(device: torch.device, dtype: torch.dtype) -> str:
    ops = (("plan", "group_plan", torch.int64), ("gemm", "grouped_mm", dtype), ("norm", "modality_norm", dtype),
           ("swiglu", "swiglu", dtype))
    return ", ".join(f"{short}={select_backend(op, device, dt)}" for short, op, dt in ops)


@dataclass(frozen=True)
class Provider:
    """One line of the table: ``make(case)`` returns the zero-argument function to time; ``block`` names the
    parameters it runs on (``"dense"`` or ``"mot"``)."""

    name: str
    block: str
    make: Callable[[Case], Callable[[], torch.Tensor]]


# plain first (the baseline of "step time x dense"), mask_loop last (mot's speedup over it is filled in after it ran).
PROVIDERS = [
    Provider("plain", "plain", _plain),
    Provider("dense", "dense", _dense),
    Provider("mot", "mot", _mot),
    Provider("mask_loop", "mot", _mask_loop),
]


def _reset(tensors) -> None:
    for t in tensors:
        t.grad = None


def _validate(fn, case: Case, p: Provider, mode: str) -> tuple[dict[str, float], dict]:
    """Run ``fn`` once (NaN-poisoned allocations); the relative errors that gate timing, and extra facts.

    Gating errors: ``out``; in forward+backward also ``dx`` and ``dparams``, the error of all parameter grads
    taken as one vector (a missing or NaN grad makes it NaN). Extra: ``dparam_worst``, the worst single parameter
    grad (name, error): reported, and flagged in the note when above the tolerance, but not gating.
    """
    ref_out, ref_dx, ref_grads = case.reference(p.block)  # first: its activations are freed before fn runs
    leaves = case.leaves(p.block)
    _reset(leaves)
    try:
        with harness.poisoned_empty():
            if mode == "forward":
                with torch.no_grad():
                    out = fn()
            else:
                out = fn()
                out.backward(case.dy)
        errors = {"out": harness.rel_err(out, ref_out)}
        extra = {}
        if mode != "forward":
            nan = float("nan")
            errors["dx"] = harness.rel_err(case.x.grad, ref_dx) if case.x.grad is not None else nan
            diff2 = ref2 = 0.0
            worst = ("", 0.0)
            for (name, param), ref in zip(case.block(p.block).named_parameters(), ref_grads.values()):
                ref = ref.reshape(param.shape)  # the plain block's weights lack the modality axis
                if param.grad is None:
                    diff2, worst = nan, (name, nan)
                    continue
                d = torch.linalg.vector_norm(param.grad.to(ref.dtype) - ref).item()
                r = torch.linalg.vector_norm(ref).item()
                diff2, ref2 = diff2 + d * d, ref2 + r * r
                e = d / r if r > 0 else d
                if not e <= worst[1] and worst[1] == worst[1]:  # larger, or NaN (which sticks)
                    worst = (name, e)
            errors["dparams"] = (diff2 / ref2) ** 0.5 if ref2 > 0 else diff2**0.5
            extra["dparam_worst"] = {"param": worst[0], "rel_err": worst[1]}
        return errors, extra
    finally:
        _reset(leaves)


def _peak_memory(run, case: Case, p: Provider) -> tuple[float, float]:
    """CUDA: ``(peak GiB allocated during one run, peak GiB above what was allocated before it)``."""
    leaves = case.leaves(p.block)
    _reset(leaves)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    _reset(leaves)
    return peak / 2**30, (peak - base) / 2**30


def _runner(fn, case: Case, mode: str) -> Callable[[], object]:
    """What one timed run does: the forward under ``no_grad``, or forward then ``backward(dy)``."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn()

        return run
    return lambda: fn().backward(case.dy)


def _prepare(p: Provider, case: Case, mode: str) -> tuple[dict, Callable[[], object] | None]:
    """Validate one provider in one mode: its row fields, and the run to time (None when it FAILED).

    A provider that raises (out of memory included) or disagrees with the reference is FAILED and not timed.
    """
    device = case.x.device
    backend = _mot_backends(device, case.dtype) if p.name == "mot" else "torch"
    fields = dict(provider=p.name, backend=backend, status="ok", note="", rel_err=None)
    failure = None
    try:
        fn = p.make(case)
        errors, extra = _validate(fn, case, p, mode)
        fields.update(rel_err=errors, **extra)
        if not harness.within_tolerance(errors, case.dtype):
            worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
            note = f"rel. error {worst} {errors[worst]:.3g} > {harness.TOLERANCE[case.dtype]:g}; not timed"
            return {**fields, "status": "FAILED", "note": note}, None
        tol = harness.TOLERANCE[case.dtype]
        if extra.get("dparam_worst", {}).get("rel_err", 0.0) > tol:
            w = extra["dparam_worst"]
            fields["note"] = f"warning: {w['param']} grad rel. error {w['rel_err']:.3g} > {tol:g} (not gating)"
    except Exception as exc:  # noqa: BLE001 - a provider that raises (e.g. OOM) is reported, never fatal to the run
        failure = f"raised {harness.exception_line(exc)}"
    if failure is not None:  # outside the except: its traceback (holding activations) is gone
        _forget(case, p)
        return {**fields, "status": "FAILED", "note": failure}, None
    return fields, _runner(fn, case, mode)


def _forget(case: Case, p: Provider) -> None:
    _reset(case.leaves(p.block))
    harness.free_device_memory(case.x.device)


def _timed(fields: dict, q: list[float], case: Case, mode: str) -> dict:
    fl = block_flops(case.cfg.dim, case.cfg.hidden, case.batch, case.cfg.seq, mode)
    return {
        **fields,
        "ms_p20": q[0],
        "ms_p50": q[1],
        "ms_p80": q[2],
        "tokens_per_s": case.tokens / (q[1] * 1e-3),
        "tflops": fl / (q[1] * 1e-3) / 1e12,
    }


def _measure(p: Provider, case: Case, mode: str, time_fn) -> dict:
    """Validate, then time, then (CUDA) peak memory of one provider in one mode; the row's measurement fields."""
    fields, run = _prepare(p, case, mode)
    if run is None:
        return fields
    try:
        q = time_fn(run, grad_to_none=case.leaves(p.block))
        _reset(case.leaves(p.block))
        if case.x.device.type == "cuda":
            fields["peak_mem_gib"], fields["step_mem_gib"] = _peak_memory(run, case, p)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while timing: reported, not fatal
        _forget(case, p)
        return {**fields, "status": "FAILED", "note": f"raised {harness.exception_line(exc)}"}
    return _timed(fields, q, case, mode)


def _measure_side_by_side(providers: list[Provider], case: Case, mode: str, budget_s: float = 2.0) -> list[dict]:
    """CPU: every provider validated, then all timed in alternating runs (:func:`harness.time_cpu_alternating`);
    each row also gets its per-round times and its step time over the baseline's paired by round."""
    prepared = [(p, *_prepare(p, case, mode)) for p in providers]
    ok = [(p, f, run) for p, f, run in prepared if run is not None]
    samples: list = []
    times = harness.time_cpu_alternating([run for _, _, run in ok], [case.leaves(p.block) for p, _, _ in ok],
                                         budget_s=budget_s, samples_out=samples)
    timed = {p.name: _timed(f, q, case, mode) for (p, f, _), q in zip(ok, times)}
    by_name = {p.name: s for (p, _, _), s in zip(ok, samples)}
    base = by_name.get(BASELINE, by_name.get("dense"))
    for name, row in timed.items():
        row["samples_ms"] = by_name[name]
        if base is not None:
            row["paired_p20"], row["paired_vs_dense"], row["paired_p80"] = harness.paired_ratio(by_name[name], base)
    for p, _, _ in ok:
        _reset(case.leaves(p.block))
    return [timed.get(p.name, f) for p, f, _ in prepared]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[dict], mode: str) -> str:
    """The rows of one mode, in run order: config, batch x seq, split, provider, times, ratios, memory, note."""
    head = (
        "| config | batch x seq | split (text/image) | layout | provider | backend | median ms | p20-p80 ms | "
        "tokens/s | TFLOP/s | step time x dense | paired by round (p20-p80) | mask_loop / mot | peak GiB (step) | "
        "note |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in (r for r in rows if r["mode"] == mode):
        ok = r["status"] == "ok"
        note = r.get("note") or ""
        if not ok:
            note = f"**{r['status']}** {note}".strip()
        mem = "n/a"
        if r.get("peak_mem_gib") is not None:
            mem = f"{r['peak_mem_gib']:.2f} ({r['step_mem_gib']:.2f})"
        cells = [
            f"{r['config']} (d{r['dim']}, h{r['n_heads']}, ff{r['hidden']})",
            f"{r['batch']}x{r['seq']}",
            r["split"],
            r.get("layout", "spans"),
            r["provider"],
            r.get("backend") or "",
            _fmt(r.get("ms_p50"), ".4g"),
            f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}" if ok else "",
            _fmt(r.get("tokens_per_s"), ".4g"),
            _fmt(r.get("tflops"), ".3g"),
            _fmt(r.get("time_vs_dense"), ".3f"),
            "" if r.get("paired_vs_dense") is None
            else f"{r['paired_vs_dense']:.3f} ({r['paired_p20']:.3f}-{r['paired_p80']:.3f})",
            _fmt(r.get("mask_loop_over_mot"), ".2f"),
            mem if ok else "",
            note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def goal_table(rows: list[dict], device_type: str, dtype_name: str) -> str:
    """Per config and split: MoT's step time vs dense and its speedup over the mask loop, against the goal.

    The GPU goal is for a training step (forward+backward) on H100/H200 in bf16. On the CPU (fp32, training
    step) the sorted-stream goals: MoT <= :data:`CPU_GOALS_MOT` of the plain block per config, the one-modality
    block <= :data:`CPU_GOAL_DENSE`; judged on the ratio paired by round where there is one."""
    head = "| config | split | layout | mode | provider | step time x dense (paired) | mask_loop / mot | goal | met |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = device_type == "cpu"
        if r["provider"] != "mot" and not (cpu and r["provider"] == "dense"):
            continue
        xd, sp = r.get("time_vs_dense"), r.get("mask_loop_over_mot")
        paired = r.get("paired_vs_dense")
        goal = "-"
        if r["mode"] != "forward+backward":
            met = "n/a (the goals are for the training step)"
        elif cpu and dtype_name == "fp32":
            limit = CPU_GOAL_DENSE if r["provider"] == "dense" else CPU_GOALS_MOT.get(r["config"])
            x = paired if paired is not None else xd
            if limit is None:
                met = f"n/a (CPU goals are set for {', '.join(CPU_GOALS_MOT)})"
            else:
                goal = f"<= {limit}"
                met = "n/a (a provider did not run)" if x is None else ("yes" if x <= limit else "no")
        elif device_type != "cuda" or dtype_name != "bf16":
            met = f"n/a (the goals are for a GPU in bf16 or the CPU in fp32; this is {device_type}, {dtype_name})"
        elif xd is None or sp is None:
            met = "n/a (a provider did not run)"
        else:
            goal = f"<= {GOAL_X_DENSE}, mask_loop / mot >= {GOAL_VS_MASK_LOOP}"
            met = "yes" if xd <= GOAL_X_DENSE and sp >= GOAL_VS_MASK_LOOP else "no"
        shown = _fmt(xd, ".3f") + (f" ({paired:.3f})" if paired is not None else "")
        lines.append(f"| {r['config']} | {r['split']} | {r.get('layout', 'spans')} | {r['mode']} | {r['provider']} | "
                     f"{shown} | {_fmt(sp, '.2f')} | {goal} | {met} |")
    return "\n".join(lines)


def write_results(stem: Path, header: list[str], env: dict, rows: list[dict], modes: list[str], complete: bool,
                  dtype_name: str):
    """``stem.md`` / ``stem.json`` by :func:`harness.write_results` (header, status, JSON rows); the block tables
    (the harness's own table has GEMM columns) and the goal check are appended to the markdown."""
    md, js = harness.write_results(stem, header, env, rows, [], complete)
    parts = [md.read_text().rstrip("\n"), ""]
    for mode in modes:
        parts += [f"## {mode}", "", markdown_table(rows, mode), ""]
    parts += ["## goal check (MoT <= 1.05 x dense step time and >= 1.3 x faster than mask_loop)", "",
              goal_table(rows, env["device_type"], dtype_name), ""]
    md.write_text("\n".join(parts))
    return md, js


def _parse(argv):
    ap = harness.cli_parser(
        "python -m benchmarks.bench_mot_block", __doc__.split("\n")[0],
        "the first config (443M on cuda), 80/20 split only",
        "CPU threads for torch (default 1: stable on a shared machine; 0: leave defaults)",
    )
    ap.add_argument(
        "--configs", default=None,
        help=f"comma list of {list(MOT_BLOCK_CONFIGS)} (default: 443M,1.5B on cuda, tiny on cpu)",
    )
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default: the config's, 4 on GPU)")
    ap.add_argument("--layouts", default="spans", help=f"comma list of {list(MOT_LAYOUTS)} (default: spans)")
    args = harness.parse_cli(ap, argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    args.layouts = [t.strip() for t in args.layouts.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, 3 if any provider FAILED (validation, or it or its case raised), 2 on a bad
    request."""
    args = _parse(argv)
    budget = harness.CaseBudget(args.time_budget)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    if args.batch is not None and args.batch < 1:
        print(f"error: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    bad_layouts = sorted(set(args.layouts) - set(MOT_LAYOUTS))
    if bad_layouts or not args.layouts:
        print(f"error: unknown layouts {bad_layouts}; known: {list(MOT_LAYOUTS)}", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = harness.DTYPES[dtype_name]
    try:
        cases = mot_block_set(device.type, args.quick, args.configs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return harness.EXIT_BAD_REQUEST
    providers = PROVIDERS
    if args.providers:
        wanted = [n.strip() for n in args.providers.split(",")]
        unknown = set(wanted) - {p.name for p in PROVIDERS}
        if unknown:
            print(f"error: unknown providers {sorted(unknown)}; known: {[p.name for p in PROVIDERS]}", file=sys.stderr)
            return harness.EXIT_BAD_REQUEST
        providers = [p for p in PROVIDERS if p.name in wanted]
    if device.type == "cpu" and args.threads > 0:
        harness.set_cpu_threads(args.threads)
    env = harness.collect_env(device)
    time_fn, method = harness.timer(device)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(args.out) / f"{OP}-{harness.slug(env['device'])}-{dtype_name}-{stamp}"
    configs = sorted({cfg.name for cfg, _ in cases}, key=list(MOT_BLOCK_CONFIGS).index)
    config_lines = ", ".join(
        f"{c.label(args.batch)} (image spans ~{c.image_span})" for c in (MOT_BLOCK_CONFIGS[n] for n in configs)
    )
    header = [
        f"# {OP} benchmark: {env['device']}, {dtype_name}",
        "",
        f"Every number below was measured in this run ({harness.now_utc()}), in one process on this device, "
        "all providers on the same parameters and inputs; compare numbers only within this file.",
        "",
        f"- device: {env['device']}"
        + (
            f" (sm_{env['capability'].replace('.', '')}, {env.get('sm_count')} SMs, driver {env.get('driver', 'n/a')})"
            if device.type == "cuda"
            else f" ({env['cpu_count']} cores, {env['torch_threads']} threads for torch)"
        ),
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}",
        f"- git: {env['git_commit'] or 'n/a'}" + (" (uncommitted changes)" if env["git_dirty"] else ""),
        f"- dtype: {dtype_name}; configs: {config_lines}; splits: {', '.join(dict.fromkeys(s for _, s in cases))}"
        + (" (--quick)" if args.quick else ""),
        "- block: one transformer layer, post-norm RMSNorm, rotary, causal SDPA attention (no QK-norm, no GQA), "
        f"SwiGLU; MoT with {NUM_MODALITIES} modalities (0 = text, 1 = image), made by MoTBlock.from_dense(dense) then "
        f"each weight perturbed by {PERTURB:g} x its RMS x N(0,1) per modality",
        "- providers: plain = the dense block written by hand (2-D weights, F.linear, F.rms_norm, SDPA, silu*up), "
        "the baseline; dense = DenseBlock (the package's block with one modality); mot = smk.group_plan(ids, 2) + "
        "MoTBlock(x, ids, plan=plan), plan built inside the timed region; mask_loop = reference.mot.mot_block_ref "
        "(boolean masks, loop over modalities, SDPA) on the MoT parameters",
        f"- modality layouts: {', '.join(args.layouts)}; spans = each sequence alternates text runs and image spans "
        "(random cut points), random = every token's modality drawn independently; exactly the split's image "
        f"fraction per sequence either way (benchmarks/shapes.py: modality_layout_ids, --seed {args.seed})",
        f"- timing: {method}; median = p50",
        f"- {FLOP_FORMULA} TFLOP/s = FLOPs / median time; tokens/s = batch*seq / median time",
        "- step time x dense = provider median / plain median, same config, split, layout and mode (the goal: mot <= "
        f"{GOAL_X_DENSE}); mask_loop / mot = mask_loop median / mot median (the goal: >= {GOAL_VS_MASK_LOOP}; "
        "the goal is set for H100/H200 in bf16); paired by round (CPU) = the median over the alternating rounds of "
        "provider time / plain time in the same round (p20-p80 in parentheses), which cancels a slow round; CPU "
        f"goals (fp32, forward+backward): mot <= {CPU_GOALS_MOT} x plain, dense <= {CPU_GOAL_DENSE} x plain, "
        "judged on the paired ratio",
        "- peak GiB (step): CUDA torch.cuda.max_memory_allocated() during one extra run after "
        "reset_peak_memory_stats() (everything resident: parameters, inputs, references), and in parentheses the "
        "peak above what was allocated before that run; n/a on CPU",
        f"- validation: before timing, each provider's output (in forward+backward also dX, and dparams = all "
        f"parameter grads as one vector) is compared with the mask-loop reference run on a "
        f"{str(harness.reference_dtype(dtype)).replace('torch.', '')} copy of its block by relative Frobenius "
        f"error; above {harness.TOLERANCE[dtype]:g} (or raising, e.g. out of memory) it is FAILED and not timed; "
        "the worst single parameter grad is in the JSON (dparam_worst) and a warning in the note when above the "
        "tolerance",
        "- forward mode runs under torch.no_grad(); forward+backward = forward then out.backward(dy), grads of x "
        "and every parameter set to None before every run",
    ]
    print("\n".join(header), flush=True)
    rows: list[dict] = []
    done = 0
    runs = [(cfg, split, layout) for cfg, split in cases for layout in args.layouts]
    for cfg, split, layout in runs:
        batch = args.batch or cfg.batch
        label = f"{cfg.label(batch)} {split} {layout}"
        if not budget.try_start(label):
            break
        try:
            case = Case(cfg, split, batch, device, dtype, args.seed, layout)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the blocks: report, go on
            note = f"setup raised {harness.exception_line(exc)}"
            print(f"{label}: {note}", flush=True)
            case = None
        for mode in args.modes:
            if case is None:
                measured = [dict(provider=p.name, backend=None, status="FAILED", note=note, rel_err=None)
                            for p in providers]
            elif device.type == "cpu":
                measured = _measure_side_by_side(providers, case, mode, args.cpu_budget)
            else:
                measured = [_measure(p, case, mode, time_fn) for p in providers]
            mode_rows = []
            for p, m in zip(providers, measured):
                row = harness.make_row(
                    env,
                    op=OP,
                    mode=mode,
                    config=cfg.name,
                    dim=cfg.dim,
                    n_heads=cfg.n_heads,
                    hidden=cfg.hidden,
                    seq=cfg.seq,
                    batch=batch,
                    split=split,
                    layout=layout,
                    image_fraction=case.image_fraction if case is not None else MOT_SPLITS[split],
                    dtype=dtype_name,
                    flops=block_flops(cfg.dim, cfg.hidden, batch, cfg.seq, mode),
                    timing="do_bench" if device.type == "cuda" else "perf_counter, alternating",
                    **{"peak_mem_gib": None, "step_mem_gib": None, **m},
                )
                distrust = harness.trust_note(row) if row["status"] == "ok" else ""
                if distrust:
                    row["note"] = f"{row['note']}; {distrust}" if row.get("note") else distrust
                mode_rows.append(row)
                ms = f"{row['ms_p50']:.4g} ms  {row['tflops']:.3g} TFLOP/s" if row["status"] == "ok" else row["note"]
                ms += f"  ({distrust})" if distrust else ""
                print(f"{label:48s} {mode:16s} {p.name:10s} {row['status']:7s} {ms}", flush=True)
            ms_of = {r["provider"]: r.get("ms_p50") for r in mode_rows if r["status"] == "ok"}
            base = BASELINE if BASELINE in ms_of else "dense"
            for r in mode_rows:
                r["baseline"] = base if base in ms_of else None
                r["time_vs_dense"] = r["ms_p50"] / ms_of[base] if base in ms_of and r.get("ms_p50") else None
                r["mask_loop_over_mot"] = None
                if r["provider"] == "mot" and "mot" in ms_of and "mask_loop" in ms_of:
                    r["mask_loop_over_mot"] = ms_of["mask_loop"] / ms_of["mot"]
            rows += mode_rows
            write_results(stem, header, env, rows, args.modes, False, dtype_name)
        done += 1
        del case
        harness.free_device_memory(device)
        budget.done()
    md, js = write_results(stem, header, env, rows, args.modes, done == len(runs), dtype_name)
    for mode in args.modes:
        print(f"\n## {mode}\n\n{markdown_table(rows, mode)}")
    print(f"\n## goal check\n\n{goal_table(rows, device.type, dtype_name)}")
    failed = [r for r in rows if r["status"] == "FAILED"]
    print(f"\n{len(rows)} rows ({len(failed)} FAILED) in {budget.elapsed():.1f} s -> {md}, {js}", flush=True)
    return harness.EXIT_FAILED if failed else harness.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
