"""Ahead-of-time GPU compilation of every Triton kernel of the package, on a CPU-only machine.

    python -m benchmarks.aot [--quick] [--jobs N] [--archs 80,90] [--out DIR] [--no-cache] [--include-pruned]

Pipeline: **record** -> **compile** -> **check** -> table.

* Record: the package's own launchers (``grouped_gemm``, ``grouped_gemm_dw``, ``modality_norm_fwd/bwd``,
  ``swiglu_fwd/bwd``, ``silu_mul_fwd/bwd``, ``group_plan_triton``) run on CPU tensors (allocated, never
  touched) with the launch intercepted inside Triton's runtime: ``JITFunction.run`` binds the arguments with
  Triton's own binder for a *target* backend (a stand-in driver reports sm_80 or sm_90a), so the signature
  (``*bf16``, ``i32``/``i64``), the specialisation of ints equal to 1 (constexpr) and of ints / pointers
  divisible by 16 (``tt.divisibility`` attrs) and the parsed options are exactly what the GPU runtime would
  compile; the compile itself is skipped.
  The autotuner runs its real config pruning for the target (``configs.current_capability`` is patched to the
  target's capability) and "benchmarks" every config that survives, so every choosable config is recorded.
  CUDA-only calls of the launchers (the SM counts of ``norms._num_sms`` and ``grouped_gemm._device_sms``) answer
  with the target's values.
* Compile: each distinct (kernel, signature, constexprs, attrs, options, arch) once, in a process pool, with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``; the ptxas log of that very compile
  (Triton's own ptxas call, ``-v``) gives registers, spills and static shared memory, ``metadata.shared`` the
  dynamic shared memory, and the PTX the tensor-core instructions (``mma.sync`` / ``wgmma``). Results are
  cached in ``.aot-cache/`` keyed by the job (Triton version and kernel source hash included).
* Check, and exit 1 on any of: a compile error; a recorded (= choosable) launch over a limit of its arch (shared
  memory per block, registers x threads, 1024 threads, grid axes); a ``tl.dot`` kernel in 16-bit or TF32
  without tensor-core instructions; spills in a job launched for a shape of ``benchmarks/shapes.py`` (spills
  at other shapes are reported as warnings).

Output: ``<out>/aot-<triton version>[-quick].md`` (one row per kernel x dtype x precision x config x arch, worst
case over its specialisations) and a ``.json`` beside it with every job, its launches and its numbers.

``--quick`` (CI): the fixed configs (``SPARSEMM_AUTOTUNE=0``), both archs, bf16 and fp32, one benchmark shape per
kernel. The full matrix: every config the autotuner can choose, fp16 / bf16 / fp32 ("ieee") / fp32 with TF32,
every shape of ``benchmarks/shapes.py`` and of its model configs, plus small shapes off the tiles.
Nothing here runs a kernel or measures GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = ROOT / ".aot-cache"

# Triton versions this tool (and the package's kernels) are compiled and checked with: the GPU machines' and CI's.
TESTED_TRITON = ("3.6.0", "3.9.0")

# The kernel modules, imported only after the environment is prepared (``@triton.jit`` and the autotune config
# lists are decided at import time).
KERNEL_MODULES = (
    "sparsemm_kernels.kernels.triton.grouped_gemm",
    "sparsemm_kernels.kernels.triton.norms",
    "sparsemm_kernels.kernels.triton.swiglu",
    "sparsemm_kernels.kernels.triton.group_plan",
    "sparsemm_kernels.kernels.triton.routing",
    "sparsemm_kernels.kernels.triton.mod_combine",
    "sparsemm_kernels.kernels.triton.token_topk",
    "sparsemm_kernels.kernels.triton.block_gather",
    "sparsemm_kernels.kernels.triton.avgk_select",
)

# Constexprs that are tile configuration (shown in the "config" column); every other constexpr is a mode.
CONFIG_KEYS = ("BLOCK_M", "BLOCK_J", "BLOCK_N", "BLOCK_K", "GROUP_M", "M_BLOCK", "BLOCK_R", "BLOCK_D", "BLOCK_H",
               "BLOCK", "BLOCK_P", "BLOCK_G", "BLOCK_C", "BLOCK_B")

MAX_THREADS_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Arch:
    """A compile target: compute capability ``cc`` (80, 90), the GPU it stands for and that GPU's limits."""

    cc: int
    name: str  # ptxas arch, e.g. sm_90a
    gpu: str
    sms: int
    smem_limit: int  # bytes of shared memory one block may use (opt-in maximum)

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.cc, 10)


def _archs() -> dict[int, Arch]:
    from sparsemm_kernels.kernels.triton.configs import shared_memory_limit

    return {
        80: Arch(80, "sm_80", "A100", 108, shared_memory_limit((8, 0))),
        90: Arch(90, "sm_90a", "H100", 132, shared_memory_limit((9, 0))),
    }


# dtype label -> (torch dtype name, allow TF32 for matmuls). "fp32" is fp32 without TF32 ("ieee").
PRECISIONS = {"fp16": ("float16", False), "bf16": ("bfloat16", False), "fp32": ("float32", False),
              "tf32": ("float32", True)}


# ---------------------------------------------------------------------------------------------------------------
# Recording


@dataclass
class Launch:
    """One intercepted launch: what the runtime would compile for ``arch`` and the grid it would launch."""

    module: str
    kernel: str
    arch: int
    scenario: str
    bench: bool  # a shape of benchmarks/shapes.py (spills fail there)
    grid: tuple[int, int, int]
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [[attr, value], ...]}
    options: dict  # the backend's parsed options (CUDAOptions.__dict__)
    fn_key: str  # the kernel's source hash (Triton's cache_key)
    pruned: bool = False  # compiled only for the record: the autotuner cannot choose it here
    fixed: bool = False  # launched with the SPARSEMM_AUTOTUNE=0 config list


class _TargetDriver:
    """Stands in for Triton's CUDA driver while recording: reports the target, never touches a GPU."""

    def __init__(self, cc: int):
        self.cc = cc

    def get_current_device(self):
        return ("aot", self.cc)  # a device key per target keeps Triton's per-device binder caches apart

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)

    def is_active(self):
        return True


def _import_kernels() -> dict:
    import importlib

    return {name: importlib.import_module(name) for name in KERNEL_MODULES}


def _autotuners(modules) -> list:
    from triton.runtime.autotuner import Autotuner

    return [obj for m in modules.values() for obj in vars(m).values() if isinstance(obj, Autotuner)]


