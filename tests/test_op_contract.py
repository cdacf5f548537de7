"""The op contract: every op a custom op that passes opcheck; every module compiles fullgraph with eager-equal
results; autocast like nn.Linear; second derivatives exact or refused; a module-wide backend is a preference;
and the small argument edges (K = 0, position_ids, numpy ints, huge group counts, eps)."""

import copy

import numpy as np
import pytest
import torch
from torch.library import opcheck

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.nn import (
    DenseBlock,
    MoTAttention,
    MoTBlock,
    MoTFeedForward,
    MoTLayerNorm,
    MoTLinear,
    MoTRMSNorm,
    MoTTransformer,
)
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.reference import grouped_linear_ref
from sparsemm_kernels.reference.mot import _norm, mot_block_ref

OPS = torch.ops.sparsemm
CPU = torch.device("cpu")


def _rg(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _skip_unless(op, backend, dtype=torch.float32):
    reasons = unsupported_reasons(op, backend, CPU, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


# ---- opcheck: schema, fake tensor, autograd registration, AOT dispatch (static and dynamic) ----

def _gemm_cases(backend):
    off = torch.tensor([0, 3, 3, 10])
    rows = torch.randperm(10)
    gemm, dw, multi = OPS.grouped_gemm.default, OPS.grouped_gemm_dw.default, OPS.grouped_gemm_multi.default
    return [
        ("gemm", gemm, (_rg(10, 6), _rg(3, 5, 6), _rg(3, 5), off, None, False, False, False, "eager", backend)),
        ("routed", gemm, (_rg(10, 6), _rg(3, 5, 6), None, off, rows, True, True, False, "off", backend)),
        ("scatter", gemm, (_rg(10, 6), _rg(3, 5, 6), _rg(3, 5), off, rows, False, True, False, "eager", backend)),
        ("gather", gemm, (_rg(10, 6), _rg(3, 5, 6), None, off, rows, True, False, False, "trusted", backend)),
        ("dx", gemm, (_rg(10, 5), _rg(3, 5, 6), None, off, rows, True, True, True, "trusted", backend)),
        ("dw", dw, (_rg(10, 5), _rg(10, 6), off, rows, True, True, True, "trusted", backend)),
        ("dw-mixed", dw, (_rg(10, 5), _rg(10, 6), off, rows, True, False, True, "eager", backend)),
        ("dw-nobias", dw, (_rg(10, 5), _rg(10, 6), off, None, False, False, False, "eager", backend)),
        ("multi", multi, (_rg(10, 6), [_rg(3, 5, 6), _rg(3, 2, 6)], off, rows, True, True, "trusted", backend)),
        ("multi-sorted", multi, (_rg(10, 6), [_rg(3, 5, 6)], off, None, False, False, "eager", backend)),
        ("multi-off", multi, (_rg(10, 6), [_rg(3, 5, 6), _rg(3, 4, 6)], off, rows, False, True, "off", backend)),
        ("multi-bwd", OPS.grouped_gemm_multi_bwd.default,
         (torch.randn(10, 6), [torch.randn(3, 5, 6), torch.randn(3, 2, 6)], [torch.randn(10, 5), torch.randn(10, 2)],
          off, rows, True, True, True, [True, False], "trusted", backend)),
        ("ffn", OPS.grouped_swiglu_ffn.default,
         (_rg(10, 6), _rg(3, 5, 6), _rg(3, 5, 6), _rg(3, 6, 5), off, "eager", backend, "torch")),
        ("ffn-bwd", OPS.grouped_swiglu_ffn_bwd.default,
         (torch.randn(10, 6), torch.randn(10, 6), torch.randn(3, 5, 6), torch.randn(3, 5, 6), torch.randn(3, 6, 5),
          torch.randn(10, 5), torch.randn(10, 5), torch.randn(10, 5), off, [True, True, False, True], "trusted",
          backend, "torch")),
    ]


def _norm_cases(backend):
    ids = torch.randint(0, 3, (10,))
    return [
        ("rms", OPS.modality_norm.default, (_rg(10, 8), ids, _rg(3, 8), None, 1e-5, True, "eager", backend)),
        ("layer", OPS.modality_norm.default, (_rg(10, 8), ids, _rg(3, 8), _rg(3, 8), 1e-5, False, "off", backend)),
        ("per-head", OPS.modality_norm.default, (_rg(10, 2, 8), ids, _rg(3, 8), None, 1e-5, True, "eager", backend)),
    ]


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_opcheck_grouped_gemm(backend):
    _skip_unless("grouped_mm", backend)
    for _name, op, args in _gemm_cases(backend):
        opcheck(op, args)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_opcheck_norms_and_swiglu(backend):
    _skip_unless("modality_norm", backend)
    for _name, op, args in _norm_cases(backend):
        opcheck(op, args)
    x, ids, w = torch.randn(10, 8), torch.randint(0, 3, (10,)), torch.randn(3, 8)
    y, mean, rstd = OPS.modality_norm(x, ids, w, None, 1e-5, True, "eager", backend)
    bwd = (torch.randn(10, 8), x, ids, w, mean, rstd, 1e-5, True, False, True, True, False, backend)
    opcheck(OPS.modality_norm_bwd.default, bwd)
    opcheck(OPS.swiglu.default, (_rg(4, 3, 10), backend))
    opcheck(OPS.swiglu_bwd.default, (torch.randn(4, 10), torch.randn(4, 5), backend))
    opcheck(OPS.silu_mul.default, (_rg(4, 3, 5), _rg(4, 3, 5), backend))
    opcheck(OPS.silu_mul_bwd.default, (torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5), backend))
    offsets = torch.tensor([0, 4, 4, 10])
    opcheck(OPS.grouped_norm.default,
            (_rg(10, 8), _rg(3, 8), _rg(3, 8), None, offsets, 1e-5, False, "eager", backend))
    opcheck(OPS.grouped_norm.default, (_rg(10, 8), _rg(3, 8), None, _rg(10, 8), offsets, 1e-5, True, "eager", backend))
    opcheck(OPS.permute_rows.default, (_rg(10, 3), torch.randperm(10), torch.arange(10), "off"))


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_opcheck_plan_ops(backend):
    _skip_unless("group_plan", backend, torch.int64)
    ids = torch.randint(0, 4, (37,))
    opcheck(OPS.group_plan.default, (ids, 4, "eager", backend, "group_ids"))
    opcheck(OPS.checked_ids.default, (ids, 4, "eager", "modality_ids"))


# ---- torch.compile(fullgraph=True): no graph break, eager-equal forward and backward ----

B, S, D = 2, 8, 32
MODULES = {
    "MoTLinear": lambda: MoTLinear(D, 16, 2, bias=True),
    "MoTRMSNorm": lambda: MoTRMSNorm(D, 2),
    "MoTLayerNorm": lambda: MoTLayerNorm(D, 3),
    "MoTAttention": lambda: MoTAttention(D, 4, 2, n_kv_heads=2, qk_norm=True),
    "MoTFeedForward": lambda: MoTFeedForward(D, 48, 3),
    "MoTBlock": lambda: MoTBlock(D, 4, 48, 2, qk_norm=True),
    "MoTBlock-pre-layer": lambda: MoTBlock(D, 4, 48, 3, norm="layer", norm_placement="pre"),
    "DenseBlock": lambda: DenseBlock(D, 4, 48),
}


def _module_inputs(module):
    M = getattr(module, "num_modalities", 1)
    return torch.randn(B, S, D), torch.randint(0, M, (B, S))


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("with_plan", [False, True], ids=["own-plan", "callers-plan"])
def test_module_compiles_fullgraph_equal_to_eager(name, with_plan):
    torch._dynamo.reset()
    module = MODULES[name]()
    x, ids = _module_inputs(module)
    M = getattr(module, "num_modalities", 1)
    if with_plan and (M == 1 or isinstance(module, (MoTRMSNorm, MoTLayerNorm))):
        pytest.skip("no plan argument on this path")

    def run(m, x, ids):
        kwargs = {"plan": smk.group_plan(ids, M)} if with_plan else {}
        return m(x, ids, **kwargs)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    me, mc = module, copy.deepcopy(module)
    ye, yc = run(me, xe, ids), compiled(mc, xc, ids)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(ye)
    ye.backward(dy)
    yc.backward(dy)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
    for (pn, pe), (_, pc) in zip(me.named_parameters(), mc.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=lambda m, pn=pn: f"d{pn}: {m}")


def test_transformer_compiles_with_inductor():
    torch._dynamo.reset()
    model = MoTTransformer(50, D, 2, 4, 48, 2, qk_norm=True)
    tokens, ids = torch.randint(0, 50, (B, S)), torch.randint(0, 2, (B, S))
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(tokens, ids), model(tokens, ids), rtol=1e-5, atol=1e-5)


