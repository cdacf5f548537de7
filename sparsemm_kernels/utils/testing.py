"""Helpers for tests, fuzzing and benchmarks: random group layouts, per-element tolerances, verbose comparisons.

Tolerance model, checked element by element::

    |got - want| <= rtol * |want| + atol * scale + floor

* ``rtol * |want|`` is the rounding of the result to its dtype (a kernel that accumulates in float32 and rounds
  once is off by at most half an ulp of the result: ``0.5 * eps(dtype) * |want|``);
* ``atol * scale`` is the accumulation error: ``scale`` is, per element, the magnitude of what was summed to
  make it. For a dot product ``sum_k x_k w_k`` it is ``sum_k |x_k w_k|`` (``|x| @ |w|^T`` in float64): a
  float32 sum of ``K`` terms is off by a small multiple of ``eps(float32) * sum_k |x_k w_k|``, however much
  the terms cancel. Tests compute ``scale`` by running their float64 reference on ``|inputs|``;
* ``floor`` (usually 0) is an absolute allowance, e.g. for results in the dtype's subnormal range.

A bound relative to the *largest* reference value (what this module did before) lets an error in a small
element through; this one does not. Each test module keeps a table of ``Tol`` per op and dtype, each entry
about 3x the error measured on that op, with the measurement in a comment. To re-measure, run the tests with
``SPARSEMM_TOL_LOG=/path/file.jsonl``: every comparison appends its worst ``error / bound`` ratio (1.0 = at the
limit), the test's id and the worst element; ``python -m tests.tol_report file.jsonl`` summarises it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

# The old bound, relative to the largest reference value (see assert_close_verbose with neither tol nor scale).
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Machine epsilon (the ulp of 1.0) per dtype.
EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
EPS32 = EPS[torch.float32]


@dataclass(frozen=True)
class Tol:
    """Per-element bound ``rtol * |want| + atol * scale + floor`` (see the module docstring)."""

    rtol: float
    atol: float
    floor: float = 0.0

    def __str__(self) -> str:
        return f"rtol={self.rtol:.3g} atol={self.atol:.3g}" + (f" floor={self.floor:.3g}" if self.floor else "")


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


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, scale=None) -> torch.Tensor:
    """Per element ``|actual - expected| / (tol.rtol * |expected| + tol.atol * scale + tol.floor)`` (float64, CPU).

    ``scale``: a tensor broadcastable to ``expected`` (the per-element magnitude of the summed terms), or
    None for the root mean square of ``expected`` (one number: for compound computations with no natural
    per-element scale).
    """
    a, e = _as64(actual), _as64(expected)
    s = _as64(scale) if isinstance(scale, torch.Tensor) else e.square().mean().sqrt()
    bound = tol.rtol * e.abs() + tol.atol * s + tol.floor
    err = (a - e).abs()
    # A zero bound (exact-zero reference and scale) admits only an exact zero.
    exact = torch.where(err > 0, float("inf"), 0.0)
    return torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny), exact)


def _log(what: str, dtype: torch.dtype, tol: Tol, worst: float, where: tuple) -> None:
    path = os.environ.get("SPARSEMM_TOL_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    row = {"test": test, "what": what, "dtype": str(dtype), "tol": str(tol), "ratio": worst, "at": list(where)}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    *,
    tol: Tol | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """``actual`` within ``tol.rtol * |expected| + tol.atol * scale + tol.floor`` of ``expected`` everywhere, finite.

    Args:
        actual: the kernel's result, any dtype and device.
        expected: the float64 truth, same shape.
        dtype: the dtype the computation ran in (picks the default tolerance).
        what: the name printed on failure.
        tol: the bound; default ``DEFAULT_TOL[dtype]``.
        scale: per-element magnitude of the summed terms, broadcastable to ``expected``; None means the root
            mean square of ``expected`` (see :func:`error_ratio`). With neither ``tol`` nor ``scale``, the old
            bound ``REL_TOL[dtype] * max|expected|`` applies (for callers written before this module had
            per-element bounds; it cannot see errors in small elements).

    On failure the message lists the worst elements with their indices, values and bounds.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    if tol is None and scale is None:
        # The bound of callers written before per-element tolerances: REL_TOL * max|expected|, kept so they keep
        # their meaning. It hides errors in small elements; pass `tol` (and `scale`) instead.
        tol = Tol(rtol=0.0, atol=REL_TOL[dtype])
        scale = torch.tensor(max(_as64(expected).abs().max().item(), 1e-3))
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    a = _as64(actual)
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: non-finite values (unwritten or poisoned output?) at {bad}")
    ratio = error_ratio(actual, expected, tol, scale)
    flat = int(ratio.flatten().argmax())
    worst_at = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    worst = ratio.flatten()[flat].item()
    _log(what, dtype, tol, worst, worst_at)
    if worst <= 1.0:
        return
    e = _as64(expected)
    s = _as64(scale).expand_as(e) if isinstance(scale, torch.Tensor) else e.square().mean().sqrt().expand_as(e)
    top = ratio.flatten().topk(min(5, ratio.numel())).indices
    rows = []
    for w in top:
        i = tuple(int(j) for j in torch.unravel_index(w, ratio.shape))
        rows.append(
            f"  {i}: got {a[i].item():.8g} want {e[i].item():.8g} err {abs(a[i] - e[i]).item():.3g} "
            f"bound {(tol.rtol * e[i].abs() + tol.atol * s[i] + tol.floor).item():.3g} (scale {s[i].item():.3g})"
        )
    bad = int((ratio > 1).sum())
    raise AssertionError(
        f"{what}: {bad} of {ratio.numel()} elements over the bound ({tol}, dtype {dtype}); worst is "
        f"{worst:.3g}x the bound:\n" + "\n".join(rows)
    )