class Recorder:
    """Collects :class:`Launch` records of the launches made inside :meth:`target`."""

    def __init__(self, include_pruned: bool = False):
        self.launches: list[Launch] = []
        self.include_pruned = include_pruned
        self._frames: list[list[dict]] = []
        self._scenario: tuple[str, bool] = ("?", False)
        self._arch: Arch | None = None
        self._pruned_depth = 0
        self._tuners: list = []
        self.fixed = False

    def call(self, scenario: str, bench: bool, fn: Callable, *args, **kwargs):
        """Run one launcher call, labelling the launches it makes."""
        self._scenario = (scenario, bench)
        # The tuning key leaves out some specialisations (search FANOUT, divisibility): whichever config the GPU picks
        # for a key meets every one of them, so every call re-tunes and records all choosable configs.
        for t in self._tuners:
            t.cache.clear()
        return fn(*args, **kwargs)

    @contextlib.contextmanager
    def target(self, arch: Arch, modules: dict) -> Iterator[None]:
        """Within: every kernel launch is recorded for ``arch`` instead of compiled and run."""
        import torch
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        norms = modules["sparsemm_kernels.kernels.triton.norms"]
        gemm = modules["sparsemm_kernels.kernels.triton.grouped_gemm"]
        from sparsemm_kernels.kernels.triton import configs

        patches: list[tuple[object, str, object]] = []

        def patch(obj, name, new):
            if not hasattr(obj, name):
                raise RuntimeError(f"aot: cannot patch {getattr(obj, '__name__', obj)}.{name}: it no longer exists")
            patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)

        rec = self
        orig_run = JITFunction.run
        orig_prune = Autotuner.prune_configs
        orig_row_blocks = norms._num_row_blocks

        def run(jit, *args, grid, warmup, **kwargs):
            frame: list[dict] = []
            rec._frames.append(frame)
            try:
                orig_run(jit, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                rec._frames.pop()
            meta = dict(zip(jit.arg_names, args), **kwargs)
            g = tuple(int(v) for v in (grid(meta) if callable(grid) else grid))
            g = (g + (1, 1, 1))[:3]
            for r in frame:
                rec.launches.append(Launch(
                    module=jit.fn.__module__, kernel=jit.fn.__name__, arch=arch.cc, scenario=rec._scenario[0],
                    bench=rec._scenario[1], grid=g, fn_key=jit.cache_key, pruned=rec._pruned_depth > 0,
                    fixed=rec.fixed, **r,
                ))

        def do_compile(jit, key, signature, device, constexprs, options, attrs, warmup):
            rec._frames[-1].append(dict(signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs),
                                        options=dict(options.__dict__)))
            return None  # nothing compiled: the runtime returns before launching

        def bench(tuner, *args, config, **meta):
            tuner.fn.run(*args, **meta, **config.all_kwargs())
            return [0.0, 0.0, 0.0]

        def prune(tuner, kwargs):
            kept = orig_prune(tuner, kwargs)
            if rec.include_pruned:
                rec._pruned_depth += 1
                try:
                    for cfg in tuner.configs:
                        if cfg not in kept:
                            tuner.fn.run(*tuner.nargs.values(), **kwargs, **cfg.all_kwargs())
                finally:
                    rec._pruned_depth -= 1
            return kept

        saved_driver = driver._active
        tuners = _autotuners(modules)
        try:
            driver.set_active(_TargetDriver(arch.cc))
            patch(JITFunction, "run", run)
            patch(JITFunction, "_do_compile", do_compile)
            patch(Autotuner, "_bench", bench)
            patch(Autotuner, "prune_configs", prune)
            # CUDA-only facts the launchers ask for: the target's SM count and capability.
            patch(norms, "_num_sms", lambda index: arch.sms)
            patch(gemm, "_device_sms", lambda device: arch.sms)  # the dW row split depends on it
            patch(norms, "_num_row_blocks", lambda R, device: orig_row_blocks(R, torch.device("cuda", 0)))
            patch(configs, "current_capability", lambda device=None: arch.capability)
            self._tuners = tuners
            self._arch = arch
            yield
        finally:
            for obj, name, old in reversed(patches):
                setattr(obj, name, old)
            driver._active = saved_driver
            for t in tuners:
                t.cache.clear()
            self._tuners = []
            self._arch = None


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# ---------------------------------------------------------------------------------------------------------------
# Scenarios: launcher calls with the tensors (shapes, dtypes, layouts) the benchmarks and model layers use.


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _empty(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype)  # never written nor read: the pages are not even touched


def _gemm_shapes(quick: bool) -> list[tuple[str, bool, int, int, int, int, tuple[str, ...]]]:
    """``(label, bench, T, K, N, G, passes)``: benchmark shapes, the MoT layers' GEMMs, small shapes off the tiles."""
    from benchmarks.shapes import GPU, GPU_QUICK, MOT_BLOCK_CONFIGS, MOT_GPU_CONFIGS

    if quick:
        s = GPU_QUICK[0]
        return [(s.label(), True, s.T, s.K, s.N, s.G, ("fwd-routed", "dx-sorted", "dw-gathered"))]
    every = ("fwd-sorted", "fwd-routed", "dx-sorted", "dx-routed", "dw-sorted", "dw-gathered")
    out = [(s.label(), True, s.T, s.K, s.N, s.G, every) for s in GPU]
    for name in MOT_GPU_CONFIGS:  # the block benchmark's layers: qkv, wo, w1|w3, w2, routed by the plan
        c = MOT_BLOCK_CONFIGS[name]
        T = c.batch * c.seq
        for what, K, N in (("qkv", c.dim, 3 * c.dim), ("wo", c.dim, c.dim), ("w13", c.dim, 2 * c.hidden),
                           ("w2", c.hidden, c.dim)):
            out.append((f"MoT {name} {what} T{T} K{K} N{N} G2", True, T, K, N, 2,
                        ("fwd-routed", "dx-routed", "dw-gathered", "fwd-routed-bias", "dw-gathered-dbias")))
    AVGK_PASSES = ("fwd-sorted", "dx-sorted", "dw-sorted")  # noqa: N806
    # Off the tiles (spills there warn): sizes not multiples of 16 or of any tile, one group, a bias, a
    # column-major x. One pass set each: every config compiles each distinct specialisation once.
    tiny = MOT_BLOCK_CONFIGS["tiny"]
    T = tiny.batch * tiny.seq
    out += [
        ("off-tile T1000 K200 N72 G3", False, 1000, 200, 72, 3,
         ("fwd-routed", "dx-sorted", "dw-gathered", "fwd-sorted-bias", "dw-sorted-dbias")),
        ("off-tile T77 K40 N24 G1", False, 77, 40, 24, 1, ("fwd-sorted",)),
        (f"MoT tiny w13 T{T} K{tiny.dim} N{2 * tiny.hidden} G2", False, T, tiny.dim, 2 * tiny.hidden, 2,
         ("fwd-routed", "dw-gathered")),
        ("off-tile T512 K128 N64 G2 x column-major", False, 512, 128, 64, 2, ("fwd-sorted-colmajor",
                                                                             "dw-sorted-colmajor")),
        # Few dW tiles, many rows: the dW is split over row chunks on both archs (partials + reduce kernel).
        ("narrow T16384 K256 N256 G4", False, 16384, 256, 256, 4, ("dw-sorted", "dw-gathered-dbias", "fwd-routed")),
        # More groups than one search step covers (two-step tile -> group search; the old 4096-group cap).
        ("many groups T8192 K256 N128 G5000", False, 8192, 256, 128, 5000, ("fwd-routed", "dw-gathered")),
        # Avg-K's grouped strategy (dim 2048, 16384 cells, 2048 active, 512 tokens): blocks of 16 and 32 cells are
        # narrow launches (W_in: g output columns; W_out: depth g) with the narrow tiles.
        ("Avg-K g16 w_in T65536 K2048 N16 G1024", True, 65536, 2048, 16, 1024, AVGK_PASSES),
        ("Avg-K g16 w_out T65536 K16 N2048 G1024", True, 65536, 16, 2048, 1024, AVGK_PASSES),
        ("Avg-K g32 w_in T32768 K2048 N32 G512", True, 32768, 2048, 32, 512, AVGK_PASSES),
        ("Avg-K g32 w_out T32768 K32 N2048 G512", True, 32768, 32, 2048, 512, AVGK_PASSES),
        ("narrow both T4096 K16 N32 G8", False, 4096, 16, 32, 8, ("fwd-sorted", "dw-sorted")),
    ]
    return out


