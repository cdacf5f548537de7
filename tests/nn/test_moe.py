"""ExpertChoiceMoE against a plain per-expert loop written here (float64, forward and backward, the router's
gradient through the gates), its slot ops (pick_rows / sum_rows: adjoint, bounded, deterministic), and the op
contract (opcheck, fullgraph compile, autocast, second derivatives, bad input)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from sparsemm_kernels.nn import ExpertChoiceMoE
from sparsemm_kernels.nn.moe import expert_capacity
from sparsemm_kernels.ops.slots import pick_rows_op, slot_inverse, sum_rows_op
from tests.ops.test_expert_choice_route import loop_route


def loop_moe(m: ExpertChoiceMoE, x: torch.Tensor, token_mask=None) -> torch.Tensor:
    """The layer as a loop over experts and their chosen tokens (the module's parameters, x's dtype)."""
    x2 = x.reshape(-1, m.dim)
    N = x2.shape[0]
    logits = x2 @ m.router.weight.t()
    s = torch.sigmoid(logits) if m.gate == "sigmoid" else torch.softmax(logits, -1)
    C = expert_capacity(m.capacity_factor, N, m.num_experts)
    out = torch.zeros_like(x2)
    if C == 0:
        return out.view(x.shape)
    idx, _ = loop_route(s.detach(), C, None if token_mask is None else token_mask.reshape(-1))
    for e in range(m.num_experts):
        for t in idx[e].tolist():
            if t < 0:
                continue
            h = F.silu(x2[t] @ m.w1[e].t()) * (x2[t] @ m.w3[e].t())
            out = out.index_add(0, torch.tensor([t]), (s[t, e] * (h @ m.w2[e].t()))[None])
    return out.view(x.shape)


CASES = [  # (shape, experts, capacity factor, gate, masked)
    ((2, 7), 4, 1.0, "sigmoid", False),
    ((13,), 3, 0.5, "sigmoid", True),
    ((3, 5), 2, 2.0, "softmax", False),
    ((1,), 4, 1.0, "sigmoid", False),     # one token: every expert takes it
    ((9,), 8, 1.0, "softmax", True),      # more experts than eligible tokens per expert share
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-E{c[1]}-c{c[2]}-{c[3]}{'-mask' if c[4] else ''}")
def test_matches_the_per_expert_loop(case, dtype):
    shape, E, cf, gate, masked = case
    torch.manual_seed(sum(shape) + E)
    m = ExpertChoiceMoE(12, 20, E, capacity_factor=cf, gate=gate, dtype=dtype)
    ref = copy.deepcopy(m).double()
    x = torch.randn(*shape, 12, dtype=dtype, requires_grad=True)
    mask = (torch.arange(x[..., 0].numel()) % 3 != 0).view(shape) if masked else None
    x64 = x.detach().double().requires_grad_(True)
    y, want = m(x, mask), loop_moe(ref, x64, mask)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.double(), want, **tol)
    if mask is not None:
        assert bool((y[~mask] == 0).all())  # a masked token is never routed
    dy = torch.randn_like(want)
    y.backward(dy.to(dtype))
    want.backward(dy)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    for (name, p), (_, p64) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, **tol, msg=lambda s, n=name: f"d{n}: {s}")
    assert m.router.weight.grad.abs().sum() > 0  # the router learns through the gates


def test_repeated_forward_backward_is_bitwise_identical():
    torch.manual_seed(0)
    m = ExpertChoiceMoE(16, 24, 4)
    x = torch.randn(40, 16, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.square().sum().backward()
        outs.append([y.detach(), x.grad.clone(), *[p.grad.clone() for p in m.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_gumbel_noise_only_in_training():
    torch.manual_seed(1)
    m = ExpertChoiceMoE(8, 12, 4, router_noise="gumbel")
    plain = copy.deepcopy(m)
    plain.router_noise = None
    x = torch.randn(30, 8)
    m.eval()
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(2)
    a = m(x)
    torch.manual_seed(3)
    assert not torch.equal(a, m(x))  # other noise, other choice or other gates


def test_no_tokens_gives_zeros_and_zero_gradients():
    m = ExpertChoiceMoE(8, 12, 3)
    x = torch.randn(0, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in m.parameters())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="`capacity_factor`"):
        ExpertChoiceMoE(8, 12, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="`capacity_factor`"):
        ExpertChoiceMoE(8, 12, 2, capacity_factor=float("inf"))
    with pytest.raises(TypeError, match="`capacity_factor`"):
        ExpertChoiceMoE(8, 12, 2, capacity_factor="1")
    with pytest.raises(ValueError, match="`gate`"):
        ExpertChoiceMoE(8, 12, 2, gate="relu")
    with pytest.raises(ValueError, match="`router_noise`"):
        ExpertChoiceMoE(8, 12, 2, router_noise="gauss")
    with pytest.raises(ValueError, match="`num_experts`"):
        ExpertChoiceMoE(8, 12, 0)
    m = ExpertChoiceMoE(8, 12, 2)
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(4, 9))
    with pytest.raises(TypeError, match="`x`"):
        m(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="`token_mask`"):
        m(torch.randn(4, 8), torch.ones(5, dtype=torch.bool))
    x = torch.randn(4, 8)
    with torch.no_grad():
        m.router.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`scores`"):  # non-finite router scores
        m(x)


def test_capacity_rule():
    assert expert_capacity(1.0, 10, 4) == 3 and expert_capacity(0.5, 10, 4) == 2
    assert expert_capacity(0.01, 10, 4) == 1 and expert_capacity(4.0, 10, 2) == 10 and expert_capacity(1.0, 0, 4) == 0


# ---- the slot ops ----

def _slots(N=9, E=3, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(N, generator=g)[:C].sort().values for _ in range(E)])
    idx[1, -1] = -1  # an empty slot
    return idx, slot_inverse(idx, N)


def test_slot_inverse_and_adjointness():
    idx, inv = _slots()
    N, E = inv.shape
    C = idx.shape[1]
    for e in range(E):
        for j in range(C):
            t = int(idx[e, j])
            if t >= 0:
                assert int(inv[t, e]) == e * C + j
    assert int((inv >= 0).sum()) == int((idx >= 0).sum())
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randn(E * C, 5, dtype=torch.float64)
    flat = idx.reshape(-1)
    picked, summed = pick_rows_op(x, flat, inv), sum_rows_op(y, inv, flat)
    torch.testing.assert_close((picked * y).sum(), (x * summed).sum())  # <pick x, y> = <x, sum y>
    assert bool((picked[flat < 0] == 0).all())
    # out-of-range values read the zero row: never a stray access
    bad = flat.clone()
    bad[0], bad[1] = 10**6, -7
    assert bool((pick_rows_op(x, bad, inv)[:2] == 0).all())


def test_sum_rows_of_16_bit_rows_rounds_once():
    """bf16 slot rows summed in float32 and rounded once: the float32 sum of the same rows, rounded (k bf16 additions
    would round at every step)."""
    torch.manual_seed(0)
    P, N, K = 64, 4, 16
    inverse = torch.randperm(P).view(N, K)
    index = torch.empty(P, dtype=torch.int64)
    index[inverse.reshape(-1)] = torch.arange(N).repeat_interleave(K)
    y = (torch.randn(P, 8) * torch.logspace(0, 3, P)[:, None]).bfloat16()
    got = sum_rows_op(y, inverse, index)
    want = y.float()[inverse].sum(1).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_slot_ops_first_and_second_derivatives():
    idx, inv = _slots()
    flat = idx.reshape(-1)
    x = torch.randn(inv.shape[0], 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(flat.shape[0], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pick_rows_op(t, flat, inv), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pick_rows_op(t, flat, inv) ** 2, (x,))
    assert torch.autograd.gradcheck(lambda t: sum_rows_op(t, inv, flat), (y,))
    assert torch.autograd.gradgradcheck(lambda t: sum_rows_op(t, inv, flat) ** 2, (y,))


def test_opcheck_slot_ops():
    idx, inv = _slots()
    flat = idx.reshape(-1)
    opcheck(torch.ops.sparsemm.pick_rows.default, (torch.randn(9, 4, requires_grad=True), flat, inv))
    opcheck(torch.ops.sparsemm.sum_rows.default, (torch.randn(12, 4, requires_grad=True), inv, flat))


def test_compiles_fullgraph_with_eager_equal_results():
    torch.manual_seed(4)
    m = ExpertChoiceMoE(16, 24, 4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y1, y2 = m(x), compiled(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    dy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, *m.parameters()], dy)
    g2 = torch.autograd.grad(y2, [x, *m.parameters()], dy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_under_autocast_matches_the_loop_run_in_bf16():
    torch.manual_seed(5)
    m = ExpertChoiceMoE(16, 24, 4)
    x = torch.randn(20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = copy.deepcopy(m).double()
    want = loop_moe(ref, x.double())
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err  # bf16 GEMMs; a wrong routing or gate would be off by O(1)


def test_triton_backend_matches_the_loop():
    # The module's backend is a preference: the grouped GEMMs and SwiGLU on Triton (the interpreter here), the
    # routing and slot ops on torch.
    from sparsemm_kernels.backend import unsupported_reasons

    reasons = unsupported_reasons("grouped_mm", "triton", torch.device("cpu"), torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(6)
    m = ExpertChoiceMoE(16, 24, 4, capacity_factor=1.5, backend="triton")
    x = torch.randn(3, 7, 16, requires_grad=True)
    ref = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_(True)
    y, want = m(x), loop_moe(ref, x64)
    torch.testing.assert_close(y.double(), want, rtol=2e-5, atol=2e-5)
    dy = torch.randn_like(want)
    y.backward(dy.float())
    want.backward(dy)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-5, atol=2e-5)
    for p, p64 in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
def test_cuda_forward_backward_without_host_sync():
    torch.manual_seed(7)
    m = ExpertChoiceMoE(64, 96, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m(x).float().square().mean().backward()  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = copy.deepcopy(m).double().cpu()  # the loop reference runs on the CPU
    want = loop_moe(ref, x.detach().double().cpu())
    err = (m(x).double().cpu() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err


def test_router_scores_in_float32_under_autocast_and_in_bf16_models():
    """The routers score in at least float32 (bf16 scores tie by the thousand, and ties go to the lower token): under
    autocast, and for a bf16 model; the choice is then the float32 scores' choice. float64 stays float64."""
    from sparsemm_kernels.nn import MixtureOfDepths, MoMaFeedForward, TokenChoiceMoE
    from sparsemm_kernels.nn.moe import router_logits

    torch.manual_seed(0)
    moe = ExpertChoiceMoE(16, 24, 4)
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = moe.scores(x)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.sigmoid(F.linear(x, moe.router.weight)))
    bf16 = copy.deepcopy(moe).bfloat16()
    assert bf16.scores(x.bfloat16()).dtype == torch.float32
    assert bf16(x.bfloat16()).dtype == torch.bfloat16  # the gates are cast back where they scale the outputs
    assert router_logits(moe.router.double(), x.double()).dtype == torch.float64
    moma = MoMaFeedForward(16, 24, (2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moma._scores(x).dtype == torch.float32
    class Block(torch.nn.Module):
        def forward(self, h, *args, **kwargs):
            return 2 * h

    for layer in (TokenChoiceMoE(16, 24, 4, top_k=2), MixtureOfDepths(Block(), 16, capacity=0.5)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.view(2, 20, 16))
        assert torch.isfinite(y).all()
