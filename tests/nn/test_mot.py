"""MoT modules vs the published-code-style reference (masks + loop, float64) and vs their dense counterparts."""

import copy

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.nn.mot import DenseBlock, MoTAttention, MoTBlock, MoTFeedForward, MoTTransformer
from sparsemm_kernels.ops.attention import hybrid_mask
from sparsemm_kernels.reference.mot import _allowed, mot_attention_ref, mot_block_ref, mot_feed_forward_ref
from sparsemm_kernels.utils.testing import EPS32, Tol, assert_close_verbose

BACKENDS = ["triton", "cpu", "torch"]
# A block chains a dozen GEMMs, norms, attention and SwiGLU: no per-element scale is tracked through it, so the
# bound is relative to the root mean square of each compared tensor (utils.testing, scale=None). Measured
# (SPARSEMM_TOL_LOG, float32, both backends): worst 51 eps32 * rms (d ffn.w3), outputs and dx <= 20 eps32 * rms
# -> atol = 150 eps32 (the per-op tests hold the tight, per-element bounds).
TOL = Tol(rtol=0.0, atol=150 * EPS32)
DIM, HEADS, HIDDEN = 32, 4, 48

# (num_modalities, modality layout, block kwargs, attention kwargs) — each row names the edge it covers.
BLOCK_CASES = [
    (1, "interleaved", dict(), dict()),                                            # dense path
    (2, "interleaved", dict(), dict()),                                            # paper block, post-norm
    (2, "contiguous", dict(norm_placement="pre"), dict()),                         # pre-norm, modality runs
    (3, "interleaved", dict(qk_norm=True), dict()),                                # QK-norm per modality
    (3, "missing", dict(n_kv_heads=2), dict()),                                    # GQA; modality 2 absent
    (2, "single", dict(norm="layer"), dict()),                                     # LayerNorm; one image token
    (2, "interleaved", dict(qk_norm=True, norm_placement="pre"), dict(span=True)),  # Transfusion hybrid mask
    (2, "interleaved", dict(rope_theta=None), dict(is_causal=False, user_mask=True)),  # user mask, no rope
]