def _gemm_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    import torch

    from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm, grouped_gemm_dw

    for label, bench, T, K, N, G, passes in _gemm_shapes(quick):
        for prec in dtypes:
            dt, tf32 = PRECISIONS[prec]
            dtype = _dtype(dt)
            a, w, dy = _empty(T, K, dtype=dtype), _empty(G, N, K, dtype=dtype), _empty(T, N, dtype=dtype)
            offsets = torch.zeros(G + 1, dtype=torch.int64)
            rows = torch.zeros(T, dtype=torch.int64)
            bias = _empty(G, N, dtype=dtype)
            with _tf32(tf32):
                for p in passes:
                    routed = "routed" in p or "gathered" in p
                    r = rows if routed else None
                    name = f"{label} {p} {prec}"
                    x = _empty(K, T, dtype=dtype).t() if "colmajor" in p else a
                    if p.startswith("fwd"):
                        rec.call(name, bench, grouped_gemm, x, w, offsets, bias=bias if "bias" in p else None,
                                 rows=r, gather_a=routed, scatter_c=routed)
                    elif p.startswith("dx"):
                        rec.call(name, bench, grouped_gemm, dy, w, offsets, rows=r, gather_a=routed,
                                 scatter_c=routed, transpose_w=True)
                    else:
                        rec.call(name, bench, grouped_gemm_dw, dy, x, offsets, rows=r, gathered=routed,
                                 compute_dbias="dbias" in p)


def _norm_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    import torch

    from benchmarks.shapes import MOT_BLOCK_CONFIGS, MOT_GPU_CONFIGS
    from sparsemm_kernels.kernels.triton.norms import modality_norm_bwd, modality_norm_fwd

    def norm(name, bench, x, ids, M, *, is_rms, bias, flags, dtype, dy=None):
        D = x.shape[-1]
        w = _empty(M, D, dtype=dtype)
        b = _empty(M, D, dtype=dtype) if bias else None
        R = x.shape[0] * x.shape[1]
        mean = None if is_rms else torch.empty(R, dtype=torch.float32)
        rstd = torch.empty(R, dtype=torch.float32)
        rec.call(f"{name} fwd", bench, modality_norm_fwd, x, ids, w, b, 1e-5, is_rms=is_rms)
        dy = _empty(*x.shape, dtype=dtype) if dy is None else dy
        for dx, dw in flags:
            rec.call(f"{name} bwd dx={int(dx)} dw={int(dw)}", bench, modality_norm_bwd, dy, x, ids, w, mean, rstd,
                     is_rms=is_rms, compute_dx=dx, compute_dw=dw, compute_db=bias and dw)

    all_flags = ((True, True), (True, False), (False, True))
    cfgs = MOT_GPU_CONFIGS[:1] if quick else MOT_GPU_CONFIGS
    for prec in dtypes:
        if prec == "tf32":
            continue  # no matmul: the same kernels as fp32
        dtype = _dtype(PRECISIONS[prec][0])
        for cname in cfgs:
            c = MOT_BLOCK_CONFIGS[cname]
            T, D, H = c.batch * c.seq, c.dim, c.n_heads
            ids = torch.zeros(T, dtype=torch.int64)
            x = _empty(T, 1, D, dtype=dtype)
            tag = f"MoT {cname} T{T}"
            if quick:
                norm(f"{tag} rms D{D} {prec}", True, x, ids, 2, is_rms=True, bias=False, flags=all_flags[:1],
                     dtype=dtype)
                continue
            for is_rms, bias in ((True, False), (False, True), (False, False)):
                kind = "rms" if is_rms else ("layer+bias" if bias else "layer")
                norm(f"{tag} {kind} D{D} {prec}", True, x, ids, 2, is_rms=is_rms, bias=bias, flags=all_flags,
                     dtype=dtype)
            # Per-head QK-norm on q and k, column slices of the fused qkv projection output.
            dh = D // H
            qkv = _empty(T, 3 * H * dh, dtype=dtype)
            for which, lo in (("q", 0), ("k", H * dh)):
                x3 = qkv[:, lo:lo + H * dh].reshape(T, H, dh)
                norm(f"{tag} qk-norm {which} H{H} d{dh} {prec}", True, x3, ids, 2, is_rms=True, bias=False,
                     flags=all_flags[:2], dtype=dtype, dy=_empty(T, H, dh, dtype=dtype))
        if quick:
            continue
        # Off the tiles and at the launchers' edges (spills there are warnings): odd sizes, int32 ids, many
        # modalities (chunked dW), a strided last dim, rows up to the fused limit.
        ids37 = torch.zeros(37, dtype=torch.int32)
        for label, x, M in (
            ("off-tile T37 D100 M3 ids int32", _empty(37, 1, 100, dtype=dtype), 3),
            ("off-tile T37 H3 D1 M3 ids int32", _empty(37, 3, 1, dtype=dtype), 3),
            ("off-tile T37 D1024 M64 ids int32", _empty(37, 1, 1024, dtype=dtype), 64),
            ("off-tile T37 D96 stride 2", _empty(37, 1, 192, dtype=dtype)[:, :, ::2], 2),
        ):
            for is_rms, bias in ((True, False), (False, True)):
                kind = "rms" if is_rms else "layer+bias"
                norm(f"{label} {kind} {prec}", False, x, ids37, M, is_rms=is_rms, bias=bias, flags=all_flags[:1],
                     dtype=dtype)
        # Rows around and past the one-block widths (forward 16384, backward 4096): the chunked kernels.
        for D in (4096, 8192, 16384, 32768, 65536):
            x = _empty(4096, 1, D, dtype=dtype)
            for is_rms, bias in ((True, False), (False, True)):
                kind = "rms" if is_rms else "layer+bias"
                norm(f"edge T4096 {kind} D{D} {prec}", False, x, torch.zeros(4096, dtype=torch.int64), 2,
                     is_rms=is_rms, bias=bias, flags=all_flags if D in (8192, 65536) else all_flags[:1], dtype=dtype)


