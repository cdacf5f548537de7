"""expert_choice_route(scores, capacity, token_mask): every expert's top-capacity tokens, against a plain
per-expert loop written here (Python sorting, float64), with ties, masks, capacity 1 / = N / > N, no tokens,
the gates' gradient, the op contract (opcheck, fullgraph compile, autocast, second derivative) and bad input."""

import math

import pytest
import torch
from torch.library import opcheck

import sparsemm_kernels as smk


def loop_route(scores, capacity, token_mask=None):
    """Per expert: eligible tokens sorted by (score descending, token ascending), the first ``capacity`` of
    them in ascending token order, padded with -1; gates the scores there, 0 in padding."""
    N, E = scores.shape
    s = scores.double().tolist()
    mask = [True] * N if token_mask is None else token_mask.tolist()
    idx, gates = [], []
    for e in range(E):
        eligible = sorted((t for t in range(N) if mask[t]), key=lambda t: (-s[t][e], t))
        picked = sorted(eligible[:capacity])
        idx.append(picked + [-1] * (capacity - len(picked)))
        gates.append([s[t][e] for t in picked] + [0.0] * (capacity - len(picked)))
    return torch.tensor(idx, dtype=torch.int64).view(E, capacity), torch.tensor(gates, dtype=torch.float64).view(
        E, capacity)


