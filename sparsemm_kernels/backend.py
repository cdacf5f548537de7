"""Which implementation runs an op: the backend registry.

Backends:

* ``cuda``   - the extension's CUDA kernels (``sparsemm_kernels._C`` built with nvcc); CUDA tensors.
* ``triton`` - Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (slow, for tests).
* ``cpu``    - the extension's C++ kernels; CPU tensors.
* ``torch``  - plain PyTorch (``sparsemm_kernels.reference``): any device, any float dtype including
  float64. It is the reference every kernel is tested against and the fallback.

Rules:

* automatic selection (``backend=None`` or ``"auto"``) walks the op's priority list for the tensors' device
  and silently takes the first backend that can run;
* a backend named in an op's ``backend=`` argument is **strict**: it runs or raises
  :class:`BackendUnavailableError` listing every reason it cannot;
* a **preference** (``"prefer:NAME"``, what a module's ``backend=`` argument and the ``SPARSEMM_BACKEND``
  environment variable give) runs ``NAME`` where it can and falls back to automatic selection where it
  cannot, so that ``MoTTransformer(..., backend="cpu")`` runs its norms on another backend when ``cpu`` has
  none.

To add a backend: give it a ``_reasons_*`` function, add it to ``_PRIORITY`` of the ops it implements, and
dispatch to it in the op's file.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from sparsemm_kernels import _ext
from sparsemm_kernels.utils.device import has_triton, is_interpreting, triton_version_problem

BACKENDS = ("cuda", "triton", "cpu", "torch")

# Per op and device type: the backends in the order automatic selection tries them (fastest first).
# Triton on CPU is the interpreter: correct but slow, so it is never chosen automatically there.
_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {
    "group_plan": {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")},
    "grouped_mm": {"cuda": ("triton", "torch"), "cpu": ("torch", "cpu")},
    "modality_norm": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "swiglu": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "mod_combine": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "block_gather": {"cuda": ("triton", "torch"), "cpu": ("torch",)},
    "avgk_select": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "token_choice_route": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "expert_choice_route": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
}
_ALL_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "group_plan": ("cuda", "triton", "cpu", "torch"),
    "grouped_mm": ("triton", "cpu", "torch"),
    "modality_norm": ("triton", "cpu", "torch"),
    "swiglu": ("triton", "cpu", "torch"),
    "mod_combine": ("triton", "torch"),
    "block_gather": ("triton", "torch"),
    "avgk_select": ("triton", "cpu", "torch"),
    "token_choice_route": ("triton", "cpu", "torch"),
    "expert_choice_route": ("triton", "cpu", "torch"),
}
_STRICT = frozenset(BACKENDS)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_GEMM_DTYPES = (torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given inputs; the message says why."""


def _reasons_triton(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if not has_triton():
        reasons.append("the `triton` package is not installed")
    elif triton_version_problem():
        reasons.append(triton_version_problem())
    if device.type == "cpu" and not is_interpreting():
        reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"triton does not run on {device.type} tensors")
    elif device.type == "cuda" and torch.version.hip:
        reasons.append("the triton kernels are tuned and checked for NVIDIA GPUs; this torch is built for ROCm")
    if op != "group_plan" and dtype not in _TRITON_DTYPES:
        reasons.append(f"the triton {op} kernels support float16, bfloat16 and float32, not {dtype}")
    return reasons


