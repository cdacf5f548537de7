"""TokenChoiceMoE and btx_merge against loops written here in float64: forward, backward (router included), the
load-balancing loss and its gradient; top_k 1, 2 and E; ties; unused experts; determinism; BTX layout and the
identical-models identity; bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.nn import MoTTransformer, TokenChoiceMoE
from tests.ops.test_token_choice_route import loop_token_route


def loop_tc(m: TokenChoiceMoE, x: torch.Tensor):
    """(out, aux loss): every token through its k experts one by one, the loss from its definition."""
    x2 = x.reshape(-1, m.dim)
    logits = x2 @ m.router.weight.t()
    idx, _ = loop_token_route(logits.detach(), m.top_k)
    rows, usage = [], []
    for t in range(x2.shape[0]):
        g = torch.softmax(logits[t, idx[t]], -1)
        acc = torch.zeros(m.dim, dtype=x.dtype)
        for j, e in enumerate(idx[t].tolist()):
            h = F.silu(x2[t] @ m.w1[e].t()) * (x2[t] @ m.w3[e].t())
            acc = acc + g[j] * (h @ m.w2[e].t())
        rows.append(acc)
        usage.append(torch.zeros(m.num_experts, dtype=x.dtype).index_put((idx[t],), g))
    p = torch.softmax(logits, -1).mean(0)
    aux = m.lb_coef * m.num_experts * (torch.stack(usage).mean(0) * p).sum()
    return torch.stack(rows).view(x.shape), aux


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_layer_matches_the_loop(top_k):
    torch.manual_seed(top_k)
    m = TokenChoiceMoE(12, 20, 5, top_k=top_k, lb_coef=0.05).double()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = m(x)
    want, want_aux = loop_tc(ref, xr)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.aux_loss, want_aux, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    (y * dy).sum().add(m.aux_loss).backward()
    (want * dy).sum().add(want_aux).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_layer_on_every_backend_equals_the_separate_routing_path(backend):
    """The layer routes through the fused token_choice_plan; on every backend it equals the same layer run on
    token_choice_route + pair_rows (the path before the fused op) and the loop."""
    from sparsemm_kernels.backend import unsupported_reasons
    from sparsemm_kernels.nn import token_choice as tc_module
    from sparsemm_kernels.ops.slots import pair_rows

    dtype = torch.float32 if backend == "triton" else torch.float64
    reasons = unsupported_reasons("token_choice_route", backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(3)
    m = TokenChoiceMoE(8, 12, 6, top_k=2, backend=backend).to(dtype)
    x = torch.randn(67, 8, dtype=dtype)  # past a Triton token block
    ref = copy.deepcopy(m).double()

    def separate(logits, k, backend=None):
        idx, gates = smk.token_choice_route(logits, k, backend=backend)
        plan, slots, inverse = pair_rows(idx, logits.shape[1], backend=backend, name="expert_idx")
        return idx, gates, plan, slots, inverse

    y = m(x)
    fused = tc_module.token_choice_plan
    try:
        tc_module.token_choice_plan = separate
        want = m(x)
    finally:
        tc_module.token_choice_plan = fused
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, want, **tol)
    torch.testing.assert_close(y.double(), loop_tc(ref, x.double())[0], **tol)


def test_tied_logits_and_unused_experts():
    m = TokenChoiceMoE(8, 12, 4, top_k=2).double()
    with torch.no_grad():
        m.router.weight.zero_()  # every logit ties: experts 0 and 1, gates 1/2
    x = torch.randn(5, 8, dtype=torch.float64)
    y = m(x)
    want = sum(0.5 * (F.silu(x @ m.w1[e].t()) * (x @ m.w3[e].t())) @ m.w2[e].t() for e in (0, 1))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    for w in (m.w1, m.w2, m.w3):  # experts 2 and 3 got no token: exactly zero gradients
        assert bool((w.grad[2:] == 0).all()) and bool((w.grad[:2] != 0).any())


def test_repeated_runs_are_bitwise_identical():
    torch.manual_seed(0)
    m = TokenChoiceMoE(16, 24, 8, top_k=3)
    x = torch.randn(4, 9, 16)
    results = []
    for _ in range(2):
        m.zero_grad()
        xs = x.clone().requires_grad_(True)
        y = m(xs)
        (y.square().sum() + m.aux_loss).backward()
        results.append([y, xs.grad, *(p.grad.clone() for p in m.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_stands_where_a_mot_ffn_stands_and_compiles():
    m = TokenChoiceMoE(16, 24, 4)
    x = torch.randn(2, 5, 16)
    assert torch.equal(m(x, torch.zeros(2, 5, dtype=torch.long), None), m(x))  # extra arguments ignored
    m.eval()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-6)
    assert m.aux_loss is None  # not in training


def _dense_models(n, seed=0, **kw):
    torch.manual_seed(seed)
    return [MoTTransformer(50, 16, 2, 2, 24, 1, dtype=torch.float64, **kw) for _ in range(n)]


def test_btx_layout_and_means():
    models = _dense_models(3)
    merged = smk.btx_merge(models, top_k=2, lb_coef=0.02)
    params = [dict(m.named_parameters()) for m in models]
    for name, p in merged.named_parameters():
        if ".ffn." in name:
            continue
        torch.testing.assert_close(p, sum(ps[name] for ps in params) / 3, rtol=1e-12, atol=1e-12, msg=name)
    for i, layer in enumerate(merged.layers):
        assert isinstance(layer.ffn, TokenChoiceMoE) and layer.ffn.num_experts == 3 and layer.ffn.top_k == 2
        assert layer.ffn.lb_coef == 0.02
        for j, m in enumerate(models):
            for w in ("w1", "w3", "w2"):
                assert torch.equal(getattr(layer.ffn, w)[j], getattr(m.layers[i].ffn, w)[0])
    assert smk.btx_merge(models[:1], top_k=2).layers[0].ffn.top_k == 1  # clamped to N
    tokens = torch.randint(0, 50, (2, 9))
    merged(tokens).sum().backward()
    assert merged.layers[0].ffn.router.weight.grad is not None


@pytest.mark.parametrize("n", [1, 3])
def test_btx_of_identical_models_is_the_dense_model(n):
    (model,) = _dense_models(1, seed=4)
    tokens = torch.randint(0, 50, (2, 9))
    merged = smk.btx_merge([copy.deepcopy(model) for _ in range(n)], top_k=2)
    torch.testing.assert_close(merged(tokens), model(tokens), rtol=1e-10, atol=1e-10)


def test_bad_input_names_the_argument():
    for bad in (0, 5):
        with pytest.raises(ValueError, match="`top_k`"):
            TokenChoiceMoE(8, 12, 4, top_k=bad)
    with pytest.raises(ValueError, match="`lb_coef`"):
        TokenChoiceMoE(8, 12, 4, lb_coef=-1.0)
    with pytest.raises(ValueError, match="`x`"):
        TokenChoiceMoE(8, 12, 4)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="`dense_models`"):
        smk.btx_merge([])
    with pytest.raises(ValueError, match="`dense_models`"):
        smk.btx_merge(_dense_models(2) + [MoTTransformer(50, 16, 2, 2, 24, 2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="differs"):
        smk.btx_merge(_dense_models(1) + [MoTTransformer(50, 16, 3, 2, 24, 1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="differs"):
        smk.btx_merge(_dense_models(1) + _dense_models(1, norm_placement="pre"))
    with pytest.raises(ValueError, match="`top_k`"):
        smk.btx_merge(_dense_models(2), top_k=0)
