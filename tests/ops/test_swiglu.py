"""swiglu (silu(a) * b over a fused gate/up projection) on every backend vs an independent float64 truth.

The truth is ``a / (1 + exp(-a)) * b`` written out here (the ``torch`` backend is ``reference.swiglu_ref``,
``F.silu``), differentiated by autograd. Every element is checked against
``rtol * |want| + atol * scale + floor`` (see ``sparsemm_kernels.utils.testing``) with the scales of
:func:`_scales`; no sums, so no accumulation length.
"""

import pytest
import torch

from sparsemm_kernels.backend import BackendUnavailableError, unsupported_reasons
from sparsemm_kernels.ops.swiglu import swiglu
from sparsemm_kernels.utils.testing import EPS, EPS32, Tol, assert_close_verbose

FP16, BF16 = torch.float16, torch.bfloat16

# Shapes of gate_up (..., 2H). Interpreter tiles are 256 elements at most 16 columns wide; GPU tiles 4096
# elements at most 1024 columns wide: sizes are chosen off both.
CASES = [
    (0, 8),              # R = 0: nothing launched, empty result and gradient
    (4, 0),              # H = 0
    (1, 2),              # one row, H = 1
    (6,),                # 1-D input, H = 3
    (7, 6),              # H = 3, far below a tile
    (50, 74),            # H = 37: off the interpreter tile; 50 rows = 3 row tiles + 2
    (300, 10),           # narrow H: many rows per program, rows off the GPU tile (256)
    (3, 2 * 1030),       # H = 1030: one past the GPU tile width, 65 interpreter column tiles
    (2, 9, 38),          # 3-D (B, S, 2H), H = 19
    (2, 3, 4, 32),       # 4-D, H = 16 exactly one interpreter tile wide
]
DTYPES = [torch.float32, FP16, BF16]
BACKENDS = ["triton", "cpu", "torch"]


def _subnormal(dtype):
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