def _swiglu_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    from benchmarks.shapes import MOT_BLOCK_CONFIGS, MOT_GPU_CONFIGS
    from sparsemm_kernels.kernels.triton.swiglu import silu_mul_bwd, silu_mul_fwd, swiglu_bwd, swiglu_fwd

    for prec in dtypes:
        if prec == "tf32":
            continue
        dtype = _dtype(PRECISIONS[prec][0])
        cases = []
        for cname in MOT_GPU_CONFIGS[:1] if quick else MOT_GPU_CONFIGS:
            c = MOT_BLOCK_CONFIGS[cname]
            T = c.batch * c.seq
            cases.append((f"MoT {cname} T{T} H{c.hidden}", True, _empty(T, 2 * c.hidden, dtype=dtype)))
        if not quick:
            tiny = MOT_BLOCK_CONFIGS["tiny"]
            cases += [
                (f"MoT tiny H{tiny.hidden}", False, _empty(2, 128, 2 * tiny.hidden, dtype=dtype)),
                ("off-tile T77 H100", False, _empty(77, 200, dtype=dtype)),
                ("off-tile T77 H1", False, _empty(77, 2, dtype=dtype)),
                ("off-tile T77 H96 row stride 200", False, _empty(77, 200, dtype=dtype)[:, :192]),
            ]
        for label, gate_up, bench in ((c[0], c[2], c[1]) for c in cases):
            H = gate_up.shape[-1] // 2
            rec.call(f"{label} fwd {prec}", bench, swiglu_fwd, gate_up)
            rec.call(f"{label} bwd {prec}", bench, swiglu_bwd, gate_up, _empty(*gate_up.shape[:-1], H, dtype=dtype))
            # The MoT FFN's form: gate and up from two GEMMs, two contiguous tensors.
            gate, up = (_empty(*gate_up.shape[:-1], H, dtype=dtype) for _ in range(2))
            rec.call(f"{label} silu_mul fwd {prec}", bench, silu_mul_fwd, gate, up)
            rec.call(f"{label} silu_mul bwd {prec}", bench, silu_mul_bwd, gate, up, _empty(*gate.shape, dtype=dtype))


def _plan_scenarios(rec: Recorder, quick: bool) -> None:
    import torch

    from benchmarks.shapes import GPU, MOT_BLOCK_CONFIGS, MOT_GPU_CONFIGS
    from sparsemm_kernels.kernels.triton.group_plan import group_plan_triton

    cases = {}
    for cname in MOT_GPU_CONFIGS[:1] if quick else MOT_GPU_CONFIGS:
        c = MOT_BLOCK_CONFIGS[cname]
        cases[(c.batch * c.seq, 2, "int64")] = True
    if not quick:
        for s in GPU:
            cases[(s.T, s.G, "int64")] = True
        for n, G, dt in ((1000, 3, "int32"), (77, 1, "int64"), (1, 2, "int64"), (5000, 4096, "int32")):
            cases[(n, G, dt)] = False
    for (n, G, dt), bench in cases.items():
        rec.call(f"n{n} G{G} ids {dt}", bench, group_plan_triton, torch.zeros(n, dtype=getattr(torch, dt)), G)


def _routing_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    import torch

    from sparsemm_kernels.kernels.triton.routing import expert_choice_indices_triton

    # (N tokens, E experts, capacity, mask: None / per token / per token and expert with device limits):
    # MoE-8x and MoMa 4t4i at 435M (seq 4096 x batch 6, capacity factor 1), and small odd shapes.
    cases = [(24576, 8, 3072, "none"), (24576, 8, 3072, "expert")]
    if not quick:
        cases += [(4096, 4, 1024, "token"), (77, 3, 5, "none"), (1, 1, 1, "token")]
    for prec in dtypes:
        if prec == "tf32":
            continue  # no matmul: the same kernel as fp32
        dtype = _dtype(PRECISIONS[prec][0])
        for n, E, C, mask in cases:
            scores = _empty(n, E, dtype=dtype)
            token_mask = {"none": None, "token": torch.zeros(n, dtype=torch.bool),
                          "expert": torch.zeros(n, E, dtype=torch.bool)}[mask]
            limit = torch.zeros(E, dtype=torch.int64) if mask == "expert" else None
            rec.call(f"N{n} E{E} C{C} mask {mask}", not quick and mask == "none" and n > 1000,
                     expert_choice_indices_triton, scores, token_mask, C, limit)


def _mod_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    import torch

    from sparsemm_kernels.kernels.triton.mod_combine import mod_combine_bwd, mod_combine_fwd

    # (tokens T, width D, slots M): MoD at 12.5% around the 443M MoT block (seq 4096 x batch 4), MoMa's 25% at
    # 435M (seq 4096 x batch 6); small odd shapes.
    cases = [(16384, 1024, 2048)]
    if not quick:
        cases += [(24576, 1024, 6144), (77, 40, 9), (1, 8, 1)]
    for prec in dtypes:
        if prec == "tf32":
            continue
        dtype = _dtype(PRECISIONS[prec][0])
        for T, D, M in cases:
            x, y, dout = _empty(T, D, dtype=dtype), _empty(M, D, dtype=dtype), _empty(T, D, dtype=dtype)
            r, slot_of = _empty(M, dtype=dtype), torch.zeros(T, dtype=torch.int64)
            bench = T > 1000
            rec.call(f"T{T} D{D} M{M} fwd", bench, mod_combine_fwd, x, y, r, slot_of)
            rec.call(f"T{T} D{D} M{M} bwd", bench, mod_combine_bwd, dout, x, y, r, slot_of)


def _block_gather_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    import torch

    from sparsemm_kernels.kernels.triton.block_gather import block_wgrad_triton, gather_mm_triton, scatter_mm_triton

    # (tokens N, dim C, d_ff, block g): the Avg-K benchmark (dim 2048, 16384 cells, 2048 active) at g 16 / 64 / 256,
    # a decoding batch; small odd shapes.
    cases = [(16384, 2048, 16384, 64)]
    if not quick:
        cases += [(16384, 2048, 16384, 16), (16384, 2048, 16384, 256), (8, 2048, 16384, 16), (7, 70, 160, 80),
                  (1, 9, 12, 1)]
    for prec in dtypes:
        dt, tf32 = PRECISIONS[prec]
        dtype = _dtype(dt)
        for N, C, d_ff, g in cases:
            n_blocks, k = d_ff // g, max(1, min(d_ff // g, 2048 // g))
            x, w, wt = _empty(N, C, dtype=dtype), _empty(d_ff, C, dtype=dtype), _empty(C, d_ff, dtype=dtype).t()
            h, bias = _empty(N, k, g, dtype=dtype), _empty(d_ff, dtype=dtype)
            blocks, order = torch.zeros(N, k, dtype=torch.int64), torch.zeros(N * k, dtype=torch.int64)
            offsets = torch.zeros(n_blocks + 1, dtype=torch.int64)
            bench, label = N > 1000, f"N{N} C{C} dff{d_ff} g{g}"
            with _tf32(tf32):
                if not tf32:  # the products take no tensor cores: TF32 changes nothing there
                    rec.call(f"{label} gather", bench, gather_mm_triton, x, w, bias, blocks, g)
                    rec.call(f"{label} scatter", bench, scatter_mm_triton, h, wt, blocks, g)
                rec.call(f"{label} wgrad", bench, block_wgrad_triton, h, x, blocks, order, offsets, n_blocks, True)


