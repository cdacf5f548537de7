"""grouped_mm / grouped_linear / modality_linear on every backend vs an independent float64 truth.

The truth is written here, not taken from ``sparsemm_kernels.reference`` (which *is* the ``torch`` backend):
``F.linear`` per group on sliced rows for ``grouped_mm``, one ``F.linear`` per row for the routed forms. Every
element is checked against ``rtol * |want| + atol * scale * sqrt(L)`` (plus a subnormal floor in float16) with
``scale`` the same truth run on ``|operands|`` (``sum_k |x_k w_k| + |b|`` for the output, ``|dY| @ |W|`` for dX,
``|dY|^T @ |X|`` for dW, ``sum |dY|`` for db) and ``L`` the number of summed terms (the truth run on ones).
"""

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.testing import (
    EPS,
    EPS32,
    Tol,
    assert_close_verbose,
    check_multilinear,
    ids_from_counts,
    offsets_from_counts,
)

BACKENDS = ["triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP16, BF16 = torch.float16, torch.bfloat16


def _subnormal(dtype):
    """Spacing of the subnormals of ``dtype`` (2^-24 for float16)."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


# Bound per element: rtol * |want| + atol * scale * sqrt(L), scale = sum of |terms|, L = number of terms (both
# computed by running the truth on |operands| and on ones). Measured worst ratios over this module
# (SPARSEMM_TOL_LOG; interpreter, C++ and CPU torch on 2 cores):
# * float32, every backend: err <= 1.1 eps32 * scale * sqrt(L) (C++ forward; triton 0.84, torch 0.79, dW 0.62,
#   db 0.70) -> atol = 3.5 eps32.
# * float16 kernels (one float32 accumulation rounded once): err - atol term <= 0.50 eps16 |want| (the half-ulp
#   rounding bound) -> rtol = 1.5 eps16.
# * bfloat16 kernels: 0.99 eps |want|: the interpreter rounds float32 -> bfloat16 toward zero (a full ulp);
#   -> rtol = 3 eps. (A GPU rounds to nearest: at most 0.5 eps there.)
# * torch backend in float16 / bfloat16 rounds twice in the forward (x @ W^T, then + b): measured
#   0.26 eps * scale * sqrt(L) over the rtol term -> atol = 0.8 eps of the dtype.
# * float16 floor: a result that underflows into the subnormals (below 2^-14) is rounded to their fixed spacing
#   2^-24, off by up to half of it, which rtol * |want| does not cover there -> 1.5 subnormal spacings (as
#   test_swiglu.py).
KERNEL_ATOL = 3.5 * EPS32
FP16_FLOOR = 1.5 * _subnormal(FP16)
TOL = {
    ("kernel", torch.float32): Tol(rtol=0.0, atol=KERNEL_ATOL),
    ("kernel", FP16): Tol(rtol=1.5 * EPS[FP16], atol=KERNEL_ATOL, floor=FP16_FLOOR),
    ("kernel", BF16): Tol(rtol=3 * EPS[BF16], atol=KERNEL_ATOL),
    ("torch", torch.float32): Tol(rtol=0.0, atol=KERNEL_ATOL),
    ("torch", FP16): Tol(rtol=1.5 * EPS[FP16], atol=0.8 * EPS[FP16], floor=FP16_FLOOR),
    ("torch", BF16): Tol(rtol=3 * EPS[BF16], atol=0.8 * EPS[BF16]),
}


def _tol(backend, dtype):
    return TOL[("torch" if backend == "torch" else "kernel", dtype)]


# (group sizes, K, N). Interpreter tiles: 32 rows x 32 output columns x 32 deep (forward and dX), dW 32x32 over
# 32-row steps; row tiles are swizzled in bands of 4. GPU tiles 64-256. Sizes sit on, one past and far off both.
CASES = [
    ([5], 16, 8),                     # G = 1, one partial tile
    ([1], 3, 1),                      # one row, K and N far below a tile
    ([0, 7, 0], 33, 17),              # empty first and last groups, K one past the tile
    ([40, 0, 25], 70, 45),            # empty middle group, K spans three tiles, N two
    ([33, 1, 64, 2], 32, 40),         # sizes on and one past the row tile; K exactly one tile (EVEN_K)
    ([0, 0, 50], 64, 33),             # all rows in one group; K two whole tiles, N one past a tile
    ([0, 0, 0], 8, 8),                # T = 0
    ([3] * 8 + [0] * 8, 20, 12),      # G = 16, half empty
    ([1, 0, 2, 5] * 16, 12, 9),       # G = 64, tiny groups
    ([70, 40, 20], 40, 70),           # 6 row tiles: a partial swizzle band; 3 column tiles; dW 3 row steps
]


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("grouped_mm", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _truth_mm(x, w, offsets, b=None):
    """F.linear per group on the group's sliced rows (float64, differentiable)."""
    bounds = [int(v) for v in offsets]
    pieces = [F.linear(x[bounds[g] : bounds[g + 1]], w[g], None if b is None else b[g]) for g in range(w.shape[0])]
    return torch.cat(pieces) if pieces else x.new_zeros(x.shape[0], w.shape[1])


def _truth_routed(ids):
    """One F.linear per row with the row's own group (float64, differentiable); works for any leading shape."""

    def truth(x, w, b=None):
        flat_ids, xs = ids.reshape(-1).tolist(), x.reshape(-1, x.shape[-1])
        rows = [F.linear(xs[i], w[g], None if b is None else b[g]) for i, g in enumerate(flat_ids)]
        out = torch.stack(rows) if rows else xs.new_zeros(0, w.shape[1])
        return out.reshape(*x.shape[:-1], w.shape[1])

    return truth


def _operands(counts, K, N, dtype, device, bias=True):
    T, G = sum(counts), len(counts)
    x = torch.randn(T, K, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(G, N, K, device=device) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(G, N, device=device).to(dtype).requires_grad_(True) if bias else None
    return x, w, b


def _case_id(c):
    return f"{len(c[0])}g-{sum(c[0])}r-{c[1]}x{c[2]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_grouped_mm_matches_truth(case, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    counts, K, N = case
    offsets = offsets_from_counts(counts, device)
    x, w, b = _operands(counts, K, N, dtype, device)
    got = check_multilinear(
        lambda x, w, b: smk.grouped_mm(x, w, offsets, b, backend=backend),
        lambda x, w, b: _truth_mm(x, w, offsets, b),
        [x, w, b], dtype, _tol(backend, dtype),
    )
    empty = [g for g, c in enumerate(counts) if c == 0]
    if empty:
        assert torch.count_nonzero(got[1][empty]) == 0, "weight gradient of an empty group must be exactly 0"
        assert torch.count_nonzero(got[2][empty]) == 0, "bias gradient of an empty group must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES[2:6] + CASES[8:], ids=[_case_id(c) for c in CASES[2:6] + CASES[8:]])
def test_grouped_linear_matches_truth(case, dtype, backend, device):
    """Rows in original (interleaved) order, routed by a plan: gather on load, scatter on store."""
    _skip_unless_runs(backend, device, dtype)
    counts, K, N = case
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, len(counts))
    x, w, b = _operands(counts, K, N, dtype, device)
    check_multilinear(
        lambda x, w, b: smk.grouped_linear(x, w, plan, b, backend=backend),
        _truth_routed(ids), [x, w, b], dtype, _tol(backend, dtype),
    )


# ---- every stride pattern the API accepts -------------------------------------------------------------------

def _w_transposed(G, N, K, device):  # (G, K, N) memory: W[g] is column-major, stride(2) = N
    return torch.randn(G, K, N, device=device).transpose(1, 2)


def _w_group_inner(G, N, K, device):  # (N, G, K) memory: the group stride is the smallest but one
    return torch.randn(N, G, K, device=device).permute(1, 0, 2)


def _b_col_strided(G, N, device):  # (N, G) memory: stride (1, G), the bias layout of the strided-bias bug
    return torch.randn(N, G, device=device).t()


def _b_row_padded(G, N, device):  # a column slice of a wider buffer: row stride N + 5
    return torch.randn(G, N + 5, device=device)[:, 2 : 2 + N]


def _m_col_major(R, C, device):  # stride (1, R)
    return torch.randn(C, R, device=device).t()


def _m_sliced(R, C, device):  # row stride C + 7, unit column stride
    return torch.randn(R, C + 7, device=device)[:, 3 : 3 + C]


def _m_row_step(R, C, device):  # every other row of a taller buffer, then every other column: stride (2C', 2)
    return torch.randn(2 * R, 2 * C, device=device)[::2, ::2]


def _m_expanded(R, C, device):  # stride (0, 1): what out.sum(0)-style graphs hand the backward
    return torch.randn(1, C, device=device).expand(R, C)


# name: (x layout, w layout, bias layout, dy layout); each row isolates or combines layouts the kernels index.
LAYOUTS = {
    "bias-col-strided": (None, None, _b_col_strided, None),
    "w-transposed": (None, _w_transposed, None, None),
    "all-column-major": (_m_col_major, _w_transposed, _b_col_strided, _m_col_major),
    "padded-rows": (_m_sliced, _w_group_inner, _b_row_padded, _m_sliced),
    "steps-and-expanded-dy": (_m_row_step, _w_transposed, _b_col_strided, _m_expanded),
}
STRIDED_COUNTS, STRIDED_K, STRIDED_N = [33, 0, 40, 5], 37, 35  # past the 32-wide interpreter tiles on every axis


def _layout_tensor(f, shape, dtype, device):
    """A tensor of ``shape`` in the layout ``f`` makes, in ``dtype``, that needs grad (a view of a leaf)."""
    if f is None:
        return torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    probe = f(*shape, device)
    # Rebuild the same view on a leaf of the right dtype: same base shape, same view ops.
    base = probe._base if probe._base is not None else probe
    leaf = base.detach().to(dtype).requires_grad_(True)
    view = leaf.as_strided(probe.shape, probe.stride(), probe.storage_offset())
    assert view.stride() == probe.stride()
    return view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("routed", [False, True], ids=["grouped_mm", "grouped_linear"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_operands(layout, routed, dtype, backend, device):
    """Transposed / permuted weights, column-strided and padded biases, non-contiguous x and dY."""
    _skip_unless_runs(backend, device, dtype)
    fx, fw, fb, fdy = LAYOUTS[layout]
    counts, K, N = STRIDED_COUNTS, STRIDED_K, STRIDED_N
    T, G = sum(counts), len(counts)
    x = _layout_tensor(fx, (T, K), dtype, device)
    w = _layout_tensor(fw, (G, N, K), dtype, device)
    b = _layout_tensor(fb, (G, N), dtype, device)
    dy = _layout_tensor(fdy, (T, N), dtype, device).detach()
    if fw is not None:
        assert not w.is_contiguous()
    if fb is not None:
        assert not b.is_contiguous()
    if routed:
        ids = ids_from_counts(counts, shuffle=True).to(device)
        plan = smk.group_plan(ids, G)
        run, truth = (lambda x, w, b: smk.grouped_linear(x, w, plan, b, backend=backend)), _truth_routed(ids)
    else:
        offsets = offsets_from_counts(counts, device)
        run, truth = (lambda x, w, b: smk.grouped_mm(x, w, offsets, b, backend=backend)), (
            lambda x, w, b: _truth_mm(x, w, offsets, b)
        )
    check_multilinear(run, truth, [x, w, b], dtype, _tol(backend, dtype), dy=dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_strided_modality_linear(backend, device):
    """x (B, S, K) permuted in memory (not viewable as rows: copied), ids (B, S), dY (B, S, N) permuted."""
    _skip_unless_runs(backend, device, torch.float32)
    B, S, K, N, M = 3, 23, 34, 33, 3
    ids = torch.randint(0, M, (B, S), device=device)
    ids[1] = 0  # one sequence is single-modality
    x = torch.randn(S, B, K, device=device, requires_grad=True).transpose(0, 1)
    w = torch.randn(M, K, N, device=device, requires_grad=True).transpose(1, 2)
    b = torch.randn(N, M, device=device, requires_grad=True).t()
    dy = torch.randn(S, N, B, device=device).permute(2, 0, 1)
    check_multilinear(
        lambda x, w, b: smk.modality_linear(x, ids, w, b, backend=backend),
        _truth_routed(ids), [x, w, b], torch.float32, _tol(backend, torch.float32), dy=dy,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_modality_linear_with_a_shared_plan(backend, num_modalities, device):
    """One plan reused by two layers of different widths (as MoT layers do); each layer vs the truth."""
    _skip_unless_runs(backend, device, torch.float32)
    B, S = 2, 13
    ids = torch.randint(0, num_modalities, (B, S), device=device)
    ids[1] = 0  # the second sequence is single-modality
    plan = smk.group_plan(ids, num_modalities)
    for K, N in ((10, 7), (7, 33)):
        x = torch.randn(B, S, K, device=device, requires_grad=True)
        w = torch.randn(num_modalities, N, K, device=device, requires_grad=True)
        b = torch.randn(num_modalities, N, device=device, requires_grad=True)
        check_multilinear(
            lambda x, w, b: smk.modality_linear(x, ids, w, b, plan, backend=backend),
            _truth_routed(ids), [x, w, b], torch.float32, _tol(backend, torch.float32),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_offsets_no_bias_grad_of_x_only(backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    counts, K, N = [4, 6], 8, 5
    x, w, _ = _operands(counts, K, N, torch.float32, device, bias=False)
    offsets = offsets_from_counts(counts, device).to(torch.int32)
    out = smk.grouped_mm(x, w.detach(), offsets, backend=backend)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    # d(sum out)/dx: each row of group g gets the column sums of W[g].
    want = torch.cat([w[g].detach().double().sum(0).expand(c, -1) for g, c in enumerate(counts)])
    scale = torch.cat([w[g].detach().double().abs().sum(0).expand(c, -1) for g, c in enumerate(counts)]) * N**0.5
    assert_close_verbose(dx, want, torch.float32, "dx", tol=_tol(backend, torch.float32), scale=scale)
    off64 = offsets.long()
    scale = _truth_mm(x.detach().double().abs(), w.detach().double().abs(), off64) * K**0.5
    assert_close_verbose(out, _truth_mm(x.detach().double(), w.detach().double(), off64), torch.float32, "out",
                         tol=_tol(backend, torch.float32), scale=scale)


# ---- nothing written or read outside the rows of the groups -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_rows_past_the_end_are_never_read(backend, device):
    """``plan.sorted_to_orig`` is a view of a longer buffer whose next entry points at a row of group 0.

    A kernel that touches sorted position T (one past the last group, e.g. a ``<=`` row mask) would gather that
    row and scatter the last group's product over it; the truth catches the overwritten row.
    """
    _skip_unless_runs(backend, device, torch.float32)
    counts, K, N = [6, 0, 33, 9], 12, 10
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, len(counts))
    T = sum(counts)
    guard = torch.cat([plan.sorted_to_orig, plan.sorted_to_orig[:1].repeat(32)])  # row of group 0 after the end
    guarded = GroupPlan(guard[:T], plan.offsets, plan.counts, plan.num_groups, plan.num_rows)
    x, w, b = _operands(counts, K, N, torch.float32, device)
    check_multilinear(
        lambda x, w, b: smk.grouped_linear(x, w, guarded, b, backend=backend),
        _truth_routed(ids), [x, w, b], torch.float32, _tol(backend, torch.float32),
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_plan_with_a_strided_row_index(backend, device):
    """A GroupPlan is a plain dataclass of tensors: one built by hand may hold a strided ``sorted_to_orig``.
    (The buffer interleaves it with its reverse, so a kernel that ignores the stride still reads valid rows.)"""
    _skip_unless_runs(backend, device, torch.float32)
    counts, K, N = [9, 0, 14, 5], 12, 10
    ids = ids_from_counts(counts, shuffle=True).to(device)
    plan = smk.group_plan(ids, len(counts))
    both = torch.stack([plan.sorted_to_orig, plan.sorted_to_orig.flip(0)], dim=1)
    strided = GroupPlan(both[:, 0], plan.offsets, plan.counts, plan.num_groups, plan.num_rows)
    assert strided.sorted_to_orig.stride() == (2,)
    x, w, b = _operands(counts, K, N, torch.float32, device)
    check_multilinear(
        lambda x, w, b: smk.grouped_linear(x, w, strided, b, backend=backend),
        _truth_routed(ids), [x, w, b], torch.float32, _tol(backend, torch.float32),
    )


@pytest.mark.parametrize("launcher", ["triton", "cpu"])
@pytest.mark.parametrize("transpose_w", [False, True], ids=["forward", "dX"])
def test_launcher_writes_only_its_rows(launcher, transpose_w, device):
    """``out`` is the first T rows of a NaN-filled buffer: the rows after it (and the columns of a wider
    buffer) must stay NaN; every row inside it must be written."""
    _skip_unless_runs(launcher, device, torch.float32)
    if launcher == "triton":
        from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm as gemm
    else:
        from sparsemm_kernels.kernels.cpu import grouped_gemm_cpu as gemm
    counts, K, N = [5, 0, 32, 7], 9, 11
    T, G = sum(counts), len(counts)
    offsets = offsets_from_counts(counts, device)
    J = K if transpose_w else N
    a = torch.randn(T + 40, N if transpose_w else K, device=device)  # rows past T are readable, never used
    w = torch.randn(G, N, K, device=device)
    big = torch.full((T + 40, J + 3), float("nan"), device=device)
    out = big[:T, :J]
    gemm(a[:T], w, offsets, out=out, transpose_w=transpose_w)
    assert torch.isnan(big[T:]).all() and torch.isnan(big[:, J:]).all(), "wrote outside `out`"
    wt = w.double() if transpose_w else w.double().transpose(1, 2)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    want = torch.cat([a[s:e].double() @ wt[g] for g, (s, e) in enumerate(bounds)])
    scale = torch.cat([a[s:e].double().abs() @ wt[g].abs() for g, (s, e) in enumerate(bounds)]) * a.shape[1] ** 0.5
    assert_close_verbose(out, want, torch.float32, "out", tol=_tol(launcher, torch.float32), scale=scale)


# ---- C++ tiles (64-row chunks, 128-column blocks, dW 16 x 256 outputs over 256-row blocks) through the op ----

@pytest.mark.parametrize("routed", [False, True], ids=["grouped_mm", "grouped_linear"])
def test_cpu_backend_past_every_cxx_tile(routed, device):
    """K = 259 (> 256-wide dW column block; dX has 259 output columns > 128), N = 131 (> 128-column forward
    block, dW 16-row tiles), a 300-row group (> 256-row dW block, > 64-row chunks), transposed weights and
    column-strided bias."""
    _skip_unless_runs("cpu", device, torch.float32)
    counts, K, N = [0, 300, 65, 1], 259, 131
    T, G = sum(counts), len(counts)
    x = torch.randn(T, K, device=device, requires_grad=True)
    w = (torch.randn(G, K, N, device=device) / K**0.5).requires_grad_(True).transpose(1, 2)
    b = torch.randn(N, G, device=device, requires_grad=True).t()
    if routed:
        ids = ids_from_counts(counts, shuffle=True).to(device)
        plan = smk.group_plan(ids, G)

        def truth(x, w, b):  # per group with masks (independent of the per-row truth, and fast)
            out = x.new_zeros(T, N)
            for g in range(G):
                out = out.index_put((ids == g,), F.linear(x[ids == g], w[g], b[g]))
            return out

        run = lambda x, w, b: smk.grouped_linear(x, w, plan, b, backend="cpu")  # noqa: E731
    else:
        offsets = offsets_from_counts(counts, device)
        run = lambda x, w, b: smk.grouped_mm(x, w, offsets, b, backend="cpu")  # noqa: E731
        truth = lambda x, w, b: _truth_mm(x, w, offsets, b)  # noqa: E731
    check_multilinear(run, truth, [x, w, b], torch.float32, _tol("cpu", torch.float32))


@pytest.mark.parametrize("K,N", [(32, 24), (5, 7)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("G", [8, 64])
def test_torch_backend_many_groups_one_aten_call_or_the_loop(G, K, N):
    # From ATEN_GROUPED_MM_MIN_GROUPS groups on, CPU float32 with 16-byte strides goes through torch._grouped_mm;
    # odd widths fall back to the per-group loop. Both must equal the float64 loop, with empty groups' dW exactly 0.
    from sparsemm_kernels.ops import grouped_linear as gl

    torch.manual_seed(G + K)
    ids = torch.randint(0, G, (150,))
    ids[ids == 1] = 0  # group 1 empty
    plan = smk.group_plan(ids, G)
    x = smk.sort_rows(torch.randn(150, K), plan).detach().requires_grad_(True)
    w = torch.randn(G, N, K, requires_grad=True)
    bounds = plan.offsets.tolist()
    used = gl._aten_grouped_mm(x.detach(), w.detach().transpose(1, 2), bounds) is not None
    assert used == (K == 32 and hasattr(torch, "_grouped_mm"))
    y = smk.grouped_mm(x, w, plan.offsets, backend="torch")
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = torch.cat([xd[bounds[g]:bounds[g + 1]] @ wd[g].t() for g in range(G)])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)
    assert bool((w.grad[1] == 0).all())
