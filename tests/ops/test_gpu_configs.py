"""Every GPU tile config of the Triton kernels, each run under the interpreter on small shapes off the tiles.

On a GPU the grouped GEMMs autotune over the per-class lists of ``kernels/triton/configs.py``, and the norm,
SwiGLU and plan launchers pick GPU tiles of their own; the rest of the CPU suite runs the small interpreter
tiles only. Here each GPU config is forced in turn through the real launchers -- fp32 for every list, fp16 for
the 16-bit one -- and checked against float64 with the tolerances of ``test_grouped_mm.py`` /
``test_norms.py`` / ``test_swiglu.py``: masks, swizzle bands, group boundaries, the dW row split, the multi-step
group search and the norms' column chunks of the real tiles all run on the CPU. (The interpreter ignores
``num_warps`` / ``num_stages``; ``python -m benchmarks.aot`` compiles those.)
"""

from __future__ import annotations

import pytest
import torch

from sparsemm_kernels.kernels.triton import configs
from sparsemm_kernels.kernels.triton import grouped_gemm as gg
from sparsemm_kernels.utils.checks import sanitized_offsets
from sparsemm_kernels.utils.device import is_interpreting
from sparsemm_kernels.utils.testing import EPS, EPS32, Tol, assert_close_verbose, offsets_from_counts

pytestmark = pytest.mark.skipif(not is_interpreting() or torch.cuda.is_available(),
                                reason="interpreter runs of the GPU configs (a GPU runs them in test_gpu_kernels)")

FP16 = torch.float16
# tests/ops/test_grouped_mm.py: float32 3.5 eps32 * scale * sqrt(L); float16 adds 1.5 eps16 * |want|.
# fp16 floor: a result that underflows into fp16's subnormals is off by up to half a subnormal spacing (2^-24).
FP16_FLOOR = 1.5 * torch.finfo(FP16).smallest_normal * EPS[FP16]
GEMM_TOL = {torch.float32: Tol(rtol=0.0, atol=3.5 * EPS32),
            FP16: Tol(rtol=1.5 * EPS[FP16], atol=3.5 * EPS32, floor=FP16_FLOOR)}

# Rows per group (an empty one, one far past every BLOCK_M, one of a few rows), K and N off most tiles: K = 96
# is a whole number of 16- and 32-deep steps but not of 64, N = 136 crosses every column tile.
COUNTS = [150, 0, 70, 5]
K, N = 96, 136


def _cases(lists):
    """(class, index, dtype) of every config: fp32 for all lists, fp16 for the 16-bit list too."""
    out = []
    for cls, lst in lists.items():
        for i in range(len(lst)):
            out.append((cls, i, torch.float32))
            if cls == "16bit":
                out.append((cls, i, FP16))
    return out


def _ids(case):
    cls, i, dtype = case
    return f"{cls}-{i}-{str(dtype).split('.')[-1]}"


def _force(monkeypatch, tuner, config):
    """Autotuner ``tuner`` runs ``config`` alone (one config: no pruning, no benchmarking)."""
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})


