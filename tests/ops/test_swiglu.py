"""swiglu (silu(a) * b over a fused gate/up projection) on every available backend vs the float64 reference."""

import pytest
import torch

from sparsemm_kernels.backend import BackendUnavailableError, unsupported_reasons
from sparsemm_kernels.ops.swiglu import swiglu
from sparsemm_kernels.reference.swiglu import swiglu_ref
from sparsemm_kernels.utils.testing import REL_TOL, assert_close_verbose

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
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]

# Per-element bound on top of assert_close_verbose's max-scaled one: every output element is one float32
# computation rounded once to the dtype, so it must sit within about one ulp of the float64 value.
ELEM_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("swiglu", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _assert_elementwise(got, want, dtype, what):
    """``|got - want| <= rtol * |want| + atol`` per element, ``atol`` a small fraction of the largest value."""
    g, w = got.detach().double(), want.detach()
    if g.numel() == 0:
        return
    rtol = ELEM_RTOL[dtype]
    atol = rtol * 1e-2 * max(w.abs().max().item(), 1.0)
    excess = (g - w).abs() - (rtol * w.abs() + atol)
    if excess.max().item() > 0:
        i = tuple(int(j) for j in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(f"{what}: element {i} got {g[i].item():.8g} want {w[i].item():.8g} (rtol {rtol:.3g})")


def _check(leaf, out, ref_leaf, ref, dtype, dy=None):
    """Forward and d(leaf) of ``out`` against the float64 ``ref``; returns the gradient."""
    assert out.dtype == dtype
    assert_close_verbose(out, ref, dtype, "out")
    _assert_elementwise(out, ref, dtype, "out")
    if dy is None:
        dy = torch.randn(ref.shape, device=ref.device).to(dtype)
    (grad,) = torch.autograd.grad(out, [leaf], dy)
    (ref_grad,) = torch.autograd.grad(ref, [ref_leaf], dy.double())
    assert grad.dtype == dtype
    assert_close_verbose(grad, ref_grad, dtype, "d_gate_up")
    _assert_elementwise(grad, ref_grad, dtype, "d_gate_up")
    return grad


def _leaves(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    return x, x.detach().double().requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(shape, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    x, x64 = _leaves(shape, dtype, device)
    out = swiglu(x, backend=backend)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    _check(x, out, x64, swiglu_ref(x64), dtype)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda f: f.__name__.strip("_"))
def test_non_contiguous_input(layout, dtype, backend, device):
    """The gradient reaches the wider buffer through the view, in the right places (zeros elsewhere)."""
    _skip_unless_runs(backend, device, dtype)
    base, view = layout(11, 37, device)
    big = base.to(dtype).requires_grad_(True)
    big64 = big.detach().double().requires_grad_(True)
    gate_up = view(big)
    assert not gate_up.is_contiguous()
    out = swiglu(gate_up, backend=backend)
    ref = swiglu_ref(view(big64))
    dy = torch.randn(ref.shape[::-1], device=device).to(dtype).permute(*reversed(range(ref.dim())))
    _check(big, out, big64, ref, dtype, dy=dy)  # dy is non-contiguous too


def test_row_strided_input_is_not_copied():
    from sparsemm_kernels.kernels.triton.swiglu import _rows

    big = torch.randn(2, 9, 80)
    gate_up = big[:, :, :74]
    assert _rows(gate_up, 74).data_ptr() == gate_up.data_ptr()
    assert _rows(big.transpose(0, 1)[:, :, :74], 74).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_sum_uses_expanded_dy(backend, device):
    """``out.sum().backward()`` hands the kernel a stride-0 ``dy``."""
    _skip_unless_runs(backend, device, torch.float32)
    x, x64 = _leaves((5, 6, 2 * 21), torch.float32, device)
    swiglu(x, backend=backend).sum().backward()
    swiglu_ref(x64).sum().backward()
    assert_close_verbose(x.grad, x64.grad, torch.float32, "d_gate_up")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_fully_written(dtype, device):
    """Outputs come from the poisoned (NaN-filled) allocator: every element must be overwritten."""
    _skip_unless_runs("triton", device, dtype)
    assert torch.empty(4, device=device).isnan().all(), "conftest's poisoned allocator is off"
    x = torch.randn(37, 2 * 37, device=device).to(dtype).requires_grad_(True)
    out = swiglu(x, backend="triton")
    (grad,) = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_are_bitwise_identical(dtype, device):
    _skip_unless_runs("triton", device, dtype)
    x = torch.randn(45, 2 * 29, device=device).to(dtype)
    dy = torch.randn(45, 29, device=device).to(dtype)
    results = []
    for _ in range(3):
        xs = x.clone().requires_grad_(True)
        out = swiglu(xs, backend="triton")
        results.append((out.detach(), *torch.autograd.grad(out, [xs], dy)))
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,bound",
    [
        (torch.float16, 30.0),   # exp(30) ~ 1e13 overflows fp16 (max 65504): a naive fp16 sigmoid gives inf/NaN
        (torch.bfloat16, 30.0),
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
    g64 = gate_up.detach().double().requires_grad_(True)
    out = swiglu(gate_up, backend=backend)
    assert torch.isfinite(out).all()
    grad = _check(gate_up, out, g64, swiglu_ref(g64), dtype)
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


def _assert_close_on_device(got, want, dtype, what):
    """Max-scaled check without copying a multi-GB tensor to the host."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want).abs().max().item()
    tol = REL_TOL[dtype] * max(want.abs().max().item(), 1e-3)
    assert err <= tol, f"{what}: max error {err:.3g} > tol {tol:.3g}"


@pytest.mark.gpu
def test_realistic_size_bf16():
    """A MoT/MoE FFN activation: 16k tokens, H = 2816 (a 1024-wide tile does not divide it)."""
    dev = torch.device("cuda")
    R, H = 16384, 2816
    x, x64 = _leaves((R, 2 * H), torch.bfloat16, dev)
    out = swiglu(x, backend="triton")
    ref = swiglu_ref(x64)
    _assert_close_on_device(out, ref, torch.bfloat16, "out")
    _assert_elementwise(out, ref, torch.bfloat16, "out")
    dy = torch.randn(R, H, device=dev, dtype=torch.bfloat16)
    (grad,) = torch.autograd.grad(out, [x], dy)
    (ref_grad,) = torch.autograd.grad(ref, [x64], dy.double())
    _assert_close_on_device(grad, ref_grad, torch.bfloat16, "d_gate_up")
    _assert_elementwise(grad, ref_grad, torch.bfloat16, "d_gate_up")


@pytest.mark.gpu
def test_more_than_2_to_31_elements():
    """R * 2H > 2^31: row offsets must be int64 (int32 would wrap and corrupt the last rows)."""
    dev = torch.device("cuda")
    H = 2816
    R = 2**31 // (2 * H) + 300
    x = torch.randn(R, 2 * H, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    out = swiglu(x, backend="triton")
    dy = torch.randn(R, H, device=dev, dtype=torch.bfloat16)
    (grad,) = torch.autograd.grad(out, [x], dy)
    for rows in (slice(0, 256), slice(R - 512, R)):
        g64 = x[rows].detach().double().requires_grad_(True)
        ref = swiglu_ref(g64)
        (ref_grad,) = torch.autograd.grad(ref, [g64], dy[rows].double())
        _assert_elementwise(out[rows], ref, torch.bfloat16, f"out[{rows}]")
        _assert_elementwise(grad[rows], ref_grad, torch.bfloat16, f"d_gate_up[{rows}]")


@pytest.mark.gpu
def test_forward_backward_without_sync():
    dev = torch.device("cuda")
    x = torch.randn(3, 100, 2 * 300, device=dev, dtype=torch.bfloat16)[..., :500].requires_grad_(True)
    swiglu(x, backend="triton").float().square().mean().backward()  # warm-up: compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        swiglu(x, backend="triton").float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