def _avgk_select_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    from sparsemm_kernels.kernels.triton.avgk_select import avgk_select_triton, max_blocks

    # (tokens, dim, blocks, k): the Avg-K benchmark (dim 2048, 16384 cells, 2048 active) at g 32 (16-bit) / 64 / 256
    # (past max_blocks the GEMM + top-k path runs); odd sizes.
    cases = [(16384, 2048, 512, 64), (16384, 2048, 256, 32)]
    if not quick:
        cases += [(16384, 2048, 64, 8), (70, 33, 200, 7), (1, 8, 1, 1)]
    for prec in dtypes:
        dt, tf32 = PRECISIONS[prec]
        dtype = _dtype(dt)
        for N, D, NB, k in cases:
            if NB > max_blocks(dtype):
                continue
            with _tf32(tf32):
                rec.call(f"N{N} d{D} blocks{NB} k{k}", N > 1000, avgk_select_triton, _empty(N, D, dtype=dtype),
                         _empty(NB, D, dtype=dtype), k)


def _token_topk_scenarios(rec: Recorder, quick: bool, dtypes: list[str]) -> None:
    from sparsemm_kernels.kernels.triton.token_topk import token_choice_plan_triton, token_topk_triton

    # (tokens, experts, k): E8 top-2 and the fine-grained E128 top-8 at 32K tokens; small odd shapes.
    cases = [(32768, 8, 2), (32768, 128, 8)]
    if not quick:
        cases += [(77, 5, 5), (1, 1, 1), (4096, 64, 6)]
    for prec in dtypes:
        if prec == "tf32":
            continue
        for n, E, k in cases:
            rec.call(f"N{n} E{E} k{k}", not quick and n > 1000, token_topk_triton,
                     _empty(n, E, dtype=_dtype(PRECISIONS[prec][0])), k)
        # The fused routing + plan of the pairs (both of its kernels); also at the widest row it takes.
        for n, E, k in cases + ([] if quick else [(100, 4096, 8)]):
            rec.call(f"N{n} E{E} k{k} plan", not quick and n > 1000, token_choice_plan_triton,
                     _empty(n, E, dtype=_dtype(PRECISIONS[prec][0])), k)


@contextlib.contextmanager
def _fixed_gemm_configs(modules: dict) -> Iterator[None]:
    """Within: the GEMM autotuners hold the ``SPARSEMM_AUTOTUNE=0`` config lists (what the GPU tests run)."""
    from sparsemm_kernels.kernels.triton import configs

    gg = modules["sparsemm_kernels.kernels.triton.grouped_gemm"]
    prev = os.environ.get("SPARSEMM_AUTOTUNE")
    os.environ["SPARSEMM_AUTOTUNE"] = "0"
    try:
        lists = {gg._grouped_gemm_kernel: configs.grouped_gemm_configs(),
                 gg._grouped_gemm_dw_kernel: configs.grouped_gemm_dw_configs()}
    finally:
        if prev is None:
            os.environ.pop("SPARSEMM_AUTOTUNE", None)
        else:
            os.environ["SPARSEMM_AUTOTUNE"] = prev
    saved = {t: t.configs for t in lists}
    try:
        for t, cfgs in lists.items():
            t.configs = cfgs
        yield
    finally:
        for t, cfgs in saved.items():
            t.configs = cfgs


def record(archs: list[Arch], quick: bool, include_pruned: bool) -> list[Launch]:
    """Every launch the launchers make for the scenario set, per target arch (full: with the autotune lists
    and with the fixed ``SPARSEMM_AUTOTUNE=0`` configs; quick: the fixed configs only)."""
    modules = _import_kernels()
    rec = Recorder(include_pruned=include_pruned)
    dtypes = ["bf16", "fp32"] if quick else list(PRECISIONS)
    for arch in archs:
        with rec.target(arch, modules):
            _gemm_scenarios(rec, quick, dtypes)
            _norm_scenarios(rec, quick, dtypes)
            _swiglu_scenarios(rec, quick, dtypes)
            _plan_scenarios(rec, quick)
            _routing_scenarios(rec, quick, dtypes)
            _mod_scenarios(rec, quick, dtypes)
            _token_topk_scenarios(rec, quick, dtypes)
            _block_gather_scenarios(rec, quick, dtypes)
            _avgk_select_scenarios(rec, quick, dtypes)
            if not quick:
                with _fixed_gemm_configs(modules):
                    rec.fixed = True
                    try:
                        _gemm_scenarios(rec, quick, dtypes)
                    finally:
                        rec.fixed = False
    return rec.launches


# ---------------------------------------------------------------------------------------------------------------
# Jobs and compilation


