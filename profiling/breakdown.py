"""Per-layer time breakdown of one training step, by torch.profiler.

Ranges around modules -> one profiled step -> each op's own time charged to the innermost range -> categories.

* Ranges: for every ``(module, role)`` of the workload, the harness opens a ``record_function`` range named
  ``prof.fwd:<role>`` around the module's forward (forward pre-hook / hook) and ``prof.bwd:<role>`` around its
  backward (full backward pre-hook / hook). Nothing in the package is changed; the hooks exist only for the
  profiled step (and one warm-up step before it) and are removed afterwards.
* Time of an op: on a GPU, the device time of the kernels it launched itself (CUDA kernels, memcpy, memset; not
  its children's); on the CPU, its self CPU time. Summed over a category, these partition the step's work.
* Category: from the role of the innermost range (:data:`ROLE_CATEGORY`), refined by op names where one range
  mixes kinds of work (:func:`categorize`): the attention kernels inside the attention module; inside a
  reference-style block, whose projections, norms and mask indexing are not submodule calls, everything by name
  (its GEMMs cannot be told apart by name: one "GEMMs, unsplit" category); outside every range (the loss, the
  embedding's backward), by name too. On the CPU, host overhead is its own category: the ranges' own time
  (Python between ops) and the self time of every event that is not an operator (Python autograd Functions,
  the autograd engine's node wrappers); the hooks' identity autograd nodes are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function

ATTENTION = "attention"
PROJ = "qkv/o projections"
FFN = "FFN"
GEMM_UNSPLIT = "GEMMs, unsplit (reference)"
NORMS = "norms"
PLAN = "plan"
MASKS = "mask gather/scatter"
DEPTH_ROUTING = "MoD route/gather/combine"
EMBED_HEAD_LOSS = "embedding, LM head, loss"
HOST = "host (Python and autograd bookkeeping between operators, CPU only)"
OTHER = "other"

#: Report order. Later layers add categories (e.g. "router") by appending here and mapping a role to them.
CATEGORIES = [ATTENTION, PROJ, FFN, GEMM_UNSPLIT, NORMS, PLAN, MASKS, DEPTH_ROUTING, EMBED_HEAD_LOSS, HOST, OTHER]

#: Role of the innermost range -> category; ``None``: decided by op names alone.
ROLE_CATEGORY: dict[str | None, str | None] = {
    "attn": PROJ,  # the attention kernels inside it are recognised by name (categorize)
    "ffn": FFN,
    "norm": NORMS,
    "embed": EMBED_HEAD_LOSS,
    "lm_head": EMBED_HEAD_LOSS,
    "model": PLAN,  # what a model runs outside its submodules: the modality plan (and argument checks)
    "block": OTHER,  # residual adds
    "mod": DEPTH_ROUTING,  # a MixtureOfDepths outside its block: the router, the top-k, the gather and the combine
    "ref_block": None,
    None: None,
}

_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
_LOSS_EMBED_OPS = ("nll_loss", "nllloss", "log_softmax", "logsoftmax", "cross_entropy", "embedding")
_MASK_OPS = ("index", "nonzero", "masked", "aten::eq", "aten::new_zeros", "_local_scalar_dense",
             "aten::item")

PREFIX_FWD, PREFIX_BWD = "prof.fwd:", "prof.bwd:"
#: CPU events whose self time is an operator's work; every other event's self time (the harness ranges, Python
#: autograd Functions, the autograd engine's wrappers) is host overhead.
_OPERATOR_PREFIXES = ("aten::", "sparsemm::", "mkldnn::", "quantized::", "prim::")


def _by_name(names: list[str], default: str) -> str:
    low = [n.lower() for n in names]
    if any("attention" in n for n in low):
        return ATTENTION
    if any(k in n for n in low for k in ("rms_norm", "layer_norm", "rmsnorm", "layernorm")):
        return NORMS
    if any(k in n for n in low for k in _LOSS_EMBED_OPS):
        return EMBED_HEAD_LOSS
    if any(n.startswith(_GEMM_OPS) or n.split(": ")[-1].startswith(("Mm", "Addmm", "Bmm")) for n in names):
        return GEMM_UNSPLIT
    if any(k in n for n in low for k in _MASK_OPS):
        return MASKS
    return default


def categorize(role: str | None, path: list[str]) -> str:
    """The category of an op whose innermost range has ``role``; ``path``: the op's name and its ancestors' up to
    that range (innermost first)."""
    if role == "attn":
        return ATTENTION if any("attention" in n.lower() for n in path) else PROJ
    mapped = ROLE_CATEGORY.get(role, OTHER)
    return mapped if mapped is not None else _by_name(path, OTHER)


class _Ranges:
    """Opens and closes the named ranges from module hooks (one stack per module and direction)."""

    def __init__(self, roles: list[tuple[nn.Module, str]]) -> None:
        self.roles = roles
        self.handles: list = []
        self.open: dict[tuple[int, str], list[record_function]] = defaultdict(list)

    def _enter(self, module: nn.Module, direction: str, name: str) -> None:
        rf = record_function(name)
        rf.__enter__()
        self.open[(id(module), direction)].append(rf)

    def _exit(self, module: nn.Module, direction: str) -> None:
        stack = self.open.get((id(module), direction))
        if stack:
            stack.pop().__exit__(None, None, None)

    def install(self) -> None:
        for module, role in self.roles:
            fwd, bwd = PREFIX_FWD + role, PREFIX_BWD + role
            self.handles += [
                module.register_forward_pre_hook(lambda m, args, n=fwd: self._enter(m, "f", n)),
                module.register_forward_hook(lambda m, args, out: self._exit(m, "f")),
            ]
            if role not in ("model", "embed"):  # their inputs (token ids) carry no gradient: no backward range
                self.handles += [
                    module.register_full_backward_pre_hook(lambda m, grad_out, n=bwd: self._enter(m, "b", n)),
                    module.register_full_backward_hook(lambda m, grad_in, grad_out: self._exit(m, "b")),
                ]

    def remove(self) -> None:
        for stack in self.open.values():
            while stack:
                stack.pop().__exit__(None, None, None)
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _innermost(event) -> tuple[str | None, str, list[str]]:
    """``(role, direction, path)`` of an event: the innermost harness range above it (or None), ``"fwd"`` or
    ``"bwd"``, and the names from the event up to that range."""
    path: list[str] = []
    node = event
    backward = False
    while node is not None:
        name = node.name
        if name.startswith(PREFIX_FWD):
            return name[len(PREFIX_FWD):], "fwd", path
        if name.startswith(PREFIX_BWD):
            return name[len(PREFIX_BWD):], "bwd", path
        backward = backward or name.startswith("autograd::engine::evaluate_function")
        path.append(name)
        node = node.cpu_parent
    return None, "bwd" if backward else "fwd", path


def _cpu_peak_bytes(prof) -> int | None:
    """Largest net CPU allocation (bytes) reached during the profiled region, from the allocator events."""
    try:
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        records = [e for e in records if e.device_type() == DeviceType.CPU]
    except Exception:  # noqa: BLE001 - a private structure: "n/a" rather than a crash if it changes
        return None
    level = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def profile_step(
    step: Callable[[], None],
    zero: Callable[[], None],
    roles: list[tuple[nn.Module, str]],
    device: torch.device,
    trace_path: str | None = None,
) -> dict:
    """Profile one training step with ranges around the ``roles``' modules; return the per-category breakdown.

    Returns ``{"categories": {category: {"fwd_ms", "bwd_ms", "ms"}}, "attributed_ms", "device_total_ms",
    "unattributed_ms", "step_wall_ms", "cpu_peak_delta_bytes", "method"}`` (times in ms for this one step;
    ``device_total_ms``/``unattributed_ms``: every kernel on the GPU, and those not linked to an op; None on CPU).
    ``trace_path``: also write the profiled step as a Chrome trace (chrome://tracing, Perfetto) there.
    """
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # The profiler's own warm-up step (its first session in a process costs extra) runs with the hooks in place;
    # only the second, active step is recorded.
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    ranges = _Ranges(roles)
    ranges.install()
    try:
        with torch.profiler.profile(activities=activities, schedule=schedule, profile_memory=not cuda) as prof:
            for _ in range(2):
                zero()
                with record_function("prof.step"):
                    step()
                sync()
                prof.step()
    finally:
        ranges.remove()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = prof.events()
    per = defaultdict(lambda: [0.0, 0.0])
    step_wall_us = device_total_us = 0.0
    for e in events:
        if e.device_type != DeviceType.CPU:
            device_total_us += e.time_range.elapsed_us()
            continue
        if e.name == "prof.step":
            step_wall_us = e.time_range.elapsed_us()
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t <= 0 or "BackwardHookFunction" in e.name:  # the hooks' own identity nodes: instrumentation
            continue
        role, direction, path = _innermost(e)
        # On the CPU a range's own time is the Python running between the module's ops, and the self time of an
        # event that is not an operator (a Python autograd Function, the engine's node wrapper) is Python and
        # bookkeeping too; on a GPU a range's own time is the kernels launched straight from Python (Triton),
        # which belong to the module.
        own = not cuda and not e.name.startswith(_OPERATOR_PREFIXES)
        per[HOST if own else categorize(role, path)][direction == "bwd"] += t
    cats = {
        c: {"fwd_ms": per[c][0] / 1e3, "bwd_ms": per[c][1] / 1e3, "ms": (per[c][0] + per[c][1]) / 1e3}
        for c in [*CATEGORIES, *sorted(set(per) - set(CATEGORIES))]
        if c in per
    }
    attributed = sum(v["ms"] for v in cats.values())
    return {
        "categories": cats,
        "attributed_ms": attributed,
        "device_total_ms": device_total_us / 1e3 if cuda else None,
        "unattributed_ms": max(0.0, device_total_us / 1e3 - attributed) if cuda else None,
        "step_wall_ms": step_wall_us / 1e3,
        "cpu_peak_delta_bytes": None if cuda else _cpu_peak_bytes(prof),
        "method": (
            "torch.profiler, one step after one warm-up step; per op the device time of the kernels it launched, "
            "charged to the innermost module range (harness hooks)"
            if cuda
            else "torch.profiler, one step after one warm-up step; per op its self CPU time (profiler overhead "
            "included), charged to the innermost module range (harness hooks)"
        ),
    }