def _scores(N, E, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: most comparisons are ties
        return (torch.randint(0, 3, (N, E), generator=g).to(dtype) / 2).requires_grad_(True)
    return torch.rand(N, E, generator=g).to(dtype).requires_grad_(True)


CASES = [  # (N, E, capacity, kind, masked)
    (1, 1, 1, "rand", False),     # one token, one expert
    (8, 4, 2, "rand", False),
    (8, 4, 1, "ties", False),     # capacity 1 with ties: the lowest token wins
    (9, 3, 9, "rand", False),     # capacity = N: every token, in order
    (5, 2, 12, "ties", False),    # capacity > N: the extra slots -1
    (33, 5, 7, "ties", True),     # masked tokens never chosen
    (6, 3, 5, "rand", True),      # fewer eligible than capacity: -1 slots with gate 0
    (0, 3, 2, "rand", False),     # no tokens: all -1
    (64, 8, 8, "ties", True),
]


@pytest.mark.parametrize("backend", [None, "torch"], ids=["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-E{c[1]}-C{c[2]}-{c[3]}{'-mask' if c[4] else ''}")
def test_matches_the_per_expert_loop(case, dtype, backend):
    N, E, C, kind, masked = case
    scores = _scores(N, E, kind, seed=N * 7 + C, dtype=dtype)
    mask = (torch.arange(N) % 3 != 1) if masked else None
    idx, gates = smk.expert_choice_route(scores, C, mask, backend=backend)  # auto: the C++ kernel when built
    want_idx, want_gates = loop_route(scores.detach(), C, mask)
    assert idx.dtype == torch.int64 and gates.dtype == dtype
    assert torch.equal(idx, want_idx), (idx, want_idx)
    assert torch.equal(gates.double(), want_gates)  # a gather: exact
    if mask is not None:
        assert not bool(torch.isin(idx, torch.nonzero(~mask).flatten()).any())
    # d gates / d scores: 1 at each chosen (token, expert), nothing elsewhere
    dg = torch.randn(E, C, dtype=torch.float64).to(dtype)
    (ds,) = torch.autograd.grad(gates, scores, dg, allow_unused=True) if N else (torch.zeros(0, E),)
    want = torch.zeros(N, E, dtype=torch.float64)
    for e in range(E):
        for j in range(C):
            if want_idx[e, j] >= 0:
                want[want_idx[e, j], e] += dg[e, j].double()
    assert torch.equal(ds.double(), want)


def test_every_tie_goes_to_the_lower_token():
    scores = torch.zeros(10, 3)  # all equal: each expert takes the first C tokens
    idx, _ = smk.expert_choice_route(scores, 4)
    assert torch.equal(idx, torch.arange(4).expand(3, 4))
    scores[7, 1] = 1.0  # one higher: it goes first, the rest are the lowest others
    idx, _ = smk.expert_choice_route(scores, 4)
    assert idx[1].tolist() == [0, 1, 2, 7]


def test_all_tokens_masked_gives_empty_rows():
    idx, gates = smk.expert_choice_route(torch.rand(6, 2), 3, torch.zeros(6, dtype=torch.bool))
    assert torch.equal(idx, torch.full((2, 3), -1)) and torch.equal(gates, torch.zeros(2, 3))


def test_bad_input_names_the_argument():
    s = torch.rand(6, 2)
    with pytest.raises(ValueError, match="`capacity`"):
        smk.expert_choice_route(s, 0)
    with pytest.raises(ValueError, match="`capacity`"):
        smk.expert_choice_route(s, -3)
    with pytest.raises(TypeError, match="`capacity`"):
        smk.expert_choice_route(s, 2.0)
    with pytest.raises(TypeError, match="`capacity`"):
        smk.expert_choice_route(s, True)
    with pytest.raises(ValueError, match="`capacity`"):
        smk.expert_choice_route(s, 2**31)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = s.clone()
        t[4, 1] = bad
        with pytest.raises(ValueError, match=r"`scores` must be finite; scores\[4, 1\]"):
            smk.expert_choice_route(t, 2)
    with pytest.raises(ValueError, match="`scores`"):
        smk.expert_choice_route(torch.rand(6), 2)
    with pytest.raises(ValueError, match="`scores`"):
        smk.expert_choice_route(torch.rand(6, 0), 2)
    with pytest.raises(TypeError, match="`scores`"):
        smk.expert_choice_route(torch.ones(6, 2, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="`token_mask`"):
        smk.expert_choice_route(s, 2, torch.ones(6))
    with pytest.raises(ValueError, match="`token_mask`"):
        smk.expert_choice_route(s, 2, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`backend`"):
        smk.expert_choice_route(s, 2, backend="nope")
    with pytest.raises(smk.BackendUnavailableError):
        smk.expert_choice_route(s, 2, backend="cuda")  # no CUDA kernel: Triton's wins on every GPU
    with pytest.raises(smk.BackendUnavailableError, match="float64"):
        smk.expert_choice_route(s.double(), 2, backend="triton")


def test_unchecked_nan_is_never_chosen_and_stays_in_bounds():
    s = torch.rand(8, 2)
    s[3, 0] = float("nan")
    idx, gates = smk.expert_choice_route(s, 8, validate=False)
    assert 3 not in idx[0].tolist() and bool(((idx >= -1) & (idx < 8)).all())
    assert not bool(gates.isnan().any())


# ---- the segmented top-k kernels: Triton (CPU tensors under TRITON_INTERPRET=1, as in `make test`), C++ ----

TRITON_CASES = [  # (N, E, capacity, kind, mask): the interpreter is slow, so few and small, every branch once
    (1, 1, 1, "rand", None),
    (8, 4, 1, "ties", None),       # capacity 1, ties: the lowest token
    (5, 2, 12, "ties", "token"),   # capacity > N: -1 slots; masked tokens
    (33, 5, 28, "signed", None),   # negative scores chosen too; -0.0 == +0.0 (a tie, not an order)
    (0, 3, 2, "rand", None),       # no tokens
    (70, 3, 9, "ties", "expert"),  # per-expert eligibility and device capacities, several blocks of the pass
]


def _triton_case_scores(N, E, kind, dtype):
    g = torch.Generator().manual_seed(N * 31 + E)
    if kind == "ties":
        s = torch.randint(0, 3, (N, E), generator=g) / 2.0
    elif kind == "signed":
        s = torch.randn(N, E, generator=g) * 10
        s[::7] = 0.0
        s[1::7] = -0.0
    else:
        s = torch.rand(N, E, generator=g)
    return s.to(dtype)


def _kernel_backend_or_skip(backend, dtype):
    from sparsemm_kernels.backend import unsupported_reasons

    reasons = unsupported_reasons("expert_choice_route", backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"N{c[0]}-E{c[1]}-C{c[2]}-{c[3]}-{c[4]}")
def test_kernel_matches_the_loop(case, dtype, backend):
    from sparsemm_kernels.ops.routing import _route

    _kernel_backend_or_skip(backend, dtype)
    N, E, C, kind, mask_kind = case
    scores = _triton_case_scores(N, E, kind, dtype)
    g = torch.Generator().manual_seed(7)
    mask = limit = None
    if mask_kind == "token":
        mask = torch.arange(N) % 3 != 1
    elif mask_kind == "expert":
        mask = torch.rand(N, E, generator=g) > 0.4
        limit = torch.tensor([0, 4, C])[:E]
    idx, gates = _route(scores, C, mask, limit, backend, None)  # into poisoned memory (conftest): every slot written
    for e in range(E):
        cap = C if limit is None else int(limit[e])
        m = None if mask is None else (mask if mask.dim() == 1 else mask[:, e])
        want_idx, want_gates = loop_route(scores[:, e:e + 1], cap, m)
        want_idx = torch.cat([want_idx[0], want_idx.new_full((C - cap,), -1)])
        want_gates = torch.cat([want_gates[0], want_gates.new_zeros(C - cap)])
        assert torch.equal(idx[e], want_idx), (e, idx[e], want_idx)
        assert torch.equal(gates[e].double(), want_gates)
    assert torch.equal(idx, _route(scores, C, mask, limit, "torch", None)[0])


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("spread", ["low_bits", "mixed"])
def test_kernel_threshold_in_every_key_byte(backend, spread):
    """Scores whose keys share their top bytes and differ only below (neighbouring floats), or differ anywhere
    (signs, magnitudes, neighbours of each): the threshold is decided in each byte of the key in turn. Equal to the
    torch backend's stable sort, with and without per-expert masks and capacities."""
    from sparsemm_kernels.ops.routing import _route

    _kernel_backend_or_skip(backend, torch.float32)
    g = torch.Generator().manual_seed(11 + len(spread))
    N, E, C = 300, 4, 37
    ulp = torch.randint(0, 700, (N, E), generator=g).double() * 2.0 ** -23  # ties too: 300 draws of 700
    if spread == "low_bits":
        scores = (1.0 + ulp).float()
    else:
        base = torch.tensor([-3.0, -1.0, -2.0 ** -60, 0.0, 2.0 ** -60, 0.5, 1.0, 1e30])
        scores = (base[torch.randint(0, 8, (N, E), generator=g)].double() * (1.0 + ulp)).float()
    mask = torch.rand(N, E, generator=g) > 0.3
    limit = torch.tensor([0, 1, 20, C])
    for m, lim in ((None, None), (mask, limit)):
        idx, _ = _route(scores, C, m, lim, backend, None)
        assert torch.equal(idx, _route(scores, C, m, lim, "torch", None)[0])


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_kernel_reads_strided_scores_and_never_picks_nan(backend):
    from sparsemm_kernels.ops.routing import _route

    _kernel_backend_or_skip(backend, torch.float32)
    wide = torch.rand(9, 12, generator=torch.Generator().manual_seed(2))
    scores = wide[:, ::3]  # [9, 4], column stride 3
    idx, _ = _route(scores, 3, None, None, backend, None)
    assert torch.equal(idx, loop_route(scores, 3)[0])
    bad = scores.clone()
    bad[2, 1], bad[5, 1] = float("nan"), float("-inf")
    idx, gates = _route(bad, 9, None, None, backend, False)
    assert 2 not in idx[1].tolist() and 5 not in idx[1].tolist() and idx[1].tolist()[-2:] == [-1, -1]
    assert not bool(gates.isnan().any())


# ---- the op contract ----

def test_opcheck():
    op = torch.ops.sparsemm.expert_choice_indices.default
    opcheck(op, (torch.rand(9, 3), None, 4, None, "eager", None))
    opcheck(op, (torch.rand(9, 3), torch.arange(9) % 2 == 0, 12, None, "off", "torch"))
    opcheck(op, (torch.rand(9, 3), torch.rand(9, 3) > 0.3, 5, torch.tensor([0, 2, 5]), "eager", None))


def test_compiles_fullgraph_with_eager_equal_results():
    def route(s, mask):
        idx, gates = smk.expert_choice_route(torch.sigmoid(s), 3, mask)
        return idx, gates

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    s = torch.randn(11, 4, requires_grad=True)
    mask = torch.arange(11) % 4 != 0
    (i1, g1), (i2, g2) = route(s, mask), compiled(s, mask)
    assert torch.equal(i1, i2) and torch.equal(g1, g2)
    dg = torch.randn(4, 3)
    assert torch.equal(torch.autograd.grad(g1, s, dg)[0], torch.autograd.grad(g2, s, dg)[0])


def test_router_under_autocast():
    router = torch.nn.Linear(16, 4, bias=False)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = torch.sigmoid(router(x))
        idx, gates = smk.expert_choice_route(scores, 3)
    assert scores.dtype == torch.bfloat16 and gates.dtype == torch.bfloat16
    assert torch.equal(idx, loop_route(scores.detach().float(), 3)[0])
    gates.float().sum().backward()
    assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)


def test_second_derivative_through_the_gates():
    # gates are a gather of scores: linear, so second derivatives are exact (gradgradcheck through a router)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    idx = smk.expert_choice_route(torch.sigmoid(x @ w.t()), 2)[0]

    def fn(x, w):  # the choice fixed (it has no gradient), the gates through the sigmoid router
        return smk.expert_choice_route(torch.sigmoid(x @ w.t()), 2)[1]

    assert torch.equal(smk.expert_choice_route(torch.sigmoid(x @ w.t()), 2)[0], idx)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_capacity_from_a_factor_matches_the_rule():
    # The layers' rule C = min(max(ceil(c N / E), 1), N): at the edges the route returns exactly C slots.
    for N, E, c in ((10, 4, 1.0), (10, 4, 0.5), (3, 8, 1.0), (10, 2, 2.0)):
        C = min(max(math.ceil(c * N / E), 1), N)
        idx, _ = smk.expert_choice_route(torch.rand(N, E), C)
        assert idx.shape == (E, C) and bool((idx >= 0).all())


@pytest.mark.gpu
def test_cuda_route_matches_the_loop_without_host_sync():
    dev = torch.device("cuda")
    scores = _scores(300, 8, "ties", seed=5).detach().to(dev).requires_grad_(True)
    mask = (torch.arange(300) % 5 != 2).to(dev)
    smk.expert_choice_route(scores, 40, mask)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, gates = smk.expert_choice_route(scores, 40, mask)  # the async finiteness check: no sync
        gates.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want_idx, want_gates = loop_route(scores.detach().cpu(), 40, mask.cpu())
    assert torch.equal(idx.cpu(), want_idx) and torch.equal(gates.detach().cpu().double(), want_gates)
    bad = scores.detach().clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="`scores`"):
        smk.expert_choice_route(bad, 40, validate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_kernel_at_moma_size_matches_the_torch_sort(dtype):
    """The Triton radix select at a MoMa layer's size (24576 tokens, 8 experts, per-expert masks and capacities,
    many ties in bf16), compiled for the GPU: equal to the torch backend's stable sort."""
    from sparsemm_kernels.ops.routing import _route

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(9)
    N, E, C = 24576, 8, 3072
    scores = torch.rand(N, E, generator=g).to(dtype).to(dev)
    mask = (torch.rand(N, E, generator=g) > 0.5).to(dev)
    limit = torch.tensor([0, 1, 700, 1536, 3072, 3072, 2000, 5], device=dev)
    for m, lim in ((None, None), (mask, limit)):
        got, _ = _route(scores, C, m, lim, "triton", None)
        want, _ = _route(scores, C, m, lim, "torch", None)
        assert torch.equal(got, want)


def test_per_expert_masks_and_device_capacities():
    # What a layer that routes inside groups uses: each expert's own eligible tokens and its own capacity
    # (a device tensor, at most the static bound).
    from sparsemm_kernels.ops.routing import _route

    N, E, bound = 23, 5, 6
    scores = _scores(N, E, "ties", seed=3)
    eligible = torch.rand(N, E, generator=torch.Generator().manual_seed(4)) > 0.4
    limit = torch.tensor([0, 1, 3, 6, 6])
    idx, gates = _route(scores, bound, eligible, limit, None, None)
    for e in range(E):
        want_idx, want_gates = loop_route(scores.detach()[:, e:e + 1], int(limit[e]), eligible[:, e])
        got = idx[e][idx[e] >= 0]
        assert torch.equal(got, want_idx[0][want_idx[0] >= 0]), (e, got, want_idx)
        assert bool((idx[e][len(got):] == -1).all()) and bool((gates[e][len(got):] == 0).all())


def test_cpu_kernel_launcher_names_bad_arguments():
    from sparsemm_kernels.backend import unsupported_reasons
    from sparsemm_kernels.kernels.cpu import expert_choice_cpu

    if unsupported_reasons("expert_choice_route", "cpu", torch.device("cpu"), torch.float32):
        pytest.skip("the C++ extension is not built")
    s = torch.rand(6, 3)
    with pytest.raises(ValueError, match="`scores`"):
        expert_choice_cpu(torch.rand(6), None, 2, None)
    with pytest.raises(ValueError, match="`capacity`"):
        expert_choice_cpu(s, None, 0, None)
    with pytest.raises(ValueError, match="`token_mask`"):
        expert_choice_cpu(s, torch.ones(6, 2, dtype=torch.bool), 2, None)
    with pytest.raises(ValueError, match="`token_mask`"):
        expert_choice_cpu(s, torch.ones(6), 2, None)
    with pytest.raises(ValueError, match="`limit`"):
        expert_choice_cpu(s, None, 2, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="`limit`"):
        expert_choice_cpu(s, None, 2, torch.zeros(3))
    # a limit above the capacity is capped at the capacity: the row never overflows
    assert torch.equal(expert_choice_cpu(s, None, 2, torch.tensor([9, 1, -4])),
                       torch.stack([loop_route(s, 2)[0][0], torch.tensor([loop_route(s, 1)[0][1, 0], -1]),
                                    torch.tensor([-1, -1])]))
