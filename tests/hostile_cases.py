"""Hostile plans, offsets and ids, run by ``tests/test_hostile_plans.py`` in a subprocess per (family, backend).

``python -m tests.hostile_cases FAMILY BACKEND DEVICE`` runs every case of the family with a poisoned
allocator (every ``torch.empty`` is NaN / max-int, so an unwritten output element shows) and prints one line
per case. Each case must: raise ``ValueError`` naming the argument when validation is on; and, with
``validate=False``, not crash, write every output element, and compute it from in-range rows only (checked
against a float64 model of the documented semantics). A crash (segfault, abort) kills the process: the
parent test reports the last case started.
"""

from __future__ import annotations

import sys

import torch

import sparsemm_kernels as smk
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import sanitized_offsets

T, K, N, G = 10, 6, 5, 3
HUGE = 2**40

# Offsets over T = 10 rows, G = 3 groups: each breaks one rule.
BAD_OFFSETS = {
    "past-end": [0, 3, 6, 40],
    "short-of-end": [0, 3, 6, 8],
    "unsorted": [0, 7, 3, 10],
    "negative-first": [-5, 3, 6, 10],
    "negative-middle": [0, -3, 6, 10],
    "huge-middle": [0, HUGE, 6, 10],
    "huge-last": [0, 3, 6, HUGE],
    "not-from-zero": [3, 3, 3, 3],
    "all-zero": [0, 0, 0, 0],
    "descending": [10, 6, 3, 0],
}
# Row maps over T = 10 positions (a valid plan's sorted_to_orig is a permutation of 0..9).
BAD_ROWS = {
    "huge-row": [0, 1, 2, HUGE, 4, 5, 6, 7, 8, 9],
    "negative-row": [0, 1, 2, 3, -1, 5, 6, 7, 8, 9],
    "very-negative-row": [-HUGE, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    "past-end-row": [0, 1, 2, 3, 4, 5, 6, 7, 8, 10],
    "repeated-row": [0, 1, 2, 3, 3, 5, 6, 7, 8, 9],
    "all-one-row": [4] * 10,
}
BAD_IDS = {
    "negative": [0, 1, -1, 2, 0, 1, 2, 0, 1, 2],
    "equal-G": [0, 1, 3, 2, 0, 1, 2, 0, 1, 2],
    "huge": [0, 1, HUGE, 2, 0, 1, 2, 0, 1, -HUGE],
}


def _poison() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


def _expect_value_error(fn, name: str) -> None:
    try:
        fn()
    except ValueError as exc:
        if f"`{name}`" not in str(exc):
            raise AssertionError(f"ValueError does not name `{name}`: {exc}") from None
        return
    raise AssertionError(f"no ValueError naming `{name}` with validation on")


def _finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise AssertionError(f"{what}: non-finite (unwritten) elements")


def _model_forward(x, w, b, offsets, rows):
    """float64 model of validate=False: offsets sanitized, positions with an out-of-range row skipped,
    rows nobody writes zero (routed), or every row written exactly once (not routed)."""
    bounds = sanitized_offsets(offsets.cpu(), x.shape[0]).tolist()
    x64, w64, b64 = x.double().cpu(), w.double().cpu(), b.double().cpu()
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for g in range(w.shape[0]):
        for r in range(bounds[g], bounds[g + 1]):
            row = int(rows[r]) if rows is not None else r
            if 0 <= row < x.shape[0]:
                out[row] = x64[row] @ w64[g].t() + b64[g]
    return out


def _close(got, want, what):
    err = (got.double().cpu() - want).abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"{what}: max error {err:.3g} against the validate=False model")


def _operands(device):
    x = torch.randn(T, K, device=device, requires_grad=True)
    w = torch.randn(G, N, K, device=device, requires_grad=True)
    b = torch.randn(G, N, device=device, requires_grad=True)
    return x, w, b