def test_functional_ops_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, w, b, ids, gate_up, nw):
        plan = smk.group_plan(ids, 3)
        y = smk.grouped_linear(x, w, plan, b) + smk.grouped_mm(x, w, plan.offsets, b)
        y = y + smk.modality_linear(x, ids, w, b)
        y = y + sum(smk.grouped_linears(x, (w, 2 * w), plan, input_order="sorted"))
        y = y + smk.grouped_swiglu_ffn(x, w, w, w.transpose(1, 2), plan)[:, :4]
        return y, smk.swiglu(gate_up), smk.modality_layer_norm(x, ids, nw, nw, 1e-5)

    args = (torch.randn(9, 6), torch.randn(3, 4, 6), torch.randn(3, 4), torch.randint(0, 3, (9,)),
            torch.randn(9, 8), torch.rand(3, 6))
    for got, want in zip(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args)):
        torch.testing.assert_close(got, want)


def test_compiled_op_still_validates():
    torch._dynamo.reset()
    f = torch.compile(lambda ids: smk.group_plan(ids, 3).offsets, fullgraph=True, backend="aot_eager")
    assert f(torch.tensor([0, 2, 1])).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="`group_ids`"):
        f(torch.tensor([0, 5, 1]))


# ---- autocast: the grouped GEMMs in the autocast dtype, norms in float32 ----

