"""Access to the optional native extension ``sparsemm_kernels._C``.

The extension is built by ``pip install --no-build-isolation -e .`` (C++ CPU ops always, CUDA ops when nvcc
was found). Nothing here raises when it is missing: :func:`load` returns ``None`` and
:func:`unavailable_reason` says why, so ``import sparsemm_kernels`` works on any install. This module
imports nothing from the rest of the package (everything else imports it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Element-type codes crossing the C boundary; mirror of csrc/include/sparsemm/common.h (enum DType).
DTYPE_FLOAT32 = 0
DTYPE_FLOAT64 = 1
DTYPE_FLOAT16 = 2
DTYPE_BFLOAT16 = 3
DTYPE_INT32 = 4
DTYPE_INT64 = 5

_DTYPE_CODES = {
    torch.float32: DTYPE_FLOAT32,
    torch.float64: DTYPE_FLOAT64,
    torch.float16: DTYPE_FLOAT16,
    torch.bfloat16: DTYPE_BFLOAT16,
    torch.int32: DTYPE_INT32,
    torch.int64: DTYPE_INT64,
}

# Must equal sparsemm::kAbiVersion in common.h; a mismatch means _C was built from older sources.
ABI_VERSION = 7

_NOT_BUILT = "sparsemm_kernels._C is not built: run `pip install --no-build-isolation -e .`"

_state: dict[str, object] = {}


def load() -> ModuleType | None:
    """The ``sparsemm_kernels._C`` module, or ``None`` if it cannot be imported (cached after the first call)."""
    if "module" not in _state:
        module, reason = None, ""
        try:
            module = importlib.import_module("sparsemm_kernels._C")
        except ModuleNotFoundError as exc:
            reason = _NOT_BUILT if exc.name == "sparsemm_kernels._C" else f"{_NOT_BUILT} ({exc})"
        except ImportError as exc:
            reason = f"sparsemm_kernels._C failed to import: {exc}"
        if module is not None and getattr(module, "ABI_VERSION", None) != ABI_VERSION:
            reason = (
                f"sparsemm_kernels._C is stale (ABI {getattr(module, 'ABI_VERSION', None)}, sources expect "
                f"{ABI_VERSION}): rebuild with `pip install --no-build-isolation -e .`"
            )
            module = None
        _state["module"], _state["reason"] = module, reason
    return _state["module"]  # type: ignore[return-value]


def is_available() -> bool:
    """True when ``sparsemm_kernels._C`` imports (its C++ CPU ops are then usable)."""
    return load() is not None


def has_cuda_ops() -> bool:
    """True when ``_C`` imports and was built with its CUDA kernels (says nothing about a GPU being present)."""
    module = load()
    return module is not None and bool(module.has_cuda())


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty string when the extension is available)."""
    load()
    return str(_state["reason"])


def require() -> ModuleType:
    """The extension module, or ``RuntimeError`` carrying :func:`unavailable_reason`."""
    module = load()
    if module is None:
        raise RuntimeError(unavailable_reason())
    return module


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code for ``dtype`` (``TypeError`` for dtypes it has no code for)."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"no sparsemm_kernels._C dtype code for {dtype}") from None
