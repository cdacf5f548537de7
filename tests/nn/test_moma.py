"""MoMaFeedForward against a per-group, per-expert loop written here (float64, forward and backward incl. the
routers), groups of (4, 4), (1, 1), (2, 3, 1) experts, capacity factors 0.5 / 1 / 2, sigmoid and softmax, an
empty modality group (its experts' and router's gradients exactly zero), masks, upcycling, compile, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.nn import MoMaFeedForward, MoTFeedForward
from tests.ops.test_expert_choice_route import loop_route


def loop_moma(m: MoMaFeedForward, x, ids, token_mask=None):
    x2, ids = x.reshape(-1, m.dim), ids.reshape(-1)
    mask = torch.ones_like(ids, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1)
    out = torch.zeros_like(x2)
    first = 0
    for g, E_g in enumerate(m.experts_per_modality):
        members = [t for t in range(len(ids)) if int(ids[t]) == g]
        b = len(members)
        logits = x2 @ m.routers[g].weight.t()
        s = torch.sigmoid(logits) if m.gate == "sigmoid" else torch.softmax(logits, -1)
        if b:
            C = min(max(math.ceil(m.capacity_factor * b / E_g), 1), b)
            eligible = torch.zeros(len(ids), dtype=torch.bool)
            eligible[members] = True
            idx, _ = loop_route(s.detach(), C, eligible & mask)
            for j in range(E_g):
                e = first + j
                for t in idx[j].tolist():
                    if t < 0:
                        continue
                    h = F.silu(x2[t] @ m.w1[e].t()) * (x2[t] @ m.w3[e].t())
                    out = out.index_add(0, torch.tensor([t]), (s[t, j] * (h @ m.w2[e].t()))[None])
        first += E_g
    return out.view(x.shape)


CASES = [  # (experts per modality, capacity factor, gate, ids kind, masked)
    ((4, 4), 1.0, "sigmoid", "random", False),
    ((1, 1), 1.0, "sigmoid", "random", False),
    ((2, 3, 1), 0.5, "sigmoid", "random", True),
    ((2, 3, 1), 2.0, "softmax", "random", False),
    ((4, 4), 1.0, "sigmoid", "one_group", False),   # modality 1 has no tokens
    ((3, 2), 1.0, "softmax", "spans", True),
    ((3,), 1.0, "sigmoid", "random", False),          # one group: an expert-choice MoE
]


def _ids(kind, M, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "one_group":
        return torch.zeros(shape, dtype=torch.long)
    if kind == "spans":
        n = math.prod(shape)
        return (torch.arange(n) // 5 % M).view(shape)
    return torch.randint(0, M, shape, generator=g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-c{c[1]}-{c[2]}-{c[3]}{'-mask' if c[4] else ''}")
def test_matches_the_per_group_loop(case):
    experts, cf, gate, kind, masked = case
    torch.manual_seed(len(experts) * 10 + int(cf * 4))
    m = MoMaFeedForward(12, 20, experts, capacity_factor=cf, gate=gate, dtype=torch.float64)
    shape = (2, 11)
    x = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    ids = _ids(kind, len(experts), shape, seed=1)
    mask = (torch.arange(22) % 4 != 3).view(shape) if masked else None
    ref = copy.deepcopy(m)
    xr = x.detach().clone().requires_grad_(True)
    y, want = m(x, ids, token_mask=mask), loop_moma(ref, xr, ids, mask)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        want_grad = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(p.grad, want_grad, rtol=0, atol=1e-12, msg=lambda s, n=name: f"d{n}: {s}")
    if kind == "one_group":  # the empty group: its experts and router get exactly zero
        E0 = experts[0]
        assert bool((m.w1.grad[E0:] == 0).all() and (m.w2.grad[E0:] == 0).all())
        assert bool((m.routers[1].weight.grad == 0).all())


def test_reuses_a_plan_and_runs_float32_on_triton():
    from sparsemm_kernels.backend import unsupported_reasons

    if unsupported_reasons("grouped_mm", "triton", torch.device("cpu"), torch.float32):
        pytest.skip("no triton")
    torch.manual_seed(3)
    m = MoMaFeedForward(16, 24, (2, 2), backend="triton")
    x = torch.randn(3, 8, 16, requires_grad=True)
    ids = torch.randint(0, 2, (3, 8))
    plan = smk.group_plan(ids, 2)
    y = m(x, ids, plan=plan)
    ref = copy.deepcopy(m).double()
    torch.testing.assert_close(y.double(), loop_moma(ref, x.detach().double(), ids), rtol=2e-5, atol=2e-5)


def test_upcycled_experts_copy_their_modality_ffn():
    torch.manual_seed(4)
    ffn = MoTFeedForward(12, 20, 2, dtype=torch.float64)
    m = MoMaFeedForward.from_modality_ffn(ffn, (3, 2))
    for e, g in enumerate([0, 0, 0, 1, 1]):
        for name in ("w1", "w3", "w2"):
            assert torch.equal(getattr(m, name)[e], getattr(ffn, name)[g])
    with pytest.raises(ValueError, match="`experts_per_modality`"):
        MoMaFeedForward.from_modality_ffn(ffn, (3, 2, 1))
    with pytest.raises(TypeError, match="`ffn`"):
        MoMaFeedForward.from_modality_ffn(torch.nn.Linear(2, 2), (1, 1))


def test_one_expert_per_group_with_capacity_one_is_the_gated_modality_ffn():
    # (1, 1) experts with c = 1: C_m = b_m, every token of a group goes to its one expert, weighted by its gate.
    torch.manual_seed(5)
    ffn = MoTFeedForward(12, 20, 2, dtype=torch.float64)
    m = MoMaFeedForward.from_modality_ffn(ffn, (1, 1))
    x = torch.randn(17, 12, dtype=torch.float64)
    ids = torch.randint(0, 2, (17,))
    gate = torch.cat([torch.sigmoid(x @ r.weight.t()) for r in m.routers], 1).gather(1, ids[:, None])
    torch.testing.assert_close(m(x, ids), gate * ffn(x, ids), rtol=0, atol=1e-12)


def test_bad_arguments_name_themselves():
    for bad in ((), (2, 0), "44", (2, -1), (1.5, 2)):
        with pytest.raises(ValueError, match="`experts_per_modality`"):
            MoMaFeedForward(8, 12, bad)
    with pytest.raises(ValueError, match="`capacity_factor`"):
        MoMaFeedForward(8, 12, (1, 1), capacity_factor=-1)
    with pytest.raises(ValueError, match="`gate`"):
        MoMaFeedForward(8, 12, (1, 1), gate="tanh")
    m = MoMaFeedForward(8, 12, (1, 2))
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="`modality_ids`"):
        m(x, torch.tensor([0, 1, 2, 0, 1]))  # id 2: no such group
    with pytest.raises(ValueError, match="`modality_ids`"):
        MoMaFeedForward(8, 12, (3,))(x, torch.tensor([0, 0, 1, 0, 0]))
    with pytest.raises(ValueError, match="`modality_ids`"):
        m(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`x`"):
        m(torch.randn(5, 9), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="`token_mask`"):
        m(x, torch.zeros(5, dtype=torch.long), token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="`plan`"):
        m(x, torch.zeros(5, dtype=torch.long), plan=smk.group_plan(torch.zeros(5, dtype=torch.long), 3))


def test_no_tokens():
    m = MoMaFeedForward(8, 12, (2, 2))
    x = torch.randn(0, 8, requires_grad=True)
    y = m(x, torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in m.parameters())


def test_compiles_fullgraph_with_eager_equal_results():
    torch.manual_seed(6)
    m = MoMaFeedForward(16, 24, (2, 3))
    x = torch.randn(2, 9, 16, requires_grad=True)
    ids = torch.randint(0, 2, (2, 9))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y1, y2 = m(x, ids), compiled(x, ids)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    dy = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, [x, *m.parameters()], dy),
                    torch.autograd.grad(y2, [x, *m.parameters()], dy)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_forward_backward_without_host_sync():
    torch.manual_seed(7)
    m = MoMaFeedForward(64, 96, (4, 4), device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 2, (4, 256), device="cuda")
    plan = smk.group_plan(ids, 2)
    m(x, ids, plan).float().square().mean().backward()  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x, ids, plan).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = copy.deepcopy(m).double().cpu()  # the loop reference runs on the CPU
    want = loop_moma(ref, x.detach().double().cpu(), ids.cpu())
    err = (m(x, ids, plan).double().cpu() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err


# ---- auxiliary routers for causal decoding ----

def test_aux_loss_is_the_bce_of_detached_inputs_against_membership():
    torch.manual_seed(8)
    m = MoMaFeedForward(12, 20, (2, 3), aux_router=True, dtype=torch.float64)
    x = torch.randn(19, 12, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 2, (19,))
    y = m(x, ids)
    assert m.aux_loss is not None and m.aux_loss.dim() == 0
    # the truth: membership from the loop's routing, BCE over each token's own group's experts
    terms = []
    first = 0
    for g, E_g in enumerate(m.experts_per_modality):
        members = [t for t in range(19) if int(ids[t]) == g]
        s = torch.sigmoid(x.detach() @ m.routers[g].weight.t())
        C = min(max(math.ceil(len(members) / E_g), 1), len(members))
        eligible = torch.zeros(19, dtype=torch.bool)
        eligible[members] = True
        idx, _ = loop_route(s, C, eligible)
        a = m.aux_routers[g](x.detach())
        for t in members:
            for j in range(E_g):
                target = float(t in idx[j].tolist())
                terms.append(F.binary_cross_entropy(a[t, j], torch.tensor(target, dtype=torch.float64)))
        first += E_g
    torch.testing.assert_close(m.aux_loss.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-9)
    # it trains the aux routers only: no gradient reaches x or the main model through it
    grads = torch.autograd.grad(m.aux_loss, [x, *m.parameters()], allow_unused=True)
    named = [n for n, _ in m.named_parameters()]
    assert grads[0] is None
    for n, gr in zip(named, grads[1:]):
        assert (gr is not None and bool(gr.abs().sum() > 0)) == n.startswith("aux_routers"), n
    y.sum().backward()  # the main loss still trains everything else
    m.eval()
    m(x, ids)
    assert m.aux_loss is None  # training only


def test_causal_routing_depends_on_each_token_alone():
    torch.manual_seed(9)
    m = MoMaFeedForward(12, 20, (2, 2), aux_router=True, dtype=torch.float64)
    m.causal_routing = True
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    ids = torch.randint(0, 2, (2, 10))
    y = m(x, ids)
    # the truth: token t goes to expert j of its group iff a_j(x_t) > 0.5, weighted by the main gate
    want = torch.zeros_like(x)
    first = 0
    for g, E_g in enumerate(m.experts_per_modality):
        s = torch.sigmoid(x @ m.routers[g].weight.t())
        a = m.aux_routers[g](x)
        for b in range(2):
            for t in range(10):
                if int(ids[b, t]) != g:
                    continue
                for j in range(E_g):
                    if a[b, t, j] > 0.5:
                        e = first + j
                        h = F.silu(x[b, t] @ m.w1[e].t()) * (x[b, t] @ m.w3[e].t())
                        want[b, t] += s[b, t, j] * (h @ m.w2[e].t())
        first += E_g
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    # decoding one token at a time gives the same rows
    for t in (0, 4, 9):
        torch.testing.assert_close(m(x[:, t:t + 1], ids[:, t:t + 1]), y[:, t:t + 1], rtol=0, atol=1e-12)


# ---- the MoMa / expert-choice MoE transformer ----

@pytest.mark.parametrize("experts,placement", [((2, 3), "post"), ((8,), "pre"), ((1, 2, 1), "post")])
def test_transformer_matches_its_modules_composed_by_hand(experts, placement):
    torch.manual_seed(10)
    from sparsemm_kernels.nn import MoMaTransformer

    M = len(experts)
    model = MoMaTransformer(37, 16, 2, 4, 24, experts, norm_placement=placement, dtype=torch.float64)
    tokens = torch.randint(0, 37, (2, 9))
    ids = torch.randint(0, M, (2, 9))
    logits = model(tokens, ids if M > 1 else None)
    ref = copy.deepcopy(model)
    h = ref.embed(tokens)
    for layer in ref.layers:
        def attn(t, layer=layer):
            return layer.attn(t, None)

        if placement == "post":
            h = h + layer.attn_norm(attn(h))
            h = h + layer.ffn_norm(loop_moma(layer.ffn, h, ids))
        else:
            h = h + attn(layer.attn_norm(h))
            h = h + loop_moma(layer.ffn, layer.ffn_norm(h), ids)
    want = ref.lm_head(ref.norm(h))
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-10)
    dy = torch.randn_like(want)
    logits.backward(dy)
    want.backward(dy)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad if q.grad is not None else torch.zeros_like(p), rtol=0,
                                   atol=1e-10, msg=lambda s, n=name: f"d{n}: {s}")


def test_transformer_builds_one_plan_per_forward_and_sums_aux_losses(monkeypatch):
    import sparsemm_kernels.nn.mot as mot
    from sparsemm_kernels.nn import MoMaTransformer

    calls = []
    real = mot.build_plan
    monkeypatch.setattr(mot, "build_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = MoMaTransformer(37, 16, 3, 4, 24, (2, 2), aux_router=True)
    tokens, ids = torch.randint(0, 37, (2, 9)), torch.randint(0, 2, (2, 9))
    model(tokens, ids)
    assert len(calls) == 1
    assert model.aux_loss is not None
    torch.testing.assert_close(model.aux_loss, sum(layer.ffn.aux_loss for layer in model.layers))
    with pytest.raises(ValueError, match="`modality_ids`"):
        model(tokens)


def test_transformer_compiles_fullgraph():
    from sparsemm_kernels.nn import MoMaTransformer

    torch.manual_seed(11)
    model = MoMaTransformer(37, 16, 2, 4, 24, (2, 2))
    tokens, ids = torch.randint(0, 37, (2, 9)), torch.randint(0, 2, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens, ids), model(tokens, ids), rtol=0, atol=0)


def test_under_autocast_matches_the_loop():
    torch.manual_seed(12)
    m = MoMaFeedForward(16, 24, (2, 2))
    x = torch.randn(30, 16)
    ids = torch.randint(0, 2, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, ids)
    assert y.dtype == torch.bfloat16
    want = loop_moma(copy.deepcopy(m).double(), x.double(), ids)
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < 3e-2, err  # bf16 GEMMs; a wrong routing or gate would be off by O(1)


def test_moma_with_mixture_of_depths_layers():
    from sparsemm_kernels.nn import MixtureOfDepths, MoMaTransformer

    torch.manual_seed(0)
    model = MoMaTransformer(37, 16, 4, 4, 24, (2, 2), mod_capacity=0.25, dtype=torch.float64)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["MixtureOfDepths", "MoMaBlock", "MixtureOfDepths", "MoMaBlock"]
    assert all(layer.batch_level and layer.capacity == 0.25 for layer in model.layers
               if isinstance(layer, MixtureOfDepths))
    tokens, ids = torch.randint(0, 37, (2, 12)), torch.randint(0, 2, (2, 12))
    logits = model(tokens, ids)
    # the same layers applied by hand, each planning its own tokens (the model hands its plan to the full layers)
    h = model.embed(tokens)
    for layer in model.layers:
        h = layer(h, ids)
    torch.testing.assert_close(logits, model.lm_head(model.norm(h)), rtol=0, atol=0)
    logits.sum().backward()
    assert model.layers[0].router.weight.grad is not None and bool(model.layers[0].router.weight.grad.abs().sum() > 0)
    with pytest.raises(TypeError, match="`mod_capacity`"):
        MoMaTransformer(37, 16, 2, 4, 24, (2, 2), mod_capacity=1)
