"""mod_route(router_logits, capacity, batch_level, token_mask): Mixture-of-Depths routing, against a plain loop
written here (Python sorting), per sequence and batch-level, with ties, masks, every routing backend, the op
contract (fullgraph compile) and bad input."""

import math

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons


def loop_mod_route(logits, C, batch_level=False, mask=None):
    """Per sequence (or over the batch): the C best by (logit descending, position ascending), ascending, -1 when
    masking leaves fewer."""
    B, S = logits.shape
    v = logits.double().tolist()
    m = [[True] * S for _ in range(B)] if mask is None else mask.tolist()
    if batch_level:
        cand = sorted(((b * S + s) for b in range(B) for s in range(S) if m[b][s]),
                      key=lambda f: (-v[f // S][f % S], f))
        picked = sorted(cand[:C])
        return torch.tensor(picked + [-1] * (C - len(picked)), dtype=torch.int64)
    rows = []
    for b in range(B):
        cand = sorted((s for s in range(S) if m[b][s]), key=lambda s: (-v[b][s], s))
        picked = sorted(cand[:C])
        rows.append(picked + [-1] * (C - len(picked)))
    return torch.tensor(rows, dtype=torch.int64).view(B, C)


def _logits(B, S, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(0, 3, (B, S), generator=g).float() - 1.0
    return torch.randn(B, S, generator=g)


CASES = [  # (B, S, capacity, kind, masked)
    (1, 1, 1.0, "rand", False),
    (2, 8, 0.125, "rand", False),
    (2, 8, 0.5, "ties", False),
    (3, 17, 1.0, "ties", True),
    (3, 17, 4, "rand", True),
    (4, 5, 0.25, "ties", False),
]


def _backend_or_skip(backend, dtype=torch.float32):
    if backend is not None:
        reasons = unsupported_reasons("expert_choice_route", backend, torch.device("cpu"), dtype)
        if reasons:
            pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", [None, "torch", "cpu", "triton"], ids=str)
@pytest.mark.parametrize("batch_level", [False, True], ids=["per-sequence", "batch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-c{c[2]}-{c[3]}{'-mask' if c[4] else ''}")
def test_matches_the_loop(case, batch_level, backend):
    _backend_or_skip(backend)
    B, S, cap, kind, masked = case
    logits = _logits(B, S, kind, seed=B * 100 + S)
    mask = (torch.arange(B * S).view(B, S) % 4 != 1) if masked else None
    n = B * S if batch_level else S
    C = cap if isinstance(cap, int) else min(max(math.ceil(cap * n), 1), n)
    got = smk.mod_route(logits, cap, batch_level=batch_level, token_mask=mask, backend=backend)
    want = loop_mod_route(logits, C, batch_level, mask)
    assert got.dtype == torch.int64 and torch.equal(got, want), (got, want)


def test_ties_keep_exactly_capacity_tokens_in_order():
    logits = torch.zeros(2, 10)
    assert torch.equal(smk.mod_route(logits, 0.3), torch.arange(3).expand(2, 3))
    assert torch.equal(smk.mod_route(logits, 4, batch_level=True), torch.arange(4))
    logits[1, 7] = 1.0
    assert smk.mod_route(logits, 3)[1].tolist() == [0, 1, 7]


def test_no_gradient_and_bf16_logits():
    logits = torch.randn(2, 9, requires_grad=True)
    idx = smk.mod_route(logits, 0.5)
    assert not idx.requires_grad
    assert torch.equal(smk.mod_route(logits.detach().bfloat16(), 0.5),
                       loop_mod_route(logits.detach().bfloat16().float(), 5))


def test_compiles_fullgraph():
    def route(x):
        return smk.mod_route(x.sum(-1), 0.5), smk.mod_route(x.sum(-1), 3, batch_level=True)

    x = torch.randn(2, 6, 4)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    for a, b in zip(route(x), compiled(x)):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 6)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`capacity`"):
            smk.mod_route(x, bad)
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match="`capacity`"):
            smk.mod_route(x, bad)
    with pytest.raises(ValueError, match="`capacity`"):
        smk.mod_route(x, 13, batch_level=True)
    for bad in (True, "half", None):
        with pytest.raises(TypeError, match="`capacity`"):
            smk.mod_route(x, bad)
    with pytest.raises(ValueError, match="`router_logits`"):
        smk.mod_route(torch.randn(6), 0.5)
    with pytest.raises(ValueError, match="`router_logits`"):
        smk.mod_route(torch.randn(2, 0), 0.5)
    with pytest.raises(TypeError, match="`router_logits`"):
        smk.mod_route(torch.ones(2, 6, dtype=torch.long), 0.5)
    y = x.clone()
    y[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"`router_logits` must be finite; router_logits\[1, 4\] = inf"):
        smk.mod_route(y, 0.5)
    with pytest.raises(TypeError, match="`token_mask`"):
        smk.mod_route(x, 0.5, token_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="`token_mask`"):
        smk.mod_route(x, 0.5, token_mask=torch.ones(6, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="`batch_level`"):
        smk.mod_route(x, 0.5, batch_level=1)
