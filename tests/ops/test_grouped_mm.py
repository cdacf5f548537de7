"""grouped_mm / grouped_linear / modality_linear on every available backend vs the float64 reference."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.reference import grouped_linear_ref, grouped_mm_ref
from sparsemm_kernels.utils.testing import assert_close_verbose, ids_from_counts, offsets_from_counts

# (group sizes, K, N). Interpreter tiles are 32x32x32, GPU tiles 64-256: sizes are chosen off both.
CASES = [
    ([5], 16, 8),                     # G = 1, one partial tile
    ([1], 3, 1),                      # one row, K and N far below a tile
    ([0, 7, 0], 33, 17),              # empty first and last groups, K off the tile
    ([40, 0, 25], 70, 45),            # empty middle group, K spans three tiles
    ([33, 1, 64, 2], 32, 40),         # sizes on and one past the tile
    ([0, 0, 50], 24, 24),             # all rows in one group
    ([0, 0, 0], 8, 8),                # T = 0
    ([3] * 8 + [0] * 8, 20, 12),      # G = 16, half empty
    ([1, 0, 2, 5] * 16, 12, 9),       # G = 64, tiny groups
    ([130, 70], 40, 96),              # several row tiles per group
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "cpu", "torch"]


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("grouped_mm", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _operands(counts, K, N, dtype, device, bias=True):
    T = sum(counts)
    G = len(counts)
    x = torch.randn(T, K, device=device).to(dtype)
    w = (torch.randn(G, N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(G, N, device=device).to(dtype) if bias else None
    return x, w, b


def _grads(out, inputs, seed_grad):
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], seed_grad, allow_unused=False)
    return list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"{len(c[0])}g-{sum(c[0])}r-{c[1]}x{c[2]}" for c in CASES])
def test_grouped_mm_matches_reference(case, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    counts, K, N = case
    offsets = offsets_from_counts(counts, device)
    x, w, b = _operands(counts, K, N, dtype, device)
    for t in (x, w, b):
        t.requires_grad_(True)
    out = smk.grouped_mm(x, w, offsets, b, backend=backend)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = grouped_mm_ref(x64, w64, offsets, b64)
    assert out.dtype == dtype
    assert_close_verbose(out, ref, dtype, "out")
    dy = torch.randn_like(ref).to(dtype)
    got = _grads(out, [x, w, b], dy)
    want = _grads(ref, [x64, w64, b64], dy.double())
    for name, g, r in zip(("dx", "dw", "dbias"), got, want):
        assert_close_verbose(g, r, dtype, name)
    empty = [g for g, c in enumerate(counts) if c == 0]
    if empty:
        assert torch.count_nonzero(got[1][empty]) == 0, "weight gradient of an empty group must be exactly 0"
        assert torch.count_nonzero(got[2][empty]) == 0, "bias gradient of an empty group must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES[2:6] + CASES[8:], ids=lambda c: f"{len(c[0])}g-{sum(c[0])}r")
def test_grouped_linear_matches_reference(case, dtype, backend, device):
    """Rows in original (interleaved) order, routed by a plan: gather on load, scatter on store."""
    _skip_unless_runs(backend, device, dtype)
    counts, K, N = case
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, len(counts))
    x, w, b = _operands(counts, K, N, dtype, device)
    for t in (x, w, b):
        t.requires_grad_(True)
    out = smk.grouped_linear(x, w, plan, b, backend=backend)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = torch.stack([x64[i] @ w64[ids[i]].t() + b64[ids[i]] for i in range(len(ids))]) if len(ids) else (
        grouped_linear_ref(x64, w64, plan.sorted_to_orig, plan.offsets, b64)
    )
    assert_close_verbose(out, ref, dtype, "out")
    dy = torch.randn_like(ref).to(dtype)
    for name, g, r in zip(("dx", "dw", "dbias"), _grads(out, [x, w, b], dy), _grads(ref, [x64, w64, b64], dy.double())):
        assert_close_verbose(g, r, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x_and_no_bias(backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    counts, K, N = [9, 0, 14], 19, 11
    T = sum(counts)
    base = torch.randn(K, 2 * T, device=device)
    x = base.t()[::2]  # (T, K), strides (2, 2T): neither row- nor column-contiguous
    assert not x.is_contiguous()
    w = torch.randn(len(counts), N, K, device=device, requires_grad=True)
    x.requires_grad_(True)
    offsets = offsets_from_counts(counts, device)
    out = smk.grouped_mm(x, w, offsets, backend=backend)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = grouped_mm_ref(x64, w64, offsets)
    assert_close_verbose(out, ref, torch.float32, "out")
    dy = torch.randn(T, N, device=device).t().contiguous().t()  # column-major grad
    for name, g, r in zip(("dx", "dw"), _grads(out, [x, w], dy), _grads(ref, [x64, w64], dy.double())):
        assert_close_verbose(g, r, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_offsets_and_grad_of_x_only(backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    counts, K, N = [4, 6], 8, 5
    x, w, _ = _operands(counts, K, N, torch.float32, device, bias=False)
    x.requires_grad_(True)
    offsets = offsets_from_counts(counts, device).to(torch.int32)
    out = smk.grouped_mm(x, w, offsets, backend=backend)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    ref = grouped_mm_ref(x.double(), w.double(), offsets.long())
    assert_close_verbose(out, ref, torch.float32, "out")
    assert_close_verbose(dx, _dx_of_sum(w, offsets), torch.float32, "dx")


def _dx_of_sum(w, offsets):
    """d(sum out)/dx: each row of group g gets the column sums of W[g]."""
    rows = []
    for g in range(w.shape[0]):
        n = int(offsets[g + 1] - offsets[g])
        rows.append(w[g].double().sum(0).expand(n, -1))
    return torch.cat(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_modality_linear_3d(backend, num_modalities, device):
    """x (B, S, K) with interleaved modalities; a batch row may miss a modality entirely."""
    _skip_unless_runs(backend, device, torch.float32)
    B, S, K, N = 2, 13, 10, 7
    ids = torch.randint(0, num_modalities, (B, S), device=device)
    ids[1] = 0  # second sequence is single-modality
    x = torch.randn(B, S, K, device=device, requires_grad=True)
    w = torch.randn(num_modalities, N, K, device=device, requires_grad=True)
    b = torch.randn(num_modalities, N, device=device, requires_grad=True)
    out = smk.modality_linear(x, ids, w, b, backend=backend)
    assert out.shape == (B, S, N)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = torch.zeros(B, S, N, dtype=torch.float64, device=device)
    for m in range(num_modalities):  # the MoT reference style: boolean masks, a loop over modalities
        mask = ids == m
        ref = ref.masked_scatter(mask[..., None].expand_as(ref), (x64[mask] @ w64[m].t() + b64[m]))
    assert_close_verbose(out, ref, torch.float32, "out")
    dy = torch.randn_like(ref)
    for name, g, r in zip(("dx", "dw", "db"), _grads(out, [x, w, b], dy.float()), _grads(ref, [x64, w64, b64], dy)):
        assert_close_verbose(g, r, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_reuse_matches_fresh_plan(backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    ids = torch.randint(0, 3, (4, 9), device=device)
    x = torch.randn(4, 9, 16, device=device)
    w = torch.randn(3, 8, 16, device=device)
    plan = smk.group_plan(ids, 3)
    a = smk.modality_linear(x, ids, w, plan=plan, backend=backend)
    b = smk.modality_linear(x, ids, w, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_repeated_runs_are_bitwise_identical(backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    counts = [37, 0, 21, 5]
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, len(counts))
    x, w, b = _operands(counts, 45, 33, torch.float32, device)
    dy = torch.randn(sum(counts), 33, device=device)
    results = []
    for _ in range(3):
        xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        out = smk.grouped_linear(xs, ws, plan, bs, backend=backend)
        results.append([out.detach(), *torch.autograd.grad(out, [xs, ws, bs], dy)])
    for later in results[1:]:
        for a, c in zip(results[0], later):
            assert torch.equal(a, c)