def _plan(counts, seed=0):
    """Offsets of ``counts`` and a random permutation as the plan's rows (gather / scatter through it)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(counts)
    return offsets_from_counts(counts), torch.randperm(T, generator=g)


def _gemm_truth(a, w, offsets, rows, bias, gather, scatter, transpose_w):
    """float64 ``C[c_r] = A[a_r] @ B_g + bias_g`` and its per-element scale ``sum_k |A| |B| + |bias|``."""
    bounds = offsets.tolist()
    a64, w64 = a.double(), w.double()
    J = w.shape[2] if transpose_w else w.shape[1]
    want = torch.zeros(a.shape[0], J, dtype=torch.float64)
    scale = torch.zeros_like(want)
    for g in range(w.shape[0]):
        pos = torch.arange(bounds[g], bounds[g + 1])
        src = rows[pos] if gather else pos
        dst = rows[pos] if scatter else pos
        b = w64[g] if transpose_w else w64[g].t()
        want[dst] = a64[src] @ b + (bias[g].double() if bias is not None else 0)
        scale[dst] = a64[src].abs() @ b.abs() + (bias[g].double().abs() if bias is not None else 0)
    return want, scale


@pytest.mark.parametrize("case", _cases(configs._GEMM), ids=_ids)
def test_forward_and_dx_with_each_gpu_config(case, monkeypatch):
    cls, i, dtype = case
    _force(monkeypatch, gg._grouped_gemm_kernel, configs._GEMM[cls][i])
    torch.manual_seed(i)
    offsets, rows = _plan(COUNTS)
    T, G = sum(COUNTS), len(COUNTS)
    tol = GEMM_TOL[dtype]
    w = (torch.randn(G, N, K) / K**0.5).to(dtype)
    bias = torch.randn(G, N).to(dtype)
    # Forward, routed: gather on load, scatter on store, with a bias.
    x = torch.randn(T, K).to(dtype)
    got = gg.grouped_gemm(x, w, offsets, bias=bias, rows=rows, gather_a=True, scatter_c=True)
    want, scale = _gemm_truth(x, w, offsets, rows, bias, True, True, False)
    assert_close_verbose(got, want, dtype, "forward", tol=tol, scale=scale * K**0.5)
    # dX, sorted rows: C = dY @ W[g] (K output columns, N deep).
    dy = torch.randn(T, N).to(dtype)
    got = gg.grouped_gemm(dy, w, offsets, transpose_w=True)
    want, scale = _gemm_truth(dy, w, offsets, rows, None, False, False, True)
    assert_close_verbose(got, want, dtype, "dX", tol=tol, scale=scale * N**0.5)


def _dw_truth(dy, x, bounds, rows, gather):
    """float64 ``dW[g] = dY_g^T X_g``, ``db[g] = sum dY_g`` and their scales ``|dY|^T |X| sqrt(c)``,
    ``sum |dY| sqrt(c)``."""
    G = len(bounds) - 1
    d64, x64 = dy.double(), x.double()
    dw = torch.zeros(G, dy.shape[1], x.shape[1], dtype=torch.float64)
    db = torch.zeros(G, dy.shape[1], dtype=torch.float64)
    s_dw, s_db = torch.zeros_like(dw), torch.zeros_like(db)
    for g in range(G):
        pos = torch.arange(bounds[g], bounds[g + 1])
        src = rows[pos] if gather else pos
        root = max(len(pos), 1) ** 0.5
        dw[g], db[g] = d64[src].t() @ x64[src], d64[src].sum(0)
        s_dw[g], s_db[g] = d64[src].abs().t() @ x64[src].abs() * root, d64[src].abs().sum(0) * root
    return dw, db, s_dw, s_db


@pytest.mark.parametrize("case", _cases(configs._GEMM_DW), ids=_ids)
def test_dw_with_each_gpu_config_whole_groups_and_row_split(case, monkeypatch):
    """Each dW config twice: one program per group (SMs fewer than the tiles) and the rows split into chunks
    summed by the reduce kernel (SMs more than the tiles)."""
    cls, i, dtype = case
    _force(monkeypatch, gg._grouped_gemm_dw_kernel, configs._GEMM_DW[cls][i])
    torch.manual_seed(i)
    offsets, rows = _plan(COUNTS)
    T, G = sum(COUNTS), len(COUNTS)
    dy, x = torch.randn(T, N).to(dtype), torch.randn(T, K).to(dtype)
    dw_want, db_want, s_dw, s_db = _dw_truth(dy, x, offsets.tolist(), rows, gather=True)
    for sms in (1, 64):
        monkeypatch.setattr(gg, "_device_sms", lambda device, sms=sms: sms)
        splits = gg.dw_row_splits(T, G, N, K, sms)
        assert (splits > 1) == (sms == 64)
        dw, db = gg.grouped_gemm_dw(dy, x, offsets, rows=rows, gathered=True, compute_dbias=True)
        assert_close_verbose(dw, dw_want, dtype, f"dW ({splits} row chunks)", tol=GEMM_TOL[dtype], scale=s_dw)
        assert_close_verbose(db, db_want, dtype, f"db ({splits} row chunks)", tol=GEMM_TOL[dtype], scale=s_db)
        assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(db[1]) == 0  # the empty group


@pytest.mark.parametrize("bad", [[0, 90, 40, 200, -5, 150], [0, 150, 150, 150, 150, 150], [0, -3, 10, 7, 7, 300]],
                         ids=["decreasing", "one-group", "out-of-range"])
def test_dw_row_split_reads_offsets_as_sanitized(bad, monkeypatch):
    """Split dW (pieces located by a search of the sanitized bounds) on offsets a validate=False caller may
    pass: the result is that of ``utils.checks.sanitized_offsets`` (the torch backend's reading)."""
    monkeypatch.setattr(gg, "_device_sms", lambda device: 64)
    T, G = 150, len(bad) - 1
    torch.manual_seed(1)
    dy, x = torch.randn(T, 40), torch.randn(T, 24)
    assert gg.dw_row_splits(T, G, 40, 24, 64) > 1
    offsets = torch.tensor(bad)
    dw, db = gg.grouped_gemm_dw(dy, x, offsets, compute_dbias=True)
    dw_want, db_want, s_dw, s_db = _dw_truth(dy, x, sanitized_offsets(offsets, T).tolist(), None, gather=False)
    assert_close_verbose(dw, dw_want, torch.float32, "dW", tol=GEMM_TOL[torch.float32], scale=s_dw)
    assert_close_verbose(db, db_want, torch.float32, "db", tol=GEMM_TOL[torch.float32], scale=s_db)


@pytest.mark.parametrize("G", [12, 40])
def test_group_search_in_several_steps(G, monkeypatch):
    """The tile -> group search (forward) and the piece -> group search (split dW) with 4 lanes per step:
    G = 12 takes two steps, G = 40 three (on a GPU: 16..256 lanes, two steps past 256 groups)."""
    monkeypatch.setattr(gg, "_MIN_FANOUT", 4)
    monkeypatch.setattr(gg, "_MAX_FANOUT", 4)
    monkeypatch.setattr(gg, "_device_sms", lambda device: 1 << 20)
    assert gg._search_shape(G)["STEPS"] == (2 if G == 12 else 3)
    g = torch.Generator().manual_seed(G)
    counts = torch.randint(0, 4, (G,), generator=g)
    counts[torch.randperm(G, generator=g)[: G // 3]] = 0  # runs of empty groups
    counts[G // 2] = 97  # one group over several row tiles
    counts = counts.tolist()
    offsets, rows = _plan(counts, seed=G)
    T = sum(counts)
    w = torch.randn(G, 12, 20)
    x = torch.randn(T, 20)
    got = gg.grouped_gemm(x, w, offsets, rows=rows, gather_a=True, scatter_c=True)
    want, scale = _gemm_truth(x, w, offsets, rows, None, True, True, False)
    assert_close_verbose(got, want, torch.float32, "forward", tol=GEMM_TOL[torch.float32], scale=scale * 20**0.5)
    dy = torch.randn(T, 12)
    assert gg.dw_row_splits(T, G, 12, 20, 1 << 20) > 1
    dw, _ = gg.grouped_gemm_dw(dy, x, offsets, rows=rows, gathered=True)
    dw_want, _, s_dw, _ = _dw_truth(dy, x, offsets.tolist(), rows, gather=True)
    assert_close_verbose(dw, dw_want, torch.float32, "dW", tol=GEMM_TOL[torch.float32], scale=s_dw)


# ---- norms: the GPU widths, and every column-chunk path with narrow chunks ------------------------------------


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("D", [4100, 16400], ids=["bwd-chunked", "both-chunked"])
def test_norm_gpu_widths(norm, D):
    """Rows wider than one block at the GPU's widths: D = 4100 is two 4096-wide backward chunks (the forward one
    8192-wide block), D = 16400 five 4096-wide chunks in both (forward past 8192 columns)."""
    from sparsemm_kernels.kernels.triton import norms
    from tests.ops.test_norms import _params, _x, check_against_truth

    assert norms._block_d(D, norms._BWD_MAX_BLOCK_D) < D
    assert (norms._block_d(D, norms._FWD_MAX_BLOCK_D) < D) == (D > 8192)
    torch.manual_seed(D)
    ids = torch.tensor([2, 0, 2, 1, 2])
    x = _x((5, D), torch.float32, "cpu")
    w, b = _params(norm, 3, D, torch.float32, "cpu")
    check_against_truth(norm, x, ids, w, b, torch.float32, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, FP16], ids=str)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_chunked_paths_with_narrow_chunks(norm, dtype, monkeypatch):
    """Forward chunks of 32 and backward chunks of 16 columns: row statistics over several chunks (and the
    backward's row-statistics kernel), per-head ids, many modalities (chunked one-hot), D off the chunk."""
    from sparsemm_kernels.kernels.triton import norms
    from tests.ops.test_norms import _params, _x, check_against_truth

    monkeypatch.setattr(norms, "_FWD_MAX_BLOCK_D", 32)
    monkeypatch.setattr(norms, "_BWD_MAX_BLOCK_D", 16)
    torch.manual_seed(3)
    for shape, ids_shape, M in (((23, 100), (23,), 3), ((6, 3, 40), (6,), 2), ((9, 33), (9,), 70)):
        ids = torch.randint(0, M, ids_shape)
        x = _x(shape, dtype, "cpu")
        w, b = _params(norm, M, shape[-1], dtype, "cpu")
        check_against_truth(norm, x, ids, w, b, dtype, "triton")


# ---- SwiGLU and the plan: the launchers' GPU tiles -------------------------------------------------------------


@pytest.mark.parametrize("H", [1, 100, 1100])
def test_swiglu_gpu_tiles(H, monkeypatch):
    """GPU tiles (4096 elements, up to 1024 columns): H = 1 -> 16 x 256, 100 -> 128 x 32, 1100 -> 1024 x 4."""
    from sparsemm_kernels import swiglu
    from sparsemm_kernels.kernels.triton import swiglu as kernels
    from tests.ops.test_swiglu import _check

    monkeypatch.setattr(kernels, "is_interpreting", lambda: False)
    block_r, block_h, _ = kernels._tiles(H)
    assert block_r * block_h == 4096
    torch.manual_seed(H)
    x = torch.randn(37, 2 * H).requires_grad_(True)
    _check(x, swiglu(x, backend="triton"), torch.float32)


@pytest.mark.parametrize("n,G", [(2500, 2), (1000, 3), (300, 64), (300, 700), (200, 4096)])
def test_plan_gpu_chunks(n, G, monkeypatch):
    """GPU chunk sizes (8192 / next_pow2(G), 16..1024 rows): the one-hot rank for few groups, the pairwise
    rank for many (G = 700, 4096: 16-row chunks)."""
    from sparsemm_kernels.kernels.triton import group_plan

    monkeypatch.setattr(group_plan, "is_interpreting", lambda: False)
    g = torch.Generator().manual_seed(n + G)
    ids = torch.randint(0, G, (n,), generator=g)
    sorted_to_orig, counts, offsets = group_plan.group_plan_triton(ids, G)
    assert torch.equal(sorted_to_orig, torch.sort(ids, stable=True).indices)
    assert torch.equal(counts, torch.bincount(ids, minlength=G))
    assert offsets[-1] == n