def _ids(layout, M, B, S):
    if layout == "contiguous":
        return (torch.arange(S) * M // S).expand(B, S).clone()
    ids = torch.randint(0, M, (B, S))
    if layout == "missing":
        ids = ids.clamp(max=M - 2)
    if layout == "single":
        ids = torch.zeros(B, S, dtype=torch.long)
        ids[1, 5] = 1
    return ids


def _attention_kwargs(spec, B, S):
    kw = {}
    if spec.get("span"):
        span = torch.zeros(B, S, dtype=torch.long)
        span[0, 3:7] = 1
        span[1, 8:12] = 2
        kw["span_ids"] = span
    if "is_causal" in spec:
        kw["is_causal"] = spec["is_causal"]
    if spec.get("user_mask"):
        mask = torch.rand(B, 1, S, S) > 0.3
        mask |= torch.eye(S, dtype=torch.bool)  # every query sees at least itself
        kw["attn_mask"] = mask
    return kw


def _skip(backend):
    for op in ("grouped_mm", "modality_norm", "swiglu"):
        reasons = unsupported_reasons(op, backend, torch.device("cpu"), torch.float32)
        if reasons:
            pytest.skip("; ".join(reasons))


def _check_block_vs_ref(module, ref_module, ref_fn, x, ids, kw):
    x = x.clone().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    out = module(x, ids, **kw)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    ref = ref_fn(ref_module, x64, ids, **kw64)
    assert_close_verbose(out, ref, torch.float32, "out", tol=TOL)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    assert_close_verbose(x.grad, x64.grad, torch.float32, "dx", tol=TOL)
    ref_params = dict(ref_module.named_parameters())
    for name, p in module.named_parameters():
        assert_close_verbose(p.grad, ref_params[name].grad, torch.float32, f"d{name}", tol=TOL)


def _case_id(case):
    return f"M{case[0]}-{case[1]}-" + ("-".join(f"{k}={v}" for k, v in case[2].items()) or "default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
def test_block_matches_mask_loop_reference(case, backend):
    _skip(backend)
    M, layout, block_kw, attn_spec = case
    B, S = 2, 12
    block = MoTBlock(DIM, HEADS, HIDDEN, M, backend=backend, **block_kw)
    with torch.no_grad():  # norms start at one; make them modality-specific so a mix-up shows
        for p in block.parameters():
            if p.dim() == 2:
                p.uniform_(0.5, 1.5)
    ids = _ids(layout, M, B, S)
    x = torch.randn(B, S, DIM)
    kw = _attention_kwargs(attn_spec, B, S)
    _check_block_vs_ref(block, copy.deepcopy(block).double(), mot_block_ref, x, ids if M > 1 else ids * 0, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_attention_and_ffn_match_reference(M, backend):
    _skip(backend)
    B, S = 2, 9
    ids = _ids("interleaved", M, B, S)
    x = torch.randn(B, S, DIM)
    attn = MoTAttention(DIM, HEADS, M, n_kv_heads=2, qk_norm=True, backend=backend)
    kw = dict(position_ids=torch.arange(3, 3 + S))  # offset positions, as in a continued sequence
    _check_block_vs_ref(attn, copy.deepcopy(attn).double(), mot_attention_ref, x, ids, kw)
    ffn = MoTFeedForward(DIM, HIDDEN, M, backend=backend)
    _check_block_vs_ref(ffn, copy.deepcopy(ffn).double(), mot_feed_forward_ref, x, ids, {})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_kw", [dict(), dict(norm_placement="pre", qk_norm=True, norm="layer")])
def test_same_weights_equal_dense(block_kw, backend):
    """Every modality holding the dense weights gives the dense block's output and gradients."""
    _skip(backend)
    dense = DenseBlock(DIM, HEADS, HIDDEN, **block_kw)
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 2:
                p.uniform_(0.5, 1.5)
    mot = MoTBlock.from_dense(dense, 3, backend=backend)
    assert {n: p.shape[1:] for n, p in mot.named_parameters()} == {n: p.shape[1:] for n, p in dense.named_parameters()}
    dense = dense.double()  # the truth: the dense block in float64
    x = torch.randn(2, 10, DIM)
    ids = _ids("interleaved", 3, 2, 10)
    xd, xm = x.double().requires_grad_(True), x.clone().requires_grad_(True)
    out_d, out_m = dense(xd), mot(xm, ids)
    assert_close_verbose(out_m, out_d, torch.float32, "out", tol=TOL)
    dy = torch.randn_like(out_m)
    out_d.backward(dy.double())
    out_m.backward(dy)
    assert_close_verbose(xm.grad, xd.grad, torch.float32, "dx", tol=TOL)
    mot_params = dict(mot.named_parameters())
    for name, p in dense.named_parameters():  # dense grad = sum of the modalities' grads
        assert_close_verbose(mot_params[name].grad.sum(0), p.grad[0], torch.float32, f"d{name}", tol=TOL)


def test_dense_block_equals_reference():
    dense = DenseBlock(DIM, HEADS, HIDDEN, qk_norm=True)
    x = torch.randn(2, 7, DIM)
    _check_block_vs_ref(dense, copy.deepcopy(dense).double(), mot_block_ref, x, None, {})


def test_transformer_builds_the_plan_once(monkeypatch):
    import sparsemm_kernels.nn.mot as mot

    calls = []
    real = mot.build_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mot, "build_plan", counting)
    model = MoTTransformer(50, DIM, 3, HEADS, HIDDEN, 2)
    tokens = torch.randint(0, 50, (2, 8))
    ids = _ids("interleaved", 2, 2, 8)
    logits = model(tokens, ids)
    assert logits.shape == (2, 8, 50)
    logits.sum().backward()
    assert len(calls) == 1, f"plan built {len(calls)} times in one forward"


def test_hybrid_mask_matches_loop():
    span = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0], [3, 3, 0, 0, 0, 0, 4, 4]])
    allowed, _ = _allowed(2, 8, "cpu", True, span, None)
    assert torch.equal(hybrid_mask(span), allowed)
    assert hybrid_mask(span)[0, 0, 1, 3]  # bidirectional inside a span
    assert not hybrid_mask(span)[0, 0, 4, 5]  # causal outside


def test_errors_name_the_argument():
    block = MoTBlock(DIM, HEADS, HIDDEN, 2)
    x = torch.randn(1, 5, DIM)
    with pytest.raises(ValueError, match="`modality_ids`"):
        block(x, torch.tensor([[0, 1, 2, 0, 1]]))  # id out of range
    with pytest.raises(ValueError, match="`modality_ids`"):
        block(x, torch.zeros(1, 4, dtype=torch.long))  # shape mismatch
    with pytest.raises(ValueError, match="`x`"):
        block(torch.randn(1, 5, DIM + 1), torch.zeros(1, 5, dtype=torch.long))  # dim mismatch
    with pytest.raises(TypeError, match="`modality_ids`"):
        block(x, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="`modality_ids`"):
        block(x, None)
    with pytest.raises(ValueError, match="`norm`"):
        MoTBlock(DIM, HEADS, HIDDEN, 2, norm="batch")
    with pytest.raises(ValueError, match="`n_kv_heads`"):
        MoTAttention(DIM, HEADS, 2, n_kv_heads=3)
    with pytest.raises(ValueError, match="`plan`"):
        block(x, torch.zeros(1, 5, dtype=torch.long), plan=smk.group_plan(torch.zeros(4, dtype=torch.long), 2))


@pytest.mark.gpu
def test_block_forward_backward_has_no_host_sync():
    dev = torch.device("cuda")
    block = MoTBlock(256, 4, 512, 2, qk_norm=True, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 2, (2, 128), device=dev)
    x = torch.randn(2, 128, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    plan = smk.group_plan(ids, 2)
    block(x, ids, plan=plan).sum().backward()  # warm-up: compile and autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = smk.group_plan(ids, 2)
        block(x, ids, plan=plan).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