def case_offsets(name, values, backend, device):
    x, w, b = _operands(device)
    offsets = torch.tensor(values, device=device)
    _expect_value_error(lambda: smk.grouped_mm(x, w, offsets, b, backend=backend, validate=True), "offsets")
    out = smk.grouped_mm(x, w, offsets, b, backend=backend, validate=False)
    _finite(out, "out")
    _close(out, _model_forward(x, w, b, offsets, None), "out")
    out.square().sum().backward()
    for t, n in ((x, "dx"), (w, "dw"), (b, "dbias")):
        _finite(t.grad, n)
    _ffn_offsets(x, offsets, backend)


def _ffn_offsets(x, offsets, backend):
    """grouped_swiglu_ffn over the same offsets: the same error, and unchecked, the FFN of the sanitized groups."""
    x = x.detach().requires_grad_()
    w1, w3 = (torch.randn(G, 6, K, device=x.device, requires_grad=True) for _ in range(2))
    w2 = torch.randn(G, K, 6, device=x.device, requires_grad=True)
    _expect_value_error(lambda: smk.grouped_swiglu_ffn(x, w1, w3, w2, offsets, backend=backend, validate=True),
                        "offsets")
    out = smk.grouped_swiglu_ffn(x, w1, w3, w2, offsets, backend=backend, validate=False)
    _finite(out, "ffn out")
    bounds = sanitized_offsets(offsets.cpu(), T).tolist()
    want = torch.zeros(T, K, dtype=torch.float64)
    x64, w164, w364, w264 = (t.detach().double().cpu() for t in (x, w1, w3, w2))
    for g in range(G):
        s, e = bounds[g], bounds[g + 1]
        want[s:e] = (torch.nn.functional.silu(x64[s:e] @ w164[g].t()) * (x64[s:e] @ w364[g].t())) @ w264[g].t()
    _close(out, want, "ffn out")
    out.square().sum().backward()
    for t, n in ((x, "ffn dx"), (w1, "dw1"), (w3, "dw3"), (w2, "dw2")):
        _finite(t.grad, n)


def _plan(rows, offsets, device):
    rows = torch.tensor(rows, device=device)
    return GroupPlan(rows, torch.tensor(offsets, device=device), torch.zeros(G, dtype=torch.int64), G, T)


def case_plan(name, rows, offsets, backend, device):
    x, w, b = _operands(device)
    plan = _plan(rows, offsets, device)
    _expect_value_error(
        lambda: smk.grouped_linear(x, w, plan, b, backend=backend, validate=True),
        "plan.offsets" if rows == list(range(T)) else "plan.sorted_to_orig",
    )
    out = smk.grouped_linear(x, w, plan, b, backend=backend, validate=False)
    _finite(out, "out")
    if len(set(rows)) == len(rows):  # with a repeated row, which writer wins is unspecified
        _close(out, _model_forward(x, w, b, plan.offsets, plan.sorted_to_orig), "out")
    out.square().sum().backward()
    for t, n in ((x, "dx"), (w, "dw"), (b, "dbias")):
        _finite(t.grad, n)
    _multi_weight_plan(x, w, plan, backend, rows)


def _multi_weight_plan(x, w, plan, backend, rows):
    """grouped_linears over the same plan: the same error, and unchecked, each output that of grouped_linear."""
    ws = [w.detach().clone().requires_grad_(), w.detach()[:, :2].clone().requires_grad_()]
    x = x.detach().requires_grad_()
    _expect_value_error(lambda: smk.grouped_linears(x, ws, plan, backend=backend, validate=True),
                        "plan.offsets" if rows == list(range(T)) else "plan.sorted_to_orig")
    outs = smk.grouped_linears(x, ws, plan, backend=backend, validate=False)
    for j, (out, wj) in enumerate(zip(outs, ws)):
        _finite(out, f"out{j}")
        if len(set(rows)) == len(rows):
            _close(out, _model_forward(x, wj, torch.zeros(G, wj.shape[1], device=x.device), plan.offsets,
                                       plan.sorted_to_orig), f"out{j}")
    sum(o.square().sum() for o in outs).backward()
    for t, n in ((x, "dx"), (ws[0], "dw0"), (ws[1], "dw1")):
        _finite(t.grad, n)


