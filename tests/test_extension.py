"""The native extension ``sparsemm_kernels._C`` through its launchers (kernels/cpu.py, kernels/cuda.py),
checked against plain torch in float64 on fresh seeded inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from sparsemm_kernels import _ext
from sparsemm_kernels.utils.testing import EPS, Tol, assert_close_verbose

if not _ext.is_available():
    pytest.skip(f"native extension unavailable: {_ext.unavailable_reason()}", allow_module_level=True)

from sparsemm_kernels.kernels.cpu import group_plan_cpu, grouped_gemm_cpu, grouped_gemm_dw_cpu  # noqa: E402

C = _ext.load()

needs_cuda_ops = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_ops()),
    reason="needs a CUDA device and _C built with CUDA ops",
)

# (n, num_groups, id pattern), each row naming the edge it hits.
PLAN_CASES = [
    pytest.param(0, 1, "random", id="n0-G1"),  # empty input, one group
    pytest.param(0, 5, "random", id="n0-G5"),  # empty input, every group empty
    pytest.param(1, 1, "random", id="n1-G1"),  # single row
    pytest.param(1, 64, "random", id="n1-G64"),  # one row, 63 empty groups
    pytest.param(33, 1, "random", id="n33-G1"),  # one group takes all
    pytest.param(50, 8, "one_group", id="n50-G8-all-in-5"),  # one group takes all, the others empty
    pytest.param(40, 64, "even_only", id="n40-G64-odd-empty"),  # every odd group empty
    pytest.param(257, 64, "random", id="n257-G64"),  # many groups, n not a power of two
    pytest.param(1000, 3, "random", id="n1000-G3"),  # few large groups
    pytest.param(5, 64, "random", id="n5-G64"),  # most groups empty
]
ID_DTYPES = [torch.int32, torch.int64]


def _make_ids(n: int, num_groups: int, pattern: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if pattern == "one_group":
        ids = torch.full((n,), num_groups - 3, dtype=torch.int64)
    elif pattern == "even_only":
        ids = torch.randint(0, (num_groups + 1) // 2, (n,), generator=gen) * 2
    else:
        ids = torch.randint(0, num_groups, (n,), generator=gen)
    return ids.to(dtype)


def _seed(*parts) -> int:
    """A per-test seed that, unlike hash() of strings, is the same in every process."""
    return zlib.crc32(repr(parts).encode())


def _plan_ref(ids: torch.Tensor, num_groups: int):
    ids64 = ids.to(torch.int64)
    sorted_to_orig = torch.sort(ids64, stable=True).indices
    counts = torch.bincount(ids64, minlength=num_groups)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return sorted_to_orig, counts, offsets


def test_cuda_entry_points_exist_iff_built_with_cuda():
    assert C.ABI_VERSION == _ext.ABI_VERSION
    assert _ext.has_cuda_ops() == C.has_cuda()
    assert _ext.unavailable_reason() == ""
    for name in ("group_plan_cuda", "group_plan_cuda_workspace_bytes"):
        assert hasattr(C, name) == C.has_cuda(), name


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not found")
def test_module_links_neither_libtorch_nor_libcudart():
    dynamic = subprocess.run(["readelf", "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    for lib in ("libtorch", "libc10", "libcudart", "libcuda."):
        assert not any(lib in line for line in needed), needed


def test_dtype_codes_mirror_common_h():
    header_path = Path(__file__).resolve().parents[1] / "csrc/include/sparsemm/common.h"
    if not header_path.is_file():
        pytest.skip("runs from the source tree only")
    header = header_path.read_text()
    for name, code in [("Float32", 0), ("Float64", 1), ("Float16", 2), ("BFloat16", 3), ("Int32", 4), ("Int64", 5)]:
        assert f"k{name} = {code}," in header
        assert getattr(_ext, f"DTYPE_{name.upper()}") == code


@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("n, num_groups, pattern", PLAN_CASES)
def test_group_plan_cpu_matches_torch(n, num_groups, pattern, dtype):
    ids = _make_ids(n, num_groups, pattern, dtype, seed=n * 131 + num_groups)
    sorted_to_orig, counts, offsets, first_bad = group_plan_cpu(ids, num_groups)
    ref = _plan_ref(ids, num_groups)
    assert first_bad == -1
    for got, want in zip((sorted_to_orig, counts, offsets), ref):
        assert got.dtype == torch.int64
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize(
    "bad_values, positions",
    [
        pytest.param([-1], [0], id="negative-first"),
        pytest.param([4], [9], id="equal-G-last"),
        pytest.param([2**31 - 1, -7], [3, 6], id="huge-then-negative"),
        pytest.param([-(2**31), 100], [5, 2], id="two-bad-first-wins"),
    ],
)
def test_group_plan_cpu_reports_first_bad_id(bad_values, positions, dtype):
    num_groups = 4
    ids = _make_ids(10, num_groups, "random", dtype, seed=7)
    for value, pos in zip(bad_values, positions):
        ids[pos] = value
    *_, first_bad = group_plan_cpu(ids, num_groups)
    assert first_bad == min(positions)


def test_group_plan_cpu_rejects_bad_arguments():
    with pytest.raises(TypeError, match="`ids`"):
        group_plan_cpu(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="`num_groups`"):
        group_plan_cpu(torch.zeros(3, dtype=torch.int64), 0)
    ids = torch.zeros(3, dtype=torch.int64)
    out = [torch.empty(k, dtype=torch.int64) for k in (3, 2, 3)]
    with pytest.raises(ValueError, match="`ids`"):  # the C++ check: a float dtype code
        C.group_plan_cpu(ids.data_ptr(), _ext.DTYPE_FLOAT32, 3, 2, *(t.data_ptr() for t in out))


# Group sizes, each row naming its edge; K and N from (1, 3, 17).
GEMM_SIZES = [
    pytest.param((0,), id="one-empty-group"),
    pytest.param((1,), id="one-row"),
    pytest.param((7, 0, 1), id="empty-middle-group"),
    pytest.param((0, 7, 1, 0), id="empty-first-and-last"),
    pytest.param((3, 9, 1, 12, 7), id="tiles-straddle-groups"),
]
GEMM_DIMS = [pytest.param(1, 3, id="K1-N3"), pytest.param(17, 1, id="K17-N1"), pytest.param(3, 17, id="K3-N17")]
# The C++ tiles: forward/dX tasks of 64 sorted rows x 128 output columns in micro-tiles of 4 rows x 2 vectors
# (8 float32 / 4 float64 lanes); dW tasks of 16 x 256 outputs over blocks of 256 rows. Each row passes one.
TILE_CASES = [
    pytest.param((0, 300, 65, 1), 259, 131, id="rows-past-64-and-256_K-past-256_N-past-128"),
    pytest.param((64, 64, 129), 130, 257, id="row-chunks-exact-and-one-past_N-past-256"),
    pytest.param((257,), 9, 17, id="one-group-257-rows_K-off-the-lanes_N-past-16"),
    pytest.param((1, 256, 2), 256, 128, id="sizes-on-the-tiles"),
]
FLOAT_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
# Per-element bound rtol * |want| + atol * sum|terms| * sqrt(number of terms) (sparsemm_kernels.utils.testing).
# Measured worst (SPARSEMM_TOL_LOG over this module): float32 0.66 eps32 (dW), float64 0.71 eps64 (out)
# -> atol = 2 eps.
TOL = {dtype: Tol(rtol=0.0, atol=2 * EPS[dtype]) for dtype in (torch.float32, torch.float64)}
# (gather_a, scatter_c)
ROUTINGS = [
    pytest.param(False, False, id="sorted"),
    pytest.param(True, True, id="gather-scatter"),
    pytest.param(True, False, id="gather"),
    pytest.param(False, True, id="scatter"),
]


def _offsets(sizes) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def _gemm_ref(a, w, offsets, bias, rows, gather_a, scatter_c, transpose_w, out_rows):
    j_dim = w.shape[2] if transpose_w else w.shape[1]
    ref = torch.full((out_rows, j_dim), float("nan"), dtype=torch.float64)
    for g in range(w.shape[0]):
        pos = torch.arange(int(offsets[g]), int(offsets[g + 1]))
        wg = w[g].double() if transpose_w else w[g].double().t()
        y = a.double()[rows[pos] if gather_a else pos] @ wg
        if bias is not None:
            y = y + bias[g].double()
        ref[rows[pos] if scatter_c else pos] = y
    return ref


def _check_gemm(got, a, w, offsets, bias, rows, gather_a, scatter_c, transpose_w, what="out"):
    """``got`` vs the float64 loop, per element, scaled by the same loop on |operands| (see TOL)."""
    args = (offsets, rows, gather_a, scatter_c, transpose_w, got.shape[0])
    want = _gemm_ref(a, w, *args[:1], bias, *args[1:])
    terms = a.shape[1] + (bias is not None)
    scale = _gemm_ref(a.abs(), w.abs(), offsets, None if bias is None else bias.abs(), *args[1:]) * terms**0.5
    written = ~torch.isnan(want[:, 0]) if want.shape[1] else torch.ones(want.shape[0], dtype=torch.bool)
    assert_close_verbose(got[written], want[written], got.dtype, what, tol=TOL[got.dtype], scale=scale[written])


def _dw_ref(dy, x, offsets, rows, gathered):
    num_groups = offsets.numel() - 1
    dw = torch.zeros(num_groups, dy.shape[1], x.shape[1], dtype=torch.float64)
    db = torch.zeros(num_groups, dy.shape[1], dtype=torch.float64)
    for g in range(num_groups):
        pos = torch.arange(int(offsets[g]), int(offsets[g + 1]))
        rr = rows[pos] if gathered else pos
        dw[g] = dy.double()[rr].t() @ x.double()[rr]
        db[g] = dy.double()[rr].sum(0)
    return dw, db


def _check_dw(dw, db, dy, x, offsets, rows, gathered):
    ref_dw, ref_db = _dw_ref(dy, x, offsets, rows, gathered)
    abs_dw, abs_db = _dw_ref(dy.abs(), x.abs(), offsets, rows, gathered)
    terms = (offsets[1:] - offsets[:-1]).double().sqrt()
    assert_close_verbose(dw, ref_dw, dw.dtype, "dw", tol=TOL[dw.dtype], scale=abs_dw * terms[:, None, None])
    if db is not None:
        assert_close_verbose(db, ref_db, db.dtype, "db", tol=TOL[db.dtype], scale=abs_db * terms[:, None])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("gather_a, scatter_c", ROUTINGS)
@pytest.mark.parametrize("transpose_w", [False, True], ids=["xWt", "dyW"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k_dim, n_dim", GEMM_DIMS)
@pytest.mark.parametrize("sizes", GEMM_SIZES)
def test_grouped_gemm_cpu_matches_loop(sizes, k_dim, n_dim, with_bias, transpose_w, gather_a, scatter_c, dtype):
    gen = torch.Generator().manual_seed(_seed(sizes, k_dim, n_dim, with_bias, transpose_w))
    num_groups, m = len(sizes), sum(sizes)
    offsets = _offsets(sizes)
    a_cols, j_dim = (n_dim, k_dim) if transpose_w else (k_dim, n_dim)
    a = torch.randn(m, a_cols, generator=gen, dtype=dtype)
    w = torch.randn(num_groups, n_dim, k_dim, generator=gen, dtype=dtype)
    bias = torch.randn(num_groups, j_dim, generator=gen, dtype=dtype) if with_bias else None
    rows = torch.randperm(m, generator=gen)
    kwargs = dict(bias=bias, rows=rows, gather_a=gather_a, scatter_c=scatter_c, transpose_w=transpose_w)

    out = torch.full((m, j_dim), float("nan"), dtype=dtype)
    got = grouped_gemm_cpu(a, w, offsets, out=out, **kwargs)
    assert got is out
    assert not torch.isnan(out).any(), "some output rows were not written"
    _check_gemm(out, a, w, offsets, bias, rows, gather_a, scatter_c, transpose_w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("transpose_w", [False, True], ids=["xWt", "dyW"])
def test_grouped_gemm_cpu_strided_operands(dtype, transpose_w):
    """Transposed w (any strides), ``a`` a column slice (row stride > its width) and a column-major ``a``
    (copied), a column-strided bias, ``out`` a column slice of a wider buffer (nothing written outside it)."""
    gen = torch.Generator().manual_seed(3)
    sizes, k_dim, n_dim = (70, 0, 11), 17, 133
    offsets, m = _offsets(sizes), sum(sizes)
    a_cols, j_dim = (n_dim, k_dim) if transpose_w else (k_dim, n_dim)
    w = torch.randn(3, k_dim, n_dim, generator=gen, dtype=dtype).transpose(1, 2)  # (G, N, K), K-stride N
    bias = torch.randn(j_dim, 3, generator=gen, dtype=dtype).t()  # stride (1, G)
    for a in (
        torch.randn(m, a_cols + 4, generator=gen, dtype=dtype)[:, 2 : 2 + a_cols],
        torch.randn(a_cols, m, generator=gen, dtype=dtype).t(),
    ):
        wide = torch.full((m, j_dim + 5), float("nan"), dtype=dtype)
        out = wide[:, 1 : 1 + j_dim]
        grouped_gemm_cpu(a, w, offsets, bias=bias, out=out, transpose_w=transpose_w)
        _check_gemm(out, a, w, offsets, bias, None, False, False, transpose_w)
        assert torch.isnan(wide[:, 0]).all() and torch.isnan(wide[:, 1 + j_dim :]).all(), "wrote outside `out`"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sizes, k_dim, n_dim", TILE_CASES)
def test_cpu_gemms_across_tile_boundaries(sizes, k_dim, n_dim, dtype):
    """Forward, dX and dW (sorted and routed) past every C++ tile, with strided dY and x for dW."""
    gen = torch.Generator().manual_seed(_seed(sizes, k_dim, n_dim))
    offsets, m = _offsets(sizes), sum(sizes)
    x = torch.randn(m, k_dim, generator=gen, dtype=dtype)
    w = torch.randn(len(sizes), n_dim, k_dim, generator=gen, dtype=dtype)
    bias = torch.randn(len(sizes), n_dim, generator=gen, dtype=dtype)
    rows = torch.randperm(m, generator=gen)
    for routed in (False, True):
        y = grouped_gemm_cpu(x, w, offsets, bias=bias, rows=rows, gather_a=routed, scatter_c=routed)
        _check_gemm(y, x, w, offsets, bias, rows, routed, routed, False, "y")
        dx = grouped_gemm_cpu(y, w, offsets, rows=rows, gather_a=routed, scatter_c=routed, transpose_w=True)
        _check_gemm(dx, y, w, offsets, None, rows, routed, routed, True, "dx")
        dy = torch.randn(n_dim + 3, m, generator=gen, dtype=dtype).t()[:, 1 : 1 + n_dim]  # column-major slice
        xs = torch.randn(m, k_dim + 6, generator=gen, dtype=dtype)[:, 6:]  # row stride k_dim + 6
        dw, db = grouped_gemm_dw_cpu(dy, xs, offsets, rows=rows, gathered=routed, compute_dbias=True)
        _check_dw(dw, db, dy, xs, offsets, rows, routed)


def test_grouped_gemm_cpu_partial_cover_zeroes_unwritten_rows():
    """A scatter that covers only some output rows: allocated output is zero there; a given `out` is untouched."""
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int64)  # rows 4 and 5 of `a` belong to no group
    rows = torch.tensor([5, 0, 3, 2, 1, 4])
    got = grouped_gemm_cpu(a, w, offsets, rows=rows, gather_a=True, scatter_c=True)
    assert torch.equal(got[[1, 4]], torch.zeros(2, 4, dtype=torch.float64))
    _check_gemm(got, a, w, offsets, None, rows, True, True, False)
    out = torch.full((6, 4), float("nan"), dtype=torch.float64)
    grouped_gemm_cpu(a, w, offsets, rows=rows, gather_a=True, scatter_c=True, out=out)
    assert torch.isnan(out[[1, 4]]).all()
    assert torch.equal(out[[5, 0, 3, 2]], got[[5, 0, 3, 2]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("gathered", [False, True], ids=["sorted", "gathered"])
@pytest.mark.parametrize("compute_dbias", [False, True], ids=["nodb", "db"])
@pytest.mark.parametrize("k_dim, n_dim", GEMM_DIMS)
@pytest.mark.parametrize("sizes", GEMM_SIZES)
def test_grouped_gemm_dw_cpu_matches_loop(sizes, k_dim, n_dim, compute_dbias, gathered, dtype):
    gen = torch.Generator().manual_seed(_seed(sizes, k_dim, n_dim, "dw"))
    m = sum(sizes)
    offsets = _offsets(sizes)
    dy = torch.randn(m, n_dim, generator=gen, dtype=dtype)
    x = torch.randn(m, k_dim, generator=gen, dtype=dtype)
    rows = torch.randperm(m, generator=gen)
    dw, db = grouped_gemm_dw_cpu(dy, x, offsets, rows=rows, gathered=gathered, compute_dbias=compute_dbias)
    assert dw.shape == (len(sizes), n_dim, k_dim) and dw.dtype == dtype
    _check_dw(dw, db, dy, x, offsets, rows, gathered)
    empty = [g for g, s in enumerate(sizes) if s == 0]
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty])), "empty groups must give exact zeros"
    if compute_dbias:
        assert db.shape == (len(sizes), n_dim) and db.dtype == dtype
        assert torch.equal(db[empty], torch.zeros_like(db[empty]))
    else:
        assert db is None


_THREADS_SCRIPT = """
import sys, torch
from sparsemm_kernels.kernels.cpu import grouped_gemm_cpu, grouped_gemm_dw_cpu
gen = torch.Generator().manual_seed(0)
sizes = [37, 0, 101, 64, 5]
offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
m = sum(sizes)
a = torch.randn(m, 300, generator=gen)
w = torch.randn(len(sizes), 700, 300, generator=gen)
rows = torch.randperm(m, generator=gen)
y = grouped_gemm_cpu(a, w, offsets, rows=rows, gather_a=True, scatter_c=True)
dx = grouped_gemm_cpu(y, w, offsets, transpose_w=True)
dw, db = grouped_gemm_dw_cpu(y, a, offsets, rows=rows, gathered=True, compute_dbias=True)
torch.save([y, dx, dw, db], sys.argv[1])
"""


def assert_same_on_1_and_3_threads(script: str, tmp_path) -> None:
    """Run ``script`` (it saves a list of tensors to ``sys.argv[1]``) in a child with 1 and with 3 OpenMP threads:
    every tensor must come out bit for bit the same."""
    results = []
    for threads in ("1", "3"):
        path = tmp_path / f"t{threads}.pt"
        # The child must import the same sparsemm_kernels (source tree or install) as this process.
        pkg_root = str(Path(_ext.__file__).resolve().parents[1])
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=pkg_root)
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True, timeout=300)
        results.append(torch.load(path))
    for one, many in zip(*results):
        assert torch.equal(one, many)


def test_cpu_gemm_results_do_not_depend_on_thread_count(tmp_path):
    assert_same_on_1_and_3_threads(_THREADS_SCRIPT, tmp_path)


def _gemm_args(dtype=torch.float32):
    a = torch.randn(4, 3, dtype=dtype)
    w = torch.randn(2, 5, 3, dtype=dtype)
    return a, w, torch.tensor([0, 1, 4])


@pytest.mark.parametrize(
    "change, exc, name",
    [
        pytest.param(dict(a=torch.randn(4, 3, dtype=torch.float16)), TypeError, "`a`", id="a-fp16"),
        pytest.param(dict(a=torch.randn(4, 3, 1)), ValueError, "`a`", id="a-3d"),
        pytest.param(dict(a=torch.randn(4, 2)), ValueError, "`a`", id="a-wrong-K"),
        pytest.param(dict(w=torch.randn(2, 5, 3, dtype=torch.float64)), TypeError, "`w`", id="w-dtype"),
        pytest.param(dict(w=torch.randn(10, 3)), ValueError, "`w`", id="w-2d"),
        pytest.param(dict(offsets=torch.tensor([0, 1, 4], dtype=torch.int32)), TypeError, "`offsets`", id="off-int32"),
        pytest.param(dict(offsets=torch.tensor([0, 4])), ValueError, "`offsets`", id="off-length"),
        pytest.param(dict(offsets=torch.tensor([0, 3, 2])), ValueError, "`offsets`", id="off-decreasing"),
        pytest.param(dict(offsets=torch.tensor([0, 1, 5])), ValueError, "`offsets`", id="off-past-end"),
        pytest.param(dict(bias=torch.randn(2, 4)), ValueError, "`bias`", id="bias-shape"),
        pytest.param(dict(bias=torch.randn(2, 5, dtype=torch.float64)), TypeError, "`bias`", id="bias-dtype"),
        pytest.param(dict(out=torch.empty(4, 6)), ValueError, "`out`", id="out-shape"),
        pytest.param(dict(out=torch.empty(5, 4).t()), ValueError, "`out`", id="out-col-stride"),
        pytest.param(dict(gather_a=True), ValueError, "`rows`", id="rows-missing"),
        pytest.param(dict(gather_a=True, rows=torch.tensor([0, 1, 2, 4])), ValueError, "`rows`", id="rows-range"),
        pytest.param(dict(scatter_c=True, rows=torch.tensor([0, 1, 1, 3])), ValueError, "`rows`", id="rows-dup"),
        pytest.param(
            dict(gather_a=True, rows=torch.tensor([0, 1, 2, 3], dtype=torch.int32)),
            TypeError,
            "`rows`",
            id="rows-int32",
        ),
    ],
)
def test_grouped_gemm_cpu_rejects_bad_arguments(change, exc, name):
    a, w, offsets = _gemm_args()
    args = dict(a=a, w=w, offsets=offsets)
    args.update(change)
    with pytest.raises(exc, match=name):
        grouped_gemm_cpu(args.pop("a"), args.pop("w"), args.pop("offsets"), **args)


def test_grouped_gemm_dw_cpu_rejects_bad_arguments():
    dy, x, offsets = torch.randn(4, 5), torch.randn(4, 3), torch.tensor([0, 1, 4])
    with pytest.raises(TypeError, match="`x`"):
        grouped_gemm_dw_cpu(dy, x.double(), offsets)
    with pytest.raises(ValueError, match="`x`"):
        grouped_gemm_dw_cpu(dy, x[:3], offsets)
    with pytest.raises(TypeError, match="`dy`"):
        grouped_gemm_dw_cpu(dy.to(torch.bfloat16), x, offsets)
    with pytest.raises(ValueError, match="`offsets`"):
        grouped_gemm_dw_cpu(dy, x, torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="`rows`"):
        grouped_gemm_dw_cpu(dy, x, offsets, gathered=True)
    # One operand gathered, the other read at the positions: positions past its rows are refused (they read past
    # its end), in Python and in C++.
    rows, far = torch.tensor([0, 3, 1, 2] * 16), torch.tensor([0, 64])
    for flags in ((True, False), (False, True)):
        with pytest.raises(ValueError, match="`offsets`"):
            grouped_gemm_dw_cpu(dy, x, far, rows=rows, gather_dy=flags[0], gather_x=flags[1])
        dw = torch.empty(1, 5, 3)
        with pytest.raises(ValueError, match="`offsets`"):
            C.grouped_gemm_dw_cpu(dy.data_ptr(), 5, x.data_ptr(), 3, dw.data_ptr(), 0, far.data_ptr(),
                                  rows.data_ptr(), *flags, 1, 5, 3, 4, 64, _ext.DTYPE_FLOAT32)
    both = grouped_gemm_dw_cpu(dy, x, far, rows=rows, gather_dy=True, gather_x=True)[0]  # both gathered: fine
    torch.testing.assert_close(both[0], dy[rows].t() @ x[rows])


def test_grouped_gemm_cpu_refuses_out_sharing_a():
    a, w = torch.randn(4, 3), torch.randn(1, 3, 3)
    with pytest.raises(ValueError, match="`out` must not share memory with `a`"):
        grouped_gemm_cpu(a, w, torch.tensor([0, 4]), out=a)


def test_grouped_gemm_cpu_unchecked_scatter_leaves_no_row_unwritten():
    # check_rows=False with a repeated scattered row: some output row has no writer; it is zero, not heap contents.
    a, w = torch.randn(4, 3), torch.randn(1, 5, 3)
    rows = torch.tensor([0, 0, 1, 2])
    for _ in range(3):
        out = grouped_gemm_cpu(a, w, torch.tensor([0, 4]), rows=rows, scatter_c=True, check_rows=False)
        assert torch.equal(out[3], torch.zeros(5))


def test_cpp_checks_name_the_argument():
    """The C++ layer's own checks (the last line of defence behind the Python launchers)."""
    a, w, _ = _gemm_args()
    c = torch.empty(4, 5)
    good = torch.tensor([0, 1, 4])
    args = [a.data_ptr(), 3, w.data_ptr(), 15, 1, 3, 0, 0, c.data_ptr(), 5]
    sizes = [2, 3, 5, 4, 4, 4]  # groups, k, j, rows of A, rows of C, positions
    with pytest.raises(ValueError, match="`dtype`"):
        C.grouped_gemm_cpu(*args, good.data_ptr(), 0, False, False, *sizes, _ext.DTYPE_FLOAT16)
    bad = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match="`offsets`"):
        C.grouped_gemm_cpu(*args, bad.data_ptr(), 0, False, False, *sizes, _ext.DTYPE_FLOAT32)
    past_end = torch.tensor([0, 3, 9])
    with pytest.raises(ValueError, match="`offsets`"):
        C.grouped_gemm_cpu(*args, past_end.data_ptr(), 0, False, False, *sizes, _ext.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="`num_positions`"):  # more positions than rows, no `rows` to map them
        C.grouped_gemm_cpu(*args, good.data_ptr(), 0, False, False, 2, 3, 5, 4, 4, 9, _ext.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="`rows`"):
        C.grouped_gemm_cpu(*args, good.data_ptr(), 0, True, False, *sizes, _ext.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="`dtype`"):
        C.grouped_gemm_dw_cpu(0, 0, 0, 0, 0, 0, good.data_ptr(), 0, False, False, 2, 1, 1, 4, 4, _ext.DTYPE_INT64)


