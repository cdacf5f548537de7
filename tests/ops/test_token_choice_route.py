"""token_choice_route(logits, top_k): every token's top-k experts (descending, ties to the lower expert) and the
renormalised softmax gates, against a loop written here in float64, on every backend; gradients; the op contract;
bad input."""

import pytest
import torch
from torch.library import opcheck

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons


def loop_token_route(logits, k):
    """Per token: experts sorted by (logit descending, index ascending), the first k; softmax over their logits."""
    idx, gates = [], []
    for row in logits:
        vals = row.tolist()
        order = sorted(range(len(vals)), key=lambda e: (-vals[e], e))[:k]
        idx.append(order)
        gates.append(torch.softmax(row[order].double(), -1))
    N = logits.shape[0]
    return (torch.tensor(idx, dtype=torch.int64).view(N, k),
            torch.stack(gates) if gates else torch.zeros(0, k, dtype=torch.float64))


def _logits(N, E, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(0, 3, (N, E), generator=g).float()
        if N:
            x[0] = 1.0  # one row where every logit ties
    else:
        x = torch.randn(N, E, generator=g)
    return x.to(dtype)


CASES = [(1, 1, 1, "rand"), (5, 4, 1, "rand"), (5, 4, 2, "ties"), (9, 6, 6, "rand"), (33, 8, 3, "ties"),
         (0, 4, 2, "rand"), (40, 128, 8, "rand")]


def _skip(backend, dtype):
    if backend is not None:
        reasons = unsupported_reasons("token_choice_route", backend, torch.device("cpu"), dtype)
        if reasons:
            pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-E{}-k{}-{}".format(*c))
def test_matches_the_loop(case, dtype, backend):
    _skip(backend, dtype)
    N, E, k, kind = case
    logits = _logits(N, E, kind, seed=N * 13 + E, dtype=dtype).requires_grad_(True)
    idx, gates = smk.token_choice_route(logits, k, backend=backend)
    want_idx, want_gates = loop_token_route(logits.detach().double(), k)
    assert idx.dtype == torch.int64 and gates.dtype == dtype and idx.shape == (N, k)
    assert torch.equal(idx, want_idx), (idx, want_idx)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(gates.double(), want_gates, **tol)
    if N and kind == "ties":  # the all-tie row: the first k experts, equal gates
        assert idx[0].tolist() == list(range(k))
        torch.testing.assert_close(gates[0].double(), torch.full((k,), 1.0 / k, dtype=torch.float64), **tol)


def test_gate_gradient_matches_the_loop_in_float64():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ref = logits.detach().clone().requires_grad_(True)
    _, gates = smk.token_choice_route(logits, 3)
    idx, _ = loop_token_route(ref.detach(), 3)
    want = torch.softmax(ref.gather(1, idx), -1)
    dg = torch.randn(7, 3, dtype=torch.float64)
    gates.backward(dg)
    want.backward(dg)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: smk.token_choice_route(t, 2)[1], (logits.detach().requires_grad_(),))


def test_op_contract():
    op = torch.ops.sparsemm.token_topk.default
    opcheck(op, (torch.randn(9, 6), 2, None))
    opcheck(op, (torch.randn(9, 6), 6, "torch"))

    def route(x):
        return smk.token_choice_route(x @ x.t(), 2)

    x = torch.randn(6, 4)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    for a, b in zip(route(x), compiled(x)):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    x = torch.randn(6, 4)
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match="`top_k`"):
            smk.token_choice_route(x, bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="`top_k`"):
            smk.token_choice_route(x, bad)
    y = x.clone()
    y[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`logits` must be finite; logits\[2, 3\]"):
        smk.token_choice_route(y, 2)
    with pytest.raises(ValueError, match="`logits`"):
        smk.token_choice_route(torch.randn(6), 2)
    with pytest.raises(ValueError, match="`logits`"):
        smk.token_choice_route(torch.randn(6, 0), 1)
    with pytest.raises(TypeError, match="`logits`"):
        smk.token_choice_route(torch.ones(6, 4, dtype=torch.long), 2)