# Measured worst ratios over this module (SPARSEMM_TOL_LOG; interpreter and CPU torch):
# * float32: err <= 1.34 eps32 * scale (d_gate_up; out 1.11) -> atol = 4 eps32.
# * float16: one float32 computation rounded once: (err - atol term) <= 0.50 eps16 |want| -> rtol = 1.5 eps16;
#   bfloat16 0.99 eps (the interpreter rounds toward zero, see test_grouped_mm) -> rtol = 3 eps.
# * floor: 1.5 subnormal spacings of the dtype (rounding a result that underflows is off by half of one).
TOL = {
    torch.float32: Tol(rtol=0.0, atol=4 * EPS32, floor=1.5 * _subnormal(torch.float32)),
    FP16: Tol(rtol=1.5 * EPS[FP16], atol=4 * EPS32, floor=1.5 * _subnormal(FP16)),
    BF16: Tol(rtol=3 * EPS[BF16], atol=4 * EPS32, floor=1.5 * _subnormal(BF16)),
}


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("swiglu", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _truth(gate_up):
    """``a / (1 + exp(-a)) * b`` in float64 (differentiable)."""
    h = gate_up.shape[-1] // 2
    a, b = gate_up[..., :h], gate_up[..., h:]
    return a / (1 + torch.exp(-a)) * b


def _scales(gate_up, dy):
    """Per-element magnitudes of what makes out, da and db (float64).

    ``s = sigmoid(a)`` from ``exp(-a)`` in float32 is off by ``eps (1 + |a|) (1 - s)`` relatively (the argument
    ``-a`` scaled by log2(e) is rounded); ``1 + a (1 - s)`` in ``da`` cancels near ``a = -1.28``. So
    out: ``|y| k``, db: ``|dy a s| k``, da: ``|dy b| s (1 + |a|) k`` with ``k = 1 + (1 + |a|)(1 - s)``.
    """
    g = gate_up.detach().double()
    h = g.shape[-1] // 2
    a, b = g[..., :h], g[..., h:]
    d = dy.detach().double()
    s = torch.sigmoid(a)
    k = 1 + (1 + a.abs()) * (1 - s)
    s_out = (a * s * b).abs() * k
    s_da = (d * b).abs() * s * (1 + a.abs()) * k
    s_db = (d * a * s).abs() * k
    return s_out, torch.cat([s_da, s_db], dim=-1)


def _check(leaf, out, dtype, dy=None, view=lambda t: t, tol=None):
    """Forward and d(leaf) of ``out = swiglu(view(leaf))`` against the truth; returns the gradient.

    ``view`` maps the leaf (a wider buffer) to the op's input, for strided layouts.
    """
    tol = TOL[dtype] if tol is None else tol
    assert out.dtype == dtype
    leaf64 = leaf.detach().double().requires_grad_(True)
    want = _truth(view(leaf64))
    if dy is None:
        dy = torch.randn(want.shape, device=want.device).to(dtype)
    s_out, s_grad_view = _scales(view(leaf.detach()), dy)
    assert_close_verbose(out, want, dtype, "out", tol=tol, scale=s_out)
    (grad,) = torch.autograd.grad(out, [leaf], dy)
    (want_grad,) = torch.autograd.grad(want, [leaf64], dy.double())
    # The scale of the leaf's gradient: the view's scale where the view reads, zero elsewhere (exact zeros).
    s_leaf = torch.zeros_like(leaf64)
    view(s_leaf).copy_(s_grad_view)
    assert grad.dtype == dtype
    assert_close_verbose(grad, want_grad, dtype, "d_gate_up", tol=tol, scale=s_leaf)
    return grad


def _leaf(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_truth(shape, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    x = _leaf(shape, dtype, device)
    out = swiglu(x, backend=backend)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    _check(x, out, dtype)


def _col_slice(R, H, device):  # row stride 2H + 5, unit column stride: runs without a copy
    return torch.randn(R, 2 * H + 5, device=device), lambda t: t[:, : 2 * H]


def _row_step(R, H, device):  # every other row of a taller buffer
    return torch.randn(2 * R, 2 * H, device=device), lambda t: t[::2]


def _transposed_slice(R, H, device):  # column stride R: the launcher makes it contiguous
    return torch.randn(2 * H + 3, R, device=device), lambda t: t.t()[:, : 2 * H]


def _sliced_3d(R, H, device):  # (B, S, 2H) slice of (B, S, 2H + 4): leading dims merge into one row stride
    return torch.randn(3, R, 2 * H + 4, device=device), lambda t: t[:, :, : 2 * H]


def _permuted_3d(R, H, device):  # (B, S, 2H) with B and S swapped in memory: leading dims do not merge
    return torch.randn(R, 3, 2 * H, device=device), lambda t: t.transpose(0, 1)


LAYOUTS = [_col_slice, _row_step, _transposed_slice, _sliced_3d, _permuted_3d]


def _dy_transposed(shape, dtype, device):  # every dim reversed in memory: column stride != 1, copied
    return torch.randn(shape[::-1], device=device).to(dtype).permute(*reversed(range(len(shape))))


def _dy_row_padded(shape, dtype, device):  # a column slice of a wider buffer: row stride > H, read in place
    return torch.randn(*shape[:-1], shape[-1] + 7, device=device).to(dtype)[..., 3 : 3 + shape[-1]]


def _dy_expanded(shape, dtype, device):  # stride 0 in every leading dim (grad of a sum over rows)
    return torch.randn(shape[-1], device=device).to(dtype).expand(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dy_layout", [_dy_transposed, _dy_row_padded, _dy_expanded], ids=lambda f: f.__name__[4:])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__.strip("_"))
def test_non_contiguous_input_and_dy(layout, dy_layout, dtype, backend, device):
    """The gradient reaches the wider buffer through the view, in the right places (exact zeros elsewhere)."""
    _skip_unless_runs(backend, device, dtype)
    base, view = layout(11, 37, device)
    big = base.to(dtype).requires_grad_(True)
    gate_up = view(big)
    assert not gate_up.is_contiguous()
    out = swiglu(gate_up, backend=backend)
    dy = dy_layout(tuple(out.shape), dtype, device)
    assert not dy.is_contiguous()
    _check(big, out, dtype, dy=dy, view=view)


def test_row_strided_input_is_not_copied():
    from sparsemm_kernels.kernels.triton.swiglu import _rows

    big = torch.randn(2, 9, 80)
    gate_up = big[:, :, :74]
    assert _rows(gate_up, 74).data_ptr() == gate_up.data_ptr()
    assert _rows(big.transpose(0, 1)[:, :, :74], 74).is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_fully_written(dtype, backend, device):
    """Outputs come from the poisoned (NaN-filled) allocator: every element must be overwritten."""
    _skip_unless_runs(backend, device, dtype)
    assert torch.empty(4, device=device).isnan().all(), "conftest's poisoned allocator is off"
    x = torch.randn(37, 2 * 37, device=device).to(dtype).requires_grad_(True)
    out = swiglu(x, backend=backend)
    (grad,) = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(grad).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,bound",
    [
        (FP16, 30.0),            # exp(30) ~ 1e13 overflows fp16 (max 65504): a naive fp16 sigmoid gives inf/NaN
        (BF16, 30.0),
        (torch.float32, 100.0),  # exp(100) overflows fp32 too: 1 / (1 + inf) must give 0, not NaN
    ],
    ids=lambda v: str(v),
)
def test_large_magnitude_gate_stays_finite(dtype, bound, backend, device):
    _skip_unless_runs(backend, device, dtype)
    R, H = 9, 40
    a = torch.empty(R, H, device=device).uniform_(-bound, bound)
    a[0, :4] = torch.tensor([-bound, bound, 0.0, -1.0])
    gate_up = torch.cat([a, torch.randn(R, H, device=device)], dim=1).to(dtype).requires_grad_(True)
    out = swiglu(gate_up, backend=backend)
    assert torch.isfinite(out).all()
    # Past a = -88.7, exp(-a) overflows float32 and the sigmoid is 0: results below |a b| e^-88.7 (< 1e-36 here)
    # come out as 0.
    tol = TOL[dtype] if dtype != torch.float32 else Tol(TOL[dtype].rtol, TOL[dtype].atol, floor=1e-36)
    grad = _check(gate_up, out, dtype, tol=tol)
    assert torch.isfinite(grad).all()


X = torch.randn(4, 6)


@pytest.mark.parametrize(
    "value,kwargs,exc,name",
    [
        (X[:, :5], {}, ValueError, "gate_up"),                             # odd last dim
        (torch.tensor(1.0), {}, ValueError, "gate_up"),                    # 0-d
        (X.long(), {}, TypeError, "gate_up"),                              # int tensor
        (X.tolist(), {}, TypeError, "gate_up"),                            # not a tensor
        (X, {"backend": "nope"}, ValueError, "backend"),
        (X, {"backend": 3}, TypeError, "backend"),
    ],
    ids=["odd-last-dim", "0-d", "int", "list", "unknown-backend", "backend-not-str"],
)
def test_bad_input(value, kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        swiglu(value, **kwargs)


@pytest.mark.parametrize(
    "backend,dtype,why",
    [("cuda", torch.float32, "no cuda implementation"), ("triton", torch.float64, "not torch.float64")],
)
def test_forced_backend_that_cannot_run_explains(backend, dtype, why):
    with pytest.raises(BackendUnavailableError, match=why):
        swiglu(X.to(dtype), backend=backend)


@pytest.mark.gpu
def test_realistic_size_bf16():
    """A MoT/MoE FFN activation: 16k tokens, H = 2816 (a 1024-wide tile does not divide it)."""
    dev = torch.device("cuda")
    x = _leaf((16384, 2 * 2816), BF16, dev)
    _check(x, swiglu(x, backend="triton"), BF16)


@pytest.mark.gpu
def test_more_than_2_to_31_elements():
    """R * 2H > 2^31: row offsets must be int64 (int32 would wrap and corrupt the last rows)."""
    dev = torch.device("cuda")
    H = 2816
    R = 2**31 // (2 * H) + 300
    # Live at once: x (R, 2H), out (R, H), dy (R, H) and the gradient (R, 2H), all bf16: 6 R H elements, ~12.9 GB.
    need = 6 * R * H * torch.finfo(BF16).bits // 8
    need += need // 10 + (1 << 30)  # margin: allocator rounding, the CUDA context's growth, the float64 checks
    free, _ = torch.cuda.mem_get_info(dev)
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB free")
    x = out = dy = grad = None
    try:
        x = torch.randn(R, 2 * H, device=dev, dtype=BF16).requires_grad_(True)
        out = swiglu(x, backend="triton")
        dy = torch.randn(R, H, device=dev, dtype=BF16)
        (grad,) = torch.autograd.grad(out, [x], dy)
        for rows in (slice(0, 256), slice(R - 512, R)):
            g64 = x[rows].detach().double().requires_grad_(True)
            want = _truth(g64)
            (want_grad,) = torch.autograd.grad(want, [g64], dy[rows].double())
            s_out, s_grad = _scales(x[rows], dy[rows])
            assert_close_verbose(out[rows], want, BF16, f"out[{rows}]", tol=TOL[BF16], scale=s_out)
            assert_close_verbose(grad[rows], want_grad, BF16, f"d_gate_up[{rows}]", tol=TOL[BF16], scale=s_grad)
    finally:
        # Give the ~13 GB back at once, failed or not (a failure's traceback would keep these locals alive), so
        # the tests after this one do not run short of memory.
        del x, out, dy, grad
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_forward_backward_without_sync():
    dev = torch.device("cuda")
    x = torch.randn(3, 100, 2 * 300, device=dev, dtype=BF16)[..., :500].requires_grad_(True)
    swiglu(x, backend="triton").float().square().mean().backward()  # warm-up: compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swiglu(x, backend="triton").float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