def _plain_torch_transformer(model, tokens, ids):
    """The same model through the published-code-style blocks (plain torch ops, masks and a loop)."""
    h = model.embed(tokens)
    for layer in model.layers:
        h = mot_block_ref(layer, h, ids, math_attention=False)
    return model.lm_head(_norm(model.norm, h, ids))


@pytest.mark.parametrize("M", [1, 2, 3])
def test_transformer_under_cpu_autocast_matches_plain_torch(M):
    torch.manual_seed(0)
    model = MoTTransformer(40, D, 2, 4, 48, M, qk_norm=True)
    tokens, ids = torch.randint(0, 40, (B, S)), torch.randint(0, M, (B, S))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens, ids if M > 1 else None)
        want = _plain_torch_transformer(model, tokens, ids)
    assert got.dtype == torch.bfloat16
    # bf16 rounds to 8 bits: both runs round the same activations, at slightly different places.
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 0.05 * want.float().abs().max().item(), err
    got.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_ops_under_autocast_take_its_dtype():
    x, w, b = torch.randn(6, 4), torch.randn(2, 3, 4), torch.randn(2, 3)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert smk.modality_linear(x.bfloat16(), ids, w, b).dtype == torch.bfloat16
        assert smk.grouped_mm(x, w, smk.group_plan(ids, 2).offsets, b).dtype == torch.bfloat16
        assert smk.modality_rms_norm(x.bfloat16(), ids, torch.ones(2, 4)).dtype == torch.float32
        assert smk.modality_layer_norm(x.bfloat16(), ids, torch.ones(2, 4), torch.zeros(2, 4)).dtype == torch.float32
        assert MoTRMSNorm(4, 1)(x.bfloat16()).dtype == torch.float32
        assert smk.grouped_mm(x.double(), w.double(), smk.group_plan(ids, 2).offsets).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_transformer_under_cuda_autocast_matches_plain_torch(dtype):
    torch.manual_seed(0)
    model = MoTTransformer(40, 64, 2, 4, 128, 2, qk_norm=True).cuda()
    tokens, ids = torch.randint(0, 40, (2, 64), device="cuda"), torch.randint(0, 2, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        got = model(tokens, ids)
        want = _plain_torch_transformer(model, tokens, ids)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= 0.05 * want.float().abs().max().item()


# ---- second derivatives: exact for the grouped GEMM, refused for the fused norm and SwiGLU ----

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_grouped_gemm_gradgradcheck(backend):
    _skip_unless("grouped_mm", backend, torch.float64)
    x, w, b = _rg(7, 4, dtype=torch.float64), _rg(3, 5, 4, dtype=torch.float64), _rg(3, 5, dtype=torch.float64)
    plan = smk.group_plan(torch.tensor([2, 0, 2, 1, 0, 2, 2]), 3)
    assert torch.autograd.gradgradcheck(lambda *a: smk.grouped_mm(*a[:2], plan.offsets, a[2], backend=backend),
                                        (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: smk.grouped_linear(*a[:2], plan, a[2], backend=backend),
                                        (x, w, b))


def _second_derivatives(fn, x, w, b):
    y = fn(x, w, b)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    gx, gw, gb = torch.autograd.grad((y * probe).sum(), (x, w, b), create_graph=True)
    return torch.autograd.grad(gx.square().sum() + gw.square().sum() + (gb * gb).sum(), (x, w), allow_unused=True)


def test_triton_grouped_gemm_second_derivatives_match_reference():
    _skip_unless("grouped_mm", "triton")
    ids = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 1, 0, 2])
    plan = smk.group_plan(ids, 3)
    x, w, b = _rg(11, 5, dtype=torch.float64), _rg(3, 4, 5, dtype=torch.float64), _rg(3, 4, dtype=torch.float64)
    want = _second_derivatives(lambda *a: grouped_linear_ref(a[0], a[1], plan.sorted_to_orig, plan.offsets, a[2]),
                               x, w, b)
    xf, wf, bf = (t.detach().float().requires_grad_(True) for t in (x, w, b))
    got = _second_derivatives(lambda *a: smk.grouped_linear(*a[:2], plan, a[2], backend="triton"), xf, wf, bf)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_norm_and_swiglu_refuse_double_backward(backend):
    _skip_unless("modality_norm", backend)
    ids = torch.tensor([0, 1, 1, 0, 2])
    x, w = _rg(5, 8), _rg(3, 8)
    for fn in (smk.modality_rms_norm, smk.modality_layer_norm):
        (gx,) = torch.autograd.grad(fn(x, ids, w, backend=backend).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
    g = _rg(5, 8)
    (gg,) = torch.autograd.grad(smk.swiglu(g, backend=backend).square().sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gg.sum().backward()
    (gg,) = torch.autograd.grad(smk.silu_mul(g, g * 2, backend=backend).square().sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gg.sum().backward()
    offsets = torch.tensor([0, 2, 2, 5])
    (gx,) = torch.autograd.grad(smk.grouped_rms_norm(x, w, offsets, backend=backend).square().sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ---- a module-wide backend is a preference ----

def test_module_backend_is_a_preference():
    torch.manual_seed(0)
    ref = MoTTransformer(30, D, 2, 4, 48, 2, qk_norm=True)
    model = copy.deepcopy(ref)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "cpu"  # cpu has the plan, GEMM, norms and SwiGLU in float32/float64, none in bfloat16
    tokens, ids = torch.randint(0, 30, (B, S)), torch.randint(0, 2, (B, S))
    torch.testing.assert_close(model(tokens, ids), ref(tokens, ids), rtol=1e-5, atol=1e-5)
    built = MoTTransformer(30, D, 1, 4, 48, 2, backend="cpu")
    built(tokens, ids).sum().backward()
    # In bfloat16 the preference falls back for every op but the plan, where a strict name would raise.
    bf, ref_bf = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    torch.testing.assert_close(bf(tokens, ids), ref_bf(tokens, ids))
    # A per-op backend stays strict.
    with pytest.raises(smk.BackendUnavailableError, match="modality_norm"):
        smk.modality_rms_norm(torch.randn(4, 8, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long),
                              torch.ones(2, 8, dtype=torch.bfloat16), backend="cpu")


def test_environment_backend_is_a_preference(monkeypatch):
    monkeypatch.setenv("SPARSEMM_BACKEND", "cpu")
    model = MoTTransformer(30, D, 1, 4, 48, 2)
    model(torch.randint(0, 30, (B, S)), torch.randint(0, 2, (B, S))).sum().backward()


# ---- the small items ----

@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_empty_inner_or_outer_dimension(backend):
    _skip_unless("grouped_mm", backend)
    off = torch.tensor([0, 2, 5])
    x, w, b = _rg(5, 0), _rg(2, 3, 0), _rg(2, 3)
    y = smk.grouped_mm(x, w, off, b, backend=backend)  # K = 0: the bias alone
    torch.testing.assert_close(y, b.detach()[[0, 0, 1, 1, 1]])
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.tensor([[2.0] * 3, [3.0] * 3]))
    x, w = _rg(5, 4), _rg(2, 0, 4)
    y = smk.grouped_mm(x, w, off, backend=backend)  # N = 0
    assert y.shape == (5, 0)
    y.sum().backward()
    assert x.grad.shape == (5, 4) and not x.grad.any()


def test_modality_linear_with_no_input_features():
    x, ids, w = torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 4, 0)
    assert smk.modality_linear(x, ids, w).shape == (2, 3, 4)


def test_wrong_position_ids_are_named():
    attn = MoTAttention(D, 4, 2)
    x, ids = torch.randn(B, S, D), torch.randint(0, 2, (B, S))
    with pytest.raises(ValueError, match="`position_ids`"):
        attn(x, ids, position_ids=torch.arange(S + 1))
    with pytest.raises(TypeError, match="`position_ids`"):
        attn(x, ids, position_ids=torch.arange(S).float())
    assert attn(x, ids, position_ids=torch.arange(S)[None]).shape == (B, S, D)


@pytest.mark.parametrize("module", ["MoTBlock", "MoTAttention", "MoTFeedForward"])
def test_out_of_range_ids_with_a_callers_plan_are_named(module):
    m = MODULES[module]()
    x = torch.randn(B, S, D)
    ids = torch.randint(0, m.num_modalities, (B, S))
    plan = smk.group_plan(ids, m.num_modalities)
    bad = ids.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="`modality_ids`"):
        m(x, bad, plan=plan)


def test_num_groups_accepts_numpy_ints_and_refuses_absurd_counts():
    ids = torch.tensor([0, 1, 1])
    assert smk.group_plan(ids, np.int64(2)).num_groups == 2
    assert isinstance(smk.group_plan(ids, np.int32(3)).num_groups, int)
    with pytest.raises(ValueError, match="`num_groups`"):
        smk.group_plan(ids, 2**40)
    with pytest.raises(TypeError, match="`num_groups`"):
        smk.group_plan(ids, 2.0)
    with pytest.raises(TypeError, match="`num_groups`"):
        smk.group_plan(ids, True)


@pytest.mark.parametrize("cls", [MoTRMSNorm, MoTLayerNorm])
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_norm_eps_checked_at_construction(cls, eps):
    with pytest.raises(ValueError, match="`eps`"):
        cls(8, 2, eps)


# ---- the eager path of an op with tensor-list arguments and a tensor-list output ----

def _scale_all(x: torch.Tensor, ws: list[torch.Tensor], k: float) -> list[torch.Tensor]:
    return [x @ w.t() * k for w in ws]


def _scale_all_fake(x, ws, k):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in ws]