def case_ids(name, values, backend, device):
    ids = torch.tensor(values, device=device)
    _expect_value_error(lambda: smk.group_plan(ids, G, backend=backend, validate=True), "group_ids")
    plan = smk.group_plan(ids, G, backend=backend, validate=False)
    want = torch.sort(ids.cpu().clamp(0, G - 1), stable=True).indices
    if not torch.equal(plan.sorted_to_orig.cpu(), want):
        raise AssertionError(f"plan of bad ids is not the plan of the clamped ids: {plan.sorted_to_orig}")
    if plan.offsets.tolist()[-1] != T:
        raise AssertionError(f"offsets must end at {T}: {plan.offsets.tolist()}")


def case_norm_ids(name, values, backend, device):
    ids = torch.tensor(values, device=device)
    x = torch.randn(T, 8, device=device, requires_grad=True)
    w = (torch.rand(G, 8, device=device) + 0.5).requires_grad_(True)
    _expect_value_error(lambda: smk.modality_rms_norm(x, ids, w, backend=backend, validate=True), "modality_ids")
    y = smk.modality_rms_norm(x, ids, w, backend=backend, validate=False)
    want = smk.modality_rms_norm(x, ids.clamp(0, G - 1), w, backend="torch")
    _finite(y, "y")
    _close(y, want.double().detach().cpu(), "y")
    y.square().sum().backward()
    _finite(x.grad, "dx")
    _finite(w.grad, "dw")


def case_norm_offsets(name, values, backend, device):
    """Grouped LayerNorm over bad offsets: unchecked, rows are grouped as by the sanitized offsets (clamped
    into [0, T], made non-decreasing), as the documented semantics say."""
    offsets = torch.tensor(values, device=device)
    x = torch.randn(T, 8, device=device, requires_grad=True)
    w = (torch.rand(G, 8, device=device) + 0.5).requires_grad_(True)
    b = torch.randn(G, 8, device=device, requires_grad=True)
    _expect_value_error(lambda: smk.grouped_layer_norm(x, w, b, offsets, backend=backend, validate=True), "offsets")
    y = smk.grouped_layer_norm(x, w, b, offsets, backend=backend, validate=False)
    want = smk.grouped_layer_norm(x, w, b, sanitized_offsets(offsets, T), backend="torch")
    _finite(y, "y")
    _close(y, want.double().detach().cpu(), "y")
    y.square().sum().backward()
    for t, n in ((x, "dx"), (w, "dw"), (b, "db")):
        _finite(t.grad, n)


def cases(family):
    if family == "offsets":
        return [(n, case_offsets, (n, v)) for n, v in BAD_OFFSETS.items()]
    if family == "plans":
        out = [(n, case_plan, (n, v, [0, 3, 6, 10])) for n, v in BAD_ROWS.items()]
        out += [(f"perm+{n}", case_plan, (n, list(range(T)), v)) for n, v in BAD_OFFSETS.items()]
        return out
    if family == "ids":
        return [(n, case_ids, (n, v)) for n, v in BAD_IDS.items()]
    if family == "norm-ids":
        return [(n, case_norm_ids, (n, v)) for n, v in BAD_IDS.items()]
    if family == "norm-offsets":
        return [(n, case_norm_offsets, (n, v)) for n, v in BAD_OFFSETS.items()]
    raise SystemExit(f"unknown family {family!r}")


def main(argv: list[str]) -> int:
    family, backend, device = argv
    _poison()
    torch.manual_seed(0)
    failed = 0
    for name, fn, args in cases(family):
        print(f"START {name}", flush=True)
        try:
            fn(*args, backend, torch.device(device))
            print(f"OK {name}", flush=True)
        except Exception as exc:  # report every failing case, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
