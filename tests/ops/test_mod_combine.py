"""The Mixture-of-Depths combine (sparsemm::mod_combine): out = x with chosen rows moved to x + r (y - x), on the
triton (interpreter) and torch backends, against a loop in float64, forward and backward, padding slots, repeated
runs bitwise identical, opcheck, a refused second derivative, bad input."""

import pytest
import torch
from torch.library import opcheck

from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.ops.mod_combine import mod_combine


def loop_combine(x, y, r, index, num_real):
    out = x.clone()
    for i, t in enumerate(index.tolist()):
        if t < num_real:
            out[t] = x[t] + r[i] * (y[i] - x[t])
    return out


def _case(T, D, M, num_real, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_real, generator=g)[: min(M, num_real)]
    index = torch.cat([rows, torch.full((M - rows.numel(),), T - 1)])  # the rest: padding, one extra row
    x = torch.randn(T, D, generator=g).to(dtype)
    y = torch.randn(M, D, generator=g).to(dtype)
    r = torch.rand(M, generator=g).to(dtype)
    return x, y, r, index


def _skip(backend, dtype):
    reasons = unsupported_reasons("mod_combine", backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


CASES = [(1, 1, 1, 1), (9, 16, 4, 8), (17, 33, 8, 16), (65, 40, 20, 64), (5, 8, 0, 4),
         (9, 16, 12, 8), (6, 5, 9, 5)]  # the last two: more slots than real rows, the rest padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-D{}-M{}-real{}".format(*c))
def test_matches_the_loop_forward_and_backward(case, backend, dtype):
    _skip(backend, dtype)
    T, D, M, num_real = case
    x, y, r, index = _case(T, D, M, num_real, dtype, seed=T * 10 + M)
    xs, ys, rs = (t.clone().requires_grad_() for t in (x, y, r))
    out = mod_combine(xs, ys, rs, index, num_real, backend=backend)
    xd, yd, rd = (t.double().requires_grad_() for t in (x, y, r))
    want = loop_combine(xd, yd, rd, index, num_real)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), want, **tol)
    dout = torch.randn(T, D, dtype=torch.float64)
    out.backward(dout.to(dtype))
    want.backward(dout)
    for got, ref, name in ((xs.grad, xd.grad, "dx"), (ys.grad, yd.grad, "dy"), (rs.grad, rd.grad, "dr")):
        ref = torch.zeros_like(got, dtype=torch.float64) if ref is None else ref  # no slot: the loop never reads it
        torch.testing.assert_close(got.double(), ref, **tol, msg=name)
    padding = index >= num_real
    assert bool((ys.grad[padding] == 0).all()) and bool((rs.grad[padding] == 0).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_repeated_runs_are_bitwise_identical(backend):
    _skip(backend, torch.float32)
    x, y, r, index = _case(40, 24, 12, 39, torch.float32, seed=5)
    results = []
    for _ in range(2):
        xs, ys, rs = (t.clone().requires_grad_() for t in (x, y, r))
        out = mod_combine(xs, ys, rs, index, 39, backend=backend)
        out.backward(torch.ones_like(out))
        results.append((out, xs.grad, ys.grad, rs.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck_and_refused_second_derivative():
    x, y, r, index = _case(9, 8, 4, 8, torch.float32, seed=1)
    opcheck(torch.ops.sparsemm.mod_combine.default, (x, y, r, index, 8, "torch"))
    x, y, r = (t.double().requires_grad_() for t in (x, y, r))
    out = mod_combine(x, y, r, index, 8, backend="torch")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_bad_input():
    x, y, r, index = _case(9, 8, 4, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="mod_combine"):
        mod_combine(x, y[:, :4], r, index, 8)
    with pytest.raises(ValueError, match="mod_combine"):
        mod_combine(x, y, r[:3], index, 8)
    with pytest.raises(TypeError, match="`index`"):
        mod_combine(x, y, r, index.int(), 8)
    for bad in (-1, 10, 2.0, True):
        with pytest.raises(ValueError, match="`num_real`"):
            mod_combine(x, y, r, index, bad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_index_past_the_rows_changes_nothing(backend):
    # num_real = T with one slot naming a row past T: both backends leave every row as x (no write, no assert).
    _skip(backend, torch.float32)
    x, y, r, index = _case(9, 8, 4, 8, torch.float32, seed=2)
    index = index.clone()
    index[1] = 50
    out = mod_combine(x, y, r, index, 9, backend=backend)
    expected = loop_combine(x, y, r, index, 9)
    torch.testing.assert_close(out, expected)
    # The op itself (below the argument checks) with num_real past the rows and an index between them: that
    # slot is padding too (no write past the rows, no clamped write into the last one).
    index[1] = 10
    out = torch.ops.sparsemm.mod_combine(x, y, r, index, 12, backend)
    torch.testing.assert_close(out, expected)


def test_operands_on_another_device_are_refused():
    x, y, r, index = _case(9, 8, 4, 8, torch.float32, seed=1)
    for name, args in (("y", (x, y.to("meta"), r, index)), ("r", (x, y, r.to("meta"), index)),
                       ("index", (x, y, r, index.to("meta")))):
        with pytest.raises(ValueError, match=f"`{name}`"):
            mod_combine(*args, 8)