def _scale_all_setup(ctx, inputs, output):
    x, ws, k = inputs
    ctx.save_for_backward(x, *ws)
    ctx.k = k


def _scale_all_backward(ctx, grads):
    x, *ws = ctx.saved_tensors
    need_x, need_ws = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    assert isinstance(need_ws, (list, tuple)) and len(need_ws) == len(ws), need_ws
    dx = sum(g @ w * ctx.k for g, w in zip(grads, ws)) if need_x else None
    return dx, [g.t() @ x * ctx.k if n else None for g, n in zip(grads, need_ws)], None


_SCALE_ALL = Op("sparsemm_test::scale_all", _scale_all, _scale_all_fake, _scale_all_setup, _scale_all_backward)


def test_eager_path_spreads_tensor_lists_for_autograd():
    """Both paths (the plain autograd Function and the dispatcher) give a list, the same values and the same
    gradients, with a list argument's gradients and flags passed as lists."""
    x = torch.randn(5, 3, requires_grad=True)
    ws = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 3), torch.randn(6, 3, requires_grad=True)]
    eager = _SCALE_ALL(x, ws, 0.5)
    via_dispatcher = _SCALE_ALL.custom_op(x, ws, 0.5)
    assert isinstance(eager, list) and len(eager) == 3
    dys = [torch.randn_like(o) for o in eager]
    got = torch.autograd.grad(eager, [x, ws[0], ws[2]], dys)
    want = torch.autograd.grad(via_dispatcher, [x, ws[0], ws[2]], dys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got[1], dys[0].t() @ x * 0.5)


def test_op_refuses_a_tensor_container_it_cannot_spread():
    def impl(x: torch.Tensor, ws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return x

    with pytest.raises(TypeError, match="annotate `ws` as a tensor or list"):
        Op("sparsemm_test::bad_container", impl, lambda x, ws: x)