def _jsonable(v):
    if isinstance(v, dict):
        return {",".join(map(str, k)) if isinstance(k, tuple) else str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


@dataclass
class Job:
    """One distinct compile: a kernel with one signature / specialisation / option set for one arch."""

    key: str
    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    launches: list[Launch] = field(default_factory=list)
    result: dict | None = None

    def constexpr(self, name: str, default=None):
        names = list(self.signature)
        for path, v in self.constexprs.items():
            if names[path[0]] == name:
                return v
        return default

    @property
    def config(self) -> str:
        names = list(self.signature)
        tiles = {names[p[0]]: v for p, v in self.constexprs.items() if names[p[0]] in CONFIG_KEYS}
        ordered = sorted(tiles.items(), key=lambda kv: CONFIG_KEYS.index(kv[0]))
        parts = [f"{k.replace('BLOCK_', '')}{v}" for k, v in ordered]
        regs = [f"r{self.options['maxnreg']}"] if self.options.get("maxnreg") else []
        return " ".join(parts + [f"w{self.options['num_warps']}", f"s{self.options['num_stages']}"] + regs)

    @property
    def dtype(self) -> str:
        first_ptr = next(v for v in self.signature.values() if v.startswith("*"))
        return first_ptr[1:]

    @property
    def precision(self) -> str:
        """``ieee`` / ``tf32`` for an fp32 dot; ``-`` otherwise (16-bit dots ignore the input precision)."""
        p = self.constexpr("DOT_PRECISION")
        return "-" if p is None or self.dtype != "fp32" else str(p)

    @property
    def uses_dot(self) -> bool:
        return self.constexpr("DOT_PRECISION") is not None

    @property
    def needs_tensor_cores(self) -> bool:
        return self.uses_dot and (self.dtype in ("fp16", "bf16") or self.precision == "tf32")

    @property
    def tile_config(self) -> tuple:
        """The autotune-relevant part: tile constexprs, warps, stages (to match against ``triton.Config``)."""
        names = list(self.signature)
        tiles = tuple(sorted((names[p[0]], v) for p, v in self.constexprs.items() if names[p[0]] in CONFIG_KEYS))
        return tiles, self.options["num_warps"], self.options["num_stages"], self.options.get("maxnreg")

    @property
    def bench(self) -> bool:
        return any(launch.bench and not launch.pruned for launch in self.launches)

    @property
    def pruned(self) -> bool:
        return all(launch.pruned for launch in self.launches)

    @property
    def fixed_only(self) -> bool:
        """Launched only with the ``SPARSEMM_AUTOTUNE=0`` config (not in the autotune lists)."""
        return all(launch.fixed for launch in self.launches)


def make_jobs(launches: list[Launch]) -> list[Job]:
    """Deduplicate launches into compile jobs (identical compiles happen once)."""
    import triton

    jobs: dict[str, Job] = {}
    for la in launches:
        ident = json.dumps(_jsonable([triton.__version__, la.module, la.kernel, la.fn_key, la.arch, la.signature,
                                      sorted((list(k), repr(v)) for k, v in la.constexprs.items()),
                                      sorted((list(k), v) for k, v in la.attrs.items()),
                                      sorted((k, repr(v)) for k, v in la.options.items())]), sort_keys=True)
        key = hashlib.sha256(ident.encode()).hexdigest()[:24]
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = Job(key, la.module, la.kernel, la.arch, la.signature, la.constexprs, la.attrs, la.options)
        job.launches.append(la)
    return list(jobs.values())


_PTXAS_PATTERNS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem_static": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, stack, spills and static shared memory from a ``ptxas -v`` log (0 where not printed)."""
    out = {}
    for name, pat in _PTXAS_PATTERNS.items():
        m = pat.findall(log)
        out[name] = max(map(int, m)) if m else 0
    out["ptxas_log_found"] = bool(_PTXAS_PATTERNS["regs"].search(log))
    return out


def tensor_core_ops(ptx: str) -> str:
    """The tensor-core instruction families in ``ptx``: ``wgmma``, ``mma.sync``, both or ''."""
    found = []
    if re.search(r"^\s*wgmma\.mma_async", ptx, re.M):
        found.append("wgmma")
    if re.search(r"^\s*mma\.sync", ptx, re.M):
        found.append("mma.sync")
    return "+".join(found)


def _jit_function(module: str, name: str):
    """The ``JITFunction`` under module attribute ``name`` (unwrapping ``@autotune`` / ``@heuristics``)."""
    import importlib

    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _ptxas_fallback(ptx: str, cc: int, arch_name: str) -> str:
    """``ptxas -v`` on the PTX with the ptxas Triton picks for ``cc`` (when the compile's own log is missing)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    return r.stderr + r.stdout


def compile_job(job: dict) -> dict:
    """Compile one job (run in a worker process); returns its resource numbers or the error."""
    warnings.filterwarnings("ignore")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: the numbers of the real cubin
    knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
    fn = _jit_function(job["module"], job["kernel"])
    arch_name = "sm_90a" if job["arch"] == 90 else f"sm_{job['arch']}"
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
            k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as exc:  # any compile failure is a finding, reported with its message
        msg = f"{type(exc).__name__}: {exc}"
        return {"error": msg[:4000], "compile_s": round(time.perf_counter() - t0, 2)}
    ptx = k.asm["ptx"]
    log = buf.getvalue()
    res = parse_ptxas(log)
    if not res["ptxas_log_found"]:
        res = parse_ptxas(_ptxas_fallback(ptx, job["arch"], arch_name))
    res.update(
        smem_dynamic=int(k.metadata.shared),
        tensor_cores=tensor_core_ops(ptx),
        num_warps=int(k.metadata.num_warps),
        num_stages=int(getattr(k.metadata, "num_stages", job["options"].get("num_stages", 0))),
        compile_s=round(time.perf_counter() - t0, 2),
        ptx_target=(re.search(r"^\.target\s+(\S+)", ptx, re.M) or [None, "?"])[1],
        ptx_version=(re.search(r"^\.version\s+(\S+)", ptx, re.M) or [None, "?"])[1],
    )
    return res


def _job_payload(job: Job) -> dict:
    return {"module": job.module, "kernel": job.kernel, "arch": job.arch, "signature": job.signature,
            "constexprs": job.constexprs, "attrs": job.attrs, "options": job.options}


def _cost_guess(job: Job) -> float:
    # Long compiles first so the pool's tail is short: fp32 FMA GEMMs, then big tiles.
    tiles = 1
    for k in ("BLOCK_M", "BLOCK_J", "BLOCK_N", "BLOCK_K", "BLOCK_D"):
        tiles *= int(job.constexpr(k, 1) or 1)
    return (10.0 if job.precision == "ieee" else 1.0) * (tiles if job.uses_dot else 1)


def compile_all(jobs: list[Job], n_workers: int, cache_dir: Path | None, progress: bool = True) -> dict:
    """Fill ``job.result`` for every job, from the cache or by compiling; returns counts."""
    import triton

    todo = []
    hits = 0
    for job in jobs:
        path = cache_dir / f"{job.key}.json" if cache_dir else None
        if path is not None and path.exists():
            try:
                job.result = json.loads(path.read_text())
                hits += 1
                continue
            except (OSError, ValueError):
                pass
        todo.append(job)
    todo.sort(key=_cost_guess, reverse=True)
    tmp_cache = tempfile.mkdtemp(prefix="aot-triton-cache-")
    prev = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tmp_cache  # workers inherit it: no writes to ~/.triton, no races
    t0 = time.perf_counter()
    try:
        if todo:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=max(1, n_workers), mp_context=ctx) as pool:
                futures = {pool.submit(compile_job, _job_payload(j)): j for j in todo}
                for i, fut in enumerate(as_completed(futures), 1):
                    job = futures[fut]
                    try:
                        job.result = fut.result()
                    except Exception as exc:  # a crashed worker is a failed compile too
                        job.result = {"error": f"worker failed: {type(exc).__name__}: {exc}"}
                    job.result["triton"] = triton.__version__
                    if cache_dir and "error" not in job.result:
                        cache_dir.mkdir(parents=True, exist_ok=True)
                        (cache_dir / f"{job.key}.json").write_text(json.dumps(job.result))
                    if progress:
                        r = job.result
                        what = (f"ERROR {r['error'][:120]}" if "error" in r else
                                f"regs {r['regs']} spills {r['spill_stores']}/{r['spill_loads']} "
                                f"smem {r['smem_dynamic']} tc {r['tensor_cores'] or '-'}")
                        print(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] sm_{job.arch} {job.kernel} "
                              f"{job.dtype} {job.precision} {job.config}: {r.get('compile_s', 0):.1f}s {what}",
                              flush=True)
    finally:
        shutil.rmtree(tmp_cache, ignore_errors=True)
        if prev is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = prev
    return {"jobs": len(jobs), "cached": hits, "compiled": len(todo),
            "compile_wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Checks


def check(job: Job, arch: Arch) -> tuple[list[str], list[str]]:
    """``(failures, warnings)`` of one compiled job against its arch and its launches."""
    r = job.result or {"error": "not compiled"}
    fails: list[str] = []
    warns: list[str] = []
    if "error" in r:
        return [f"compile error: {r['error'].splitlines()[0][:200]}"], warns
    threads = r["num_warps"] * 32
    smem = r["smem_dynamic"] + r["smem_static"]
    if smem > arch.smem_limit:
        fails.append(f"shared memory {smem} B > {arch.smem_limit} B")
    if threads > MAX_THREADS_PER_BLOCK:
        fails.append(f"{threads} threads > {MAX_THREADS_PER_BLOCK}")
    if r["regs"] * threads > REGISTERS_PER_SM or r["regs"] > MAX_REGISTERS_PER_THREAD:
        fails.append(f"{r['regs']} registers x {threads} threads > {REGISTERS_PER_SM}")
    for la in job.launches:
        over = [i for i in range(3) if la.grid[i] > MAX_GRID[i]]
        if over:
            fails.append(f"grid {la.grid} over the axis limit ({la.scenario})")
            break
    if job.needs_tensor_cores and not r["tensor_cores"]:
        fails.append(f"no tensor-core instructions in a {job.dtype} {job.precision} dot")
    if r["spill_stores"] + r["spill_loads"]:
        if job.bench:
            fails.append(f"spills {r['spill_stores']}/{r['spill_loads']} B at a benchmarks/shapes.py shape")
        else:
            warns.append("spills at off-benchmark shapes")
    if job.pruned:  # compiled for the record only: the autotuner never picks it on this arch
        return [], [f"pruned (not choosable): {'; '.join(fails + warns) or 'would fit'}"]
    return fails, warns


def config_choice(jobs: list[Job], archs: dict[int, Arch], dtypes: list[str]) -> tuple[list[dict], list[str]]:
    """Per GEMM kernel x operand class x arch: the configs ``configs.choosable_configs`` allows, the ones pruned,
    and whether the recorded launches used exactly the allowed ones (the autotuner's pruning went through it)."""
    import torch

    from sparsemm_kernels.kernels.triton import configs
    from sparsemm_kernels.kernels.triton.grouped_gemm import _grouped_gemm_dw_kernel, _grouped_gemm_kernel

    kernels = {"fwd": ("_grouped_gemm_kernel", _grouped_gemm_kernel.configs),
               "dw": ("_grouped_gemm_dw_kernel", _grouped_gemm_dw_kernel.configs)}
    as_tile = lambda c: (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, c.maxnreg)  # noqa: E731
    label = lambda c: " ".join([f"{k.replace('BLOCK_', '')}{v}" for k, v in c.kwargs.items()]  # noqa: E731
                               + [f"w{c.num_warps}", f"s{c.num_stages}"] + ([f"r{c.maxnreg}"] if c.maxnreg else []))
    rows, fails = [], []
    for kind, (kname, tuned) in kernels.items():
        for prec in dtypes:
            dt, tf32 = PRECISIONS[prec]
            dtype = getattr(torch, dt)
            dot_prec = "tf32" if (tf32 or dtype != torch.float32) else "ieee"
            job_dtype = "fp32" if prec == "tf32" else prec
            job_prec = ("tf32" if tf32 else "ieee") if dt == "float32" else "-"
            for arch in archs.values():
                est = lambda c: configs.gemm_shared_memory(c, kind, dtype, dot_prec, arch.capability) // 1024  # noqa: E731,B023
                ours = [j for j in jobs if j.kernel == kname and j.arch == arch.cc
                        and any(not la.pruned and not la.fixed for la in j.launches)
                        and j.dtype == job_dtype and j.precision == job_prec]
                # Launches with 16-divisible sizes and strides, and the others; regular and each narrow kind.
                kinds = sorted({(bool(j.constexpr("ALIGNED", True)), int(j.constexpr("NARROW", 0))) for j in ours},
                               reverse=True)
                for aligned, narrow in kinds:
                    chosen = configs.choosable_configs(tuned, kind, dtype, dot_prec, arch.capability, aligned=aligned,
                                                       narrow=narrow)
                    recorded = {j.tile_config for j in ours if bool(j.constexpr("ALIGNED", True)) == aligned
                                and int(j.constexpr("NARROW", 0)) == narrow}
                    ok = recorded == {as_tile(c) for c in chosen}
                    what = ("" if aligned else " unaligned") + (f" narrow{narrow}" if narrow else "")
                    if not ok:
                        fails.append(f"{arch.name} {kname} {prec}{what}: launches used {sorted(recorded)}, "
                                     f"configs.choosable_configs allows {[label(c) for c in chosen]}")
                    pruned = [c for c in tuned if c not in chosen]
                    rows.append(dict(
                        kernel=kname.lstrip("_"), dtype=prec + what, arch=arch.name, matches=ok,
                        choosable=[f"{label(c)} ({est(c)} KB)" for c in chosen],
                        pruned=[f"{label(c)} ({est(c)} KB)" for c in pruned],
                    ))
    return rows, fails


# ---------------------------------------------------------------------------------------------------------------
# Report


def _kb(b: int) -> str:
    return f"{b / 1024:.1f}"


def build_rows(jobs: list[Job], archs: dict[int, Arch]) -> list[dict]:
    """One row per kernel x dtype x precision x config x arch (worst case over its specialisations)."""
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in jobs:
        config = job.config + (" (fixed)" if job.fixed_only and job.launches[0].module.endswith("grouped_gemm")
                               else "")
        groups[(job.kernel, job.dtype, job.precision, config, job.arch, job.pruned)].append(job)
    rows = []
    for (kernel, dtype, prec, config, cc, pruned), js in groups.items():
        arch = archs[cc]
        fails, warns = [], []
        for j in js:
            f, w = check(j, arch)
            fails += [x for x in f if x not in fails]
            warns += [x for x in w if x not in warns]
        ok = [j.result for j in js if j.result and "error" not in j.result]

        def mx(k, ok=ok):
            return max((r[k] for r in ok), default=None)

        def spills(bench, js=js):
            sel = [j.result for j in js if j.bench == bench and j.result and "error" not in j.result]
            if not sel:
                return "-"
            return f"{max(r['spill_stores'] for r in sel)}/{max(r['spill_loads'] for r in sel)}"

        if "spills at off-benchmark shapes" in warns:
            worst = [j for j in js if not j.bench and j.result and j.result.get("spill_stores")]
            worst = max(worst, key=lambda j: j.result["spill_stores"])
            warns[warns.index("spills at off-benchmark shapes")] = (
                f"spills at off-benchmark shapes (worst {worst.result['spill_stores']}/"
                f"{worst.result['spill_loads']} B: {worst.launches[0].scenario})")

        smem = max((r["smem_dynamic"] + r["smem_static"] for r in ok), default=None)
        tcs = sorted({r["tensor_cores"] or "none" for r in ok}) if any(j.uses_dot for j in js) else ["-"]
        verdict = ("FAIL: " + "; ".join(fails)) if fails else (("warn: " + "; ".join(warns)) if warns else "ok")
        rows.append(dict(
            kernel=kernel.lstrip("_"), dtype=dtype, precision=prec, config=config, arch=arch.name,
            variants=len(js), launches=sum(len(j.launches) for j in js), bench=any(j.bench for j in js),
            regs=mx("regs"), spill_stores=mx("spill_stores"), spill_loads=mx("spill_loads"), smem=smem,
            spills_bench=spills(True), spills_other=spills(False),
            limit=arch.smem_limit, tensor_cores="/".join(tcs),
            compile_s=round(sum(r.get("compile_s", 0) for r in ok), 1),
            verdict=verdict, failed=bool(fails), pruned=pruned,
        ))
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["precision"], r["pruned"], r["config"]))
    return rows