# ---- CUDA (compiled on any machine with nvcc, run only where there is a GPU) ----


@pytest.mark.skipif(not _ext.has_cuda_ops(), reason="_C built without CUDA ops")
def test_cuda_entry_points_check_arguments_before_touching_a_device():
    with pytest.raises(ValueError, match="`ids`"):
        C.group_plan_cuda_workspace_bytes(10, 2, _ext.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="`num_groups`"):
        C.group_plan_cuda_workspace_bytes(10, 0, _ext.DTYPE_INT64)
    from sparsemm_kernels.kernels.cuda import group_plan_cuda

    with pytest.raises(ValueError, match="`ids`"):
        group_plan_cuda(torch.zeros(3, dtype=torch.int64), 2)


@pytest.mark.skipif(not _ext.has_cuda_ops() or torch.cuda.is_available(), reason="needs CUDA ops and no GPU")
def test_cuda_errors_become_runtime_errors_without_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.group_plan_cuda_workspace_bytes(10, 2, _ext.DTYPE_INT64)


def _cuda_plan():
    from sparsemm_kernels.kernels.cuda import group_plan_cuda

    return group_plan_cuda


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("n, num_groups, pattern", PLAN_CASES)
def test_group_plan_cuda_matches_torch(n, num_groups, pattern, dtype):
    ids = _make_ids(n, num_groups, pattern, dtype, seed=n * 131 + num_groups).cuda()
    sorted_to_orig, counts, offsets, invalid = _cuda_plan()(ids, num_groups)
    for got, want in zip((sorted_to_orig, counts, offsets), _plan_ref(ids, num_groups)):
        assert got.dtype == torch.int64 and got.device == ids.device
        assert torch.equal(got, want)
    assert invalid.shape == () and int(invalid) == 0


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", ID_DTYPES)
def test_group_plan_cuda_counts_invalid_ids(dtype):
    num_groups = 5
    ids = _make_ids(300, num_groups, "random", dtype, seed=5)
    ids[[0, 17, 299]] = torch.tensor([-1, num_groups, 2**31 - 1], dtype=dtype)
    sorted_to_orig, counts, offsets, invalid = _cuda_plan()(ids.cuda(), num_groups)
    assert int(invalid) == 3
    # Invalid ids are sorted as the nearest valid id: the plan stays a full permutation.
    keys = ids.long().clamp(0, num_groups - 1)
    assert torch.equal(counts.cpu(), torch.bincount(keys, minlength=num_groups))
    assert int(offsets[-1]) == 300
    assert torch.equal(sorted_to_orig.cpu(), torch.sort(keys, stable=True).indices)


@pytest.mark.gpu
@needs_cuda_ops
def test_group_plan_cuda_large_n_on_side_stream():
    n, num_groups = 1 << 20, 3
    ids = _make_ids(n, num_groups, "random", torch.int64, seed=1).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = _cuda_plan()(ids, num_groups)
    torch.cuda.synchronize()
    for got, want in zip(result[:3], _plan_ref(ids.cpu(), num_groups)):
        assert torch.equal(got.cpu(), want)
    assert int(result[3]) == 0


@pytest.mark.gpu
@needs_cuda_ops
def test_group_plan_cuda_many_groups_use_global_histogram():
    n, num_groups = 5000, 10000  # above the shared-memory histogram limit
    ids = _make_ids(n, num_groups, "random", torch.int32, seed=2).cuda()
    for got, want in zip(_cuda_plan()(ids, num_groups)[:3], _plan_ref(ids, num_groups)):
        assert torch.equal(got, want)
