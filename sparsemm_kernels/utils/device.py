"""Lazy device facts. Nothing here touches a GPU at import time (CPU-only machines must import cleanly)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def is_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch lets float32 matmuls use TF32 on CUDA: the ``fp32_precision`` settings where torch has them
    (``torch.backends.cuda.matmul.fp32_precision``, else the global ``torch.backends.fp32_precision``), else the
    legacy ``allow_tf32`` flag. Reading the legacy flag after the new API was used raises in torch, so it is only
    read where the new settings do not exist."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:
            return bool(matmul.allow_tf32)
        if precision == "none":  # inherits the global setting
            precision = getattr(torch.backends, "fp32_precision", "none")
        return precision == "tf32"
    except RuntimeError:
        return False


#: The Triton versions the kernels are compiled and checked with (``make aot``: the oldest and the newest);
#: an installed Triton outside it leaves the triton backend unavailable, with the reason.
TRITON_SUPPORTED = ((3, 6), (3, 9))


@functools.cache
def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version_problem() -> str | None:
    """Why the installed Triton is outside :data:`TRITON_SUPPORTED` (None when it is inside, or absent)."""
    if not has_triton():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("triton")
    except PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    found = tuple(parts + [0] * (2 - len(parts)))
    lo, hi = TRITON_SUPPORTED
    if lo <= found <= hi:
        return None
    return (f"triton {text} is outside the supported range {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} (the versions the "
            "kernels are compiled and checked with)")


def has_cuda() -> bool:
    """True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


@functools.cache
def capability(index: int = 0) -> tuple[int, int]:
    """Compute capability of CUDA device ``index``, looked up once and cached."""
    return torch.cuda.get_device_capability(index)


def on_first_tensor_device(launcher):
    """Run a kernel launcher with its first tensor argument's CUDA device current.

    Triton launches on the *current* device, so a tensor on ``cuda:1`` while ``cuda:0`` is current would
    otherwise run on the wrong GPU.
    """

    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)

    return wrapped


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """A one-element tensor on ``t``'s device, passed for a pointer argument a kernel mode never reads
    (no bias, no row index): kernels take a tensor for every pointer slot."""
    return t.new_empty(1)