def write_report(out_dir: Path, stem: str, header: dict, rows: list[dict], jobs: list[Job], archs,
                 choice: list[dict]) -> tuple[Path, Path]:
    """``<stem>.md`` (the table) and ``<stem>.json`` (every job with its launches and numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# AOT compile: every Triton kernel for {', '.join(a.name for a in archs.values())} "
          f"(triton {header['triton']})", ""]
    md += [f"- {k}: {v}" for k, v in header.items() if k not in ("failures",)]
    md += ["", "Each row: one kernel x dtype x precision x tile config x arch; numbers are the worst case over its "
           "`variants` (distinct specialisations: modes, strides, divisibility) and `launches` (recorded calls). "
           "spills = bytes spill stores / loads per thread (ptxas), worst over the variants launched for a shape of "
           "benchmarks/shapes.py or its model configs (`bench`: spills fail there) and over the others (off the "
           "tiles, edge sizes: spills warn); smem = dynamic + static shared memory per block; limit = the arch's "
           "per-block maximum; tensor cores = instruction family in the PTX; `(fixed)`: the SPARSEMM_AUTOTUNE=0 "
           "config (the GPU test suite's). Compiled, never run: no GPU time here.",
           ""]
    cols = ["kernel", "dtype", "precision", "config", "arch", "variants", "launches", "regs", "spills bench (B)",
            "spills other (B)", "smem (KB)", "limit (KB)", "tensor cores", "verdict"]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(str(x) for x in [
            r["kernel"], r["dtype"], r["precision"], r["config"], r["arch"], r["variants"], r["launches"],
            "-" if r["regs"] is None else r["regs"], r["spills_bench"], r["spills_other"],
            "-" if r["smem"] is None else _kb(r["smem"]), _kb(r["limit"]), r["tensor_cores"], r["verdict"],
        ]) + " |")
    md += ["", "## Config choice per arch (GEMM autotune lists after `configs.choosable_configs`)", "",
           "Estimated shared memory in brackets (`configs.gemm_shared_memory`); the table above has the compiled "
           "numbers. `pruned`: in the autotune list but never chosen for this dtype on this arch (another operand "
           "class's tiles, or over the arch's shared memory).", "",
           "| kernel | dtype | arch | choosable | pruned | launches used exactly these |", "|---|---|---|---|---|---|"]
    for c in choice:
        md.append(f"| {c['kernel']} | {c['dtype']} | {c['arch']} | {'<br>'.join(c['choosable'])} | "
                  f"{'<br>'.join(c['pruned']) or '-'} | {'yes' if c['matches'] else 'NO'} |")
    failures = header.get("failures", [])
    md += ["", f"## Failures ({len(failures)})", ""]
    md += [f"- {f}" for f in failures] or ["none"]
    md.append("")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(md))
    payload = {
        "header": header,
        "rows": rows,
        "config_choice": choice,
        "jobs": [{
            "key": j.key, "kernel": j.kernel, "module": j.module, "arch": archs[j.arch].name, "dtype": j.dtype,
            "precision": j.precision, "config": j.config, "signature": j.signature,
            "constexprs": _jsonable({f"{list(j.signature)[p[0]]}": v for p, v in j.constexprs.items()}),
            "attrs": _jsonable({f"{list(j.signature)[p[0]]}": v for p, v in j.attrs.items() if v}),
            "num_warps": j.options.get("num_warps"), "num_stages": j.options.get("num_stages"),
            "result": j.result, "verdict": check(j, archs[j.arch]),
            "launches": [{"scenario": la.scenario, "bench": la.bench, "grid": la.grid, "pruned": la.pruned}
                         for la in j.launches],
        } for j in jobs],
    }
    js_path = out_dir / f"{stem}.json"
    js_path.write_text(json.dumps(payload, separators=(",", ":")))
    return md_path, js_path


def _ptxas_versions(archs) -> str:
    try:
        from triton.backends.nvidia import compiler as nv

        return ", ".join(f"{a.name}: {getattr(nv.get_ptxas(a.cc), 'version', '?')}" for a in archs.values())
    except Exception as exc:  # informational only
        return f"unknown ({exc!r})"


def prepare_environment(quick: bool) -> None:
    """Real GPU code paths: no interpreter; the autotuner's config lists (full) or the fixed configs (quick)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["SPARSEMM_AUTOTUNE"] = "0" if quick else "1"
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def main(argv: list[str] | None = None) -> int:
    """Record, compile, check and write the table; returns 1 when any check fails."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fixed configs, bf16 + fp32, one shape per kernel (CI)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    p.add_argument("--archs", default="80,90", help="compute capabilities to compile for (default 80,90)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the .md/.json table")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="result cache folder (default .aot-cache/)")
    p.add_argument("--no-cache", action="store_true", help="compile everything afresh")
    p.add_argument("--include-pruned", action="store_true",
                   help="also compile the configs the autotuner prunes on an arch (reported, never failing)")
    p.add_argument("--list", action="store_true", help="record and list the compile jobs; compile nothing")
    p.add_argument("--kernels", default="", help="only kernels whose name contains one of these (comma-separated)")
    args = p.parse_args(argv)
    prepare_environment(args.quick)
    t0 = time.perf_counter()
    import torch
    import triton

    all_archs = _archs()
    archs = {int(c): all_archs[int(c)] for c in args.archs.split(",")}
    launches = record(list(archs.values()), args.quick, args.include_pruned)
    if args.kernels:
        wanted = [k for k in args.kernels.split(",") if k]
        launches = [la for la in launches if any(w in la.kernel for w in wanted)]
    jobs = make_jobs(launches)
    record_s = round(time.perf_counter() - t0, 1)
    print(f"recorded {len(launches)} launches -> {len(jobs)} distinct compile jobs in {record_s}s", flush=True)
    if args.list:
        for j in sorted(jobs, key=lambda j: (j.kernel, j.arch, j.dtype, j.precision, j.config)):
            print(f"sm_{j.arch} {j.kernel} {j.dtype} {j.precision} {j.config} launches={len(j.launches)}"
                  f"{' pruned' if j.pruned else ''}")
        return 0
    stats = compile_all(jobs, args.jobs, None if args.no_cache else args.cache)
    failures = []
    for j in jobs:
        for f in check(j, archs[j.arch])[0]:
            failures.append(f"{archs[j.arch].name} {j.kernel} {j.dtype} {j.precision} {j.config}: {f} "
                            f"(e.g. {j.launches[0].scenario})")
    choice, choice_fails = config_choice(jobs, archs, ["bf16", "fp32"] if args.quick else list(PRECISIONS))
    failures = sorted(set(failures)) + choice_fails
    rows = build_rows(jobs, archs)
    header = {
        "triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "triton versions checked by make aot": " and ".join(TESTED_TRITON),
        "mode": "quick (fixed configs, SPARSEMM_AUTOTUNE=0)" if args.quick else "full (autotune configs)",
        "archs": ", ".join(f"{a.name} ({a.gpu}, {a.sms} SMs, smem limit {a.smem_limit} B)" for a in archs.values()),
        "ptxas": _ptxas_versions(archs), "launches recorded": len(launches),
        "compile jobs": stats["jobs"], "compiled now": stats["compiled"], "from cache": stats["cached"],
        "wall time (s)": round(time.perf_counter() - t0, 1), "workers": args.jobs,
        "compile time, all jobs (s, one core)": round(sum((j.result or {}).get("compile_s", 0) for j in jobs), 1),
        "failures": failures,
    }
    stem = f"aot-{triton.__version__}" + ("-quick" if args.quick else "")
    md_path, js_path = write_report(args.out, stem, header, rows, jobs, archs, choice)
    print(f"\n{len(rows)} rows, {len(failures)} failures; wall {header['wall time (s)']}s -> {md_path}, {js_path}")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
