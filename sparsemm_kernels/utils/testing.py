"""Helpers for tests, fuzzing and benchmarks: random group layouts, tolerances, verbose comparisons."""

from __future__ import annotations

import torch

# Max error allowed relative to the largest reference magnitude, per input dtype. fp32 is checked without
# TF32; fp16/bf16 inputs are rounded before the reference sees them, so only accumulation and the final
# rounding of the output count.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def offsets_from_counts(counts, device="cpu") -> torch.Tensor:
    """``(G+1,) int64`` cumulative offsets for a list of group sizes."""
    c = torch.as_tensor(list(counts), dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)]).to(device)


def ids_from_counts(counts, *, shuffle: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Group ids with ``counts[g]`` rows of group ``g``, grouped (``shuffle=False``) or interleaved at random."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(list(counts), dtype=torch.int64))
    if shuffle and ids.numel():
        ids = ids[torch.randperm(ids.numel(), generator=generator)]
    return ids


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` within ``REL_TOL[dtype] * max|expected|`` of ``expected`` everywhere, and finite.

    On failure the message lists the worst elements with their indices.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite values (unwritten or poisoned output?) at {bad}")
    scale = max(e.abs().max().item(), 1e-3)
    err = (a - e).abs()
    tol = REL_TOL[dtype] * scale
    if err.max().item() > tol:
        worst = err.flatten().topk(min(5, err.numel())).indices
        idx = [tuple(int(i) for i in torch.unravel_index(w, err.shape)) for w in worst]
        rows = ", ".join(f"{i}: got {a[i].item():.6g} want {e[i].item():.6g}" for i in idx)
        raise AssertionError(f"{what}: max error {err.max().item():.3g} > tol {tol:.3g} (dtype {dtype}); worst {rows}")