def _reasons_cuda(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if not _ext.is_available():
        reasons.append(_ext.unavailable_reason())
    elif not _ext.has_cuda_ops():
        reasons.append("sparsemm_kernels._C was built without CUDA kernels (no nvcc at build time)")
    if device.type != "cuda":
        reasons.append(f"the cuda backend needs CUDA tensors, got {device.type}")
    return reasons


def _reasons_cpu(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if not _ext.is_available():
        reasons.append(_ext.unavailable_reason())
    if device.type != "cpu":
        reasons.append(f"the cpu backend needs CPU tensors, got {device.type}")
    if op == "grouped_mm" and dtype not in _CPU_GEMM_DTYPES:
        reasons.append(f"the C++ grouped GEMM supports float32 and float64, not {dtype}")
    if op in ("modality_norm", "swiglu") and dtype not in _CPU_GEMM_DTYPES:
        reasons.append(f"the C++ {op} kernels support float32 and float64, not {dtype}")
    return reasons


_REASONS = {
    "cuda": _reasons_cuda,
    "triton": _reasons_triton,
    "cpu": _reasons_cpu,
    "torch": lambda op, device, dtype: [],
}


def unsupported_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device``/``dtype`` (empty when it can)."""
    if backend not in _ALL_IMPLEMENTED[op]:
        return [f"`{op}` has no {backend} implementation (implemented: {', '.join(_ALL_IMPLEMENTED[op])})"]
    return _REASONS[backend](op, device, dtype)


def available_backends(op: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """The backends that can run ``op`` here, in automatic-selection order then the rest."""
    device = torch.device(device)
    order = list(_PRIORITY[op].get(device.type, ("torch",)))
    order += [b for b in _ALL_IMPLEMENTED[op] if b not in order]
    return [b for b in order if not unsupported_reasons(op, b, device, dtype)]


_PREFER = "prefer:"


def prefer(name: str | None) -> str | None:
    """The preference form of a backend name (``None``/``"auto"`` stay automatic); see the module rules."""
    name = check_backend_name(name)
    if name in (None, "auto") or name.startswith(_PREFER):
        return name
    return _PREFER + name


def check_backend_name(requested) -> str | None:
    """``requested`` itself if it names a backend (``None``, ``"auto"``, a backend, ``"prefer:"`` + one)."""
    if requested is None:
        return None
    if not isinstance(requested, str):
        raise TypeError(f"`backend` must be a string, got {type(requested).__name__}")
    name = requested[len(_PREFER):] if requested.startswith(_PREFER) else requested
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"`backend` must be one of {', '.join(BACKENDS)}, 'auto' or 'prefer:<name>', got {requested!r}"
        )
    return requested


def _auto(op: str, device: torch.device, dtype: torch.dtype) -> str:
    for name in _PRIORITY[op].get(device.type, ("torch",)):
        if not unsupported_reasons(op, name, device, dtype):
            if name == "torch" and device.type == "cuda" and dtype in _TRITON_DTYPES:
                # Not the dtype: the GPU kernels are missing here. Said once per op and dtype (selection is cached).
                warnings.warn(
                    f"sparsemm_kernels: {op} on CUDA {dtype} runs the torch fallback (host-side loops, far slower): "
                    + "; ".join(unsupported_reasons(op, "triton", device, dtype)),
                    RuntimeWarning, stacklevel=4,
                )
            return name
    return "torch"


def select_backend(op: str, device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """Pick the backend for one call of ``op``.

    ``requested`` (the op's ``backend=`` argument: a name is strict, ``"prefer:NAME"`` a preference) wins
    over the ``SPARSEMM_BACKEND`` environment variable (a preference); ``None`` or ``"auto"`` means
    automatic selection.
    """
    # Every op call asks; the answer depends only on these (and on what is installed, fixed per process).
    if requested in _STRICT:  # a backend named outright: the environment does not enter (and is not read)
        return _select_cached(op, device.type, dtype, requested, "", requested == "triton" and is_interpreting())
    env = os.environ.get("SPARSEMM_BACKEND", "")
    return _select_cached(op, device.type, dtype, check_backend_name(requested), env, is_interpreting())


def resolve_backend(op: str, x: torch.Tensor, requested: str | None) -> str | None:
    """The backend an eager call of ``op`` on ``x`` runs, as a strict name, for a public function to hand to its
    op: the op's own selections (forward and backward) then neither re-walk the priorities nor read the
    environment. Under ``torch.compile`` the request itself, resolved when the op runs."""
    if torch.compiler.is_compiling():
        return requested
    return select_backend(op, x.device, x.dtype, requested)


@functools.lru_cache(maxsize=1024)
def _select_cached(op: str, device_type: str, dtype: torch.dtype, requested, env: str, interpreting: bool) -> str:
    return _select(op, torch.device(device_type), dtype, requested, env)


def _select(op: str, device: torch.device, dtype: torch.dtype, requested: str | None, env: str) -> str:
    requested = check_backend_name(requested)
    if requested in (None, "auto"):
        if requested is None and env and env != "auto":
            try:
                requested = prefer(env)
            except ValueError:
                raise ValueError(
                    f"SPARSEMM_BACKEND must name one of {', '.join(BACKENDS)} or 'auto', got {env!r}"
                ) from None
        else:
            return _auto(op, device, dtype)
    if requested.startswith(_PREFER):
        name = requested[len(_PREFER):]
        if name == "auto" or unsupported_reasons(op, name, device, dtype):
            return _auto(op, device, dtype)
        return name
    reasons = unsupported_reasons(op, requested, device, dtype)
    if reasons:
        raise BackendUnavailableError(
            f"backend {requested!r} cannot run {op} on {device.type} {dtype}: " + "; ".join(reasons)
        )
    return requested