def _leaves_like(ts, fill):
    return [None if t is None else fill(t.detach().to(torch.float64)).requires_grad_(True) for t in ts]


def check_multilinear(run, truth, operands, dtype, tol, dy=None, names=("dx", "dw", "db")):
    """``run(*operands)`` and its gradients (autograd) vs ``truth`` on float64 copies, for an op that is linear in
    each operand (a grouped GEMM with bias). Returns the op's gradients for the operands that are not None.

    ``operands``: tensors that need grad (leaves, or views of leaves, so strided layouts reach the op as they
    are) or None. ``truth``: float64 and differentiable. The scale of every element comes from the truth itself:
    run on ``|operands|`` it gives ``sum |terms|`` (for the gradients, seeded with ``|dY|``), run on ones the
    number ``L`` of terms; the bound's ``scale`` is ``sum |terms| * sqrt(L)``.
    """
    live = [t for t in operands if t is not None]
    out = run(*operands)
    assert out.dtype == dtype, f"out: dtype {out.dtype}, want {dtype}"
    ops64 = _leaves_like(operands, lambda t: t)
    abs64 = _leaves_like(operands, torch.abs)
    ones64 = _leaves_like(operands, torch.ones_like)
    want, scale, count = truth(*ops64), truth(*abs64), truth(*ones64)
    assert_close_verbose(out, want, dtype, "out", tol=tol, scale=(scale * count.sqrt()).detach())
    if dy is None:
        dy = torch.randn(want.shape, device=out.device).to(dtype)
    dy64 = dy.detach().to(torch.float64)
    got = torch.autograd.grad(out, live, dy)
    want_g = torch.autograd.grad(want, [t for t in ops64 if t is not None], dy64)
    scale_g = torch.autograd.grad(scale, [t for t in abs64 if t is not None], dy64.abs())
    count_g = torch.autograd.grad(count, [t for t in ones64 if t is not None], torch.ones_like(count))
    live_names = [n for n, t in zip(names, operands) if t is not None]
    for name, g, r, s, c in zip(live_names, got, want_g, scale_g, count_g):
        assert g.dtype == dtype and g.shape == r.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        assert_close_verbose(g, r, dtype, name, tol=tol, scale=s * c.sqrt())
    return got


# The default bound: the grouped GEMM's, measured in tests/ops/test_grouped_mm.py (float32 worst 1.1 eps32 *
# scale * sqrt(L); float16 0.5 eps16 |want|, the half-ulp rounding; bfloat16 0.99 eps, as the interpreter rounds
# toward zero) and tests/test_extension.py (float64 0.71 eps64), each with about 3x headroom. Op tests pass
# their own measured table.
DEFAULT_TOL = {
    torch.float64: Tol(rtol=0.0, atol=2 * EPS[torch.float64]),
    torch.float32: Tol(rtol=0.0, atol=3.5 * EPS32),
    torch.float16: Tol(rtol=1.5 * EPS[torch.float16], atol=3.5 * EPS32),
    torch.bfloat16: Tol(rtol=3 * EPS[torch.bfloat16], atol=3.5 * EPS32),
}


def summarize_tol_log(path: str, group_by=("module", "what", "dtype", "tol")) -> list[dict]:
    """Worst ratio per (test module, compared quantity, dtype, tolerance) in a ``SPARSEMM_TOL_LOG`` file."""
    worst: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            row["module"] = row["test"].split("::")[0]
            key = tuple(row[k] for k in group_by)
            if key not in worst or row["ratio"] > worst[key]["ratio"]:
                worst[key] = row
    return sorted(worst.values(), key=lambda r: tuple(str(r[k]) for k in group_by))


if __name__ == "__main__":  # python -m sparsemm_kernels.utils.testing LOG.jsonl
    import sys

    for r in summarize_tol_log(sys.argv[1]):
        print(f"{r['ratio']:8.3f}  {r['module']:32s} {r['what']:10s} {r['dtype']:15s} {r['tol']:28s} {r['test']}")
