"""The group-sorted stream: GEMMs that switch row order inside (input/output_order), norms of grouped rows,
sort_rows/unsort_rows, and every module's forward_sorted chained against the token-order, mask-loop reference
(float64, forward and backward) for 1, 2 and 3 modalities, absent modalities, interleaved and span layouts."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons
from sparsemm_kernels.nn import (
    MoTAttention,
    MoTBlock,
    MoTFeedForward,
    MoTLayerNorm,
    MoTLinear,
    MoTRMSNorm,
    MoTTransformer,
)
from sparsemm_kernels.reference.mot import _norm, mot_block_ref
from sparsemm_kernels.utils.testing import DEFAULT_TOL, EPS, Tol, assert_close_verbose, check_multilinear
from tests.ops.test_norms import TOL as NORM_TOL
from tests.ops.test_norms import _scales as norm_scales

# Two chained blocks and the two-layer models, relative to the root mean square of each tensor: measured worst
# (SPARSEMM_TOL_LOG over this module) float32 510 eps32 (dattn.wq of the 3-modality LayerNorm/GQA chain in the
# interpreter; a LayerNorm backward amplifies rounding where it cancels), float64 61 eps64 on the torch backend and
# 266 eps64 on the cpu one (its C++ grouped GEMM sums each dot product in one sequential order); limits about 3x
# that. A wrong row or weight is off by O(1) of the RMS, ~10^4 (float32) to 10^12 (float64) times these.
BLOCK_TOL = {torch.float32: Tol(rtol=0.0, atol=1500 * EPS[torch.float32]),
             torch.float64: Tol(rtol=0.0, atol=800 * EPS[torch.float64])}

BACKENDS = ["triton", "cpu", "torch"]
ORDERS = [("token", "token"), ("sorted", "token"), ("token", "sorted"), ("sorted", "sorted")]


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64  # the interpreter has no float64 dot


def _skip(op, backend, dtype):
    reasons = unsupported_reasons(op, backend, torch.device("cpu"), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _ids(layout, M, B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "spans":  # runs of one modality, as interleaved text and image spans
        ids = torch.zeros(B, S, dtype=torch.long)
        for b in range(B):
            cuts = sorted(torch.randperm(S - 1, generator=g)[: 2 * M].add(1).tolist())
            for i, c in enumerate(cuts):
                ids[b, c:] = (i + 1) % M
        return ids
    ids = torch.randint(0, M, (B, S), generator=g)
    if layout == "absent":  # the last modality never occurs
        ids = ids.clamp(max=max(M - 2, 0))
    return ids


# ---- ops ----

@pytest.mark.parametrize("backend", BACKENDS + ["cpu"])
@pytest.mark.parametrize("orders", ORDERS, ids=lambda o: f"{o[0]}-to-{o[1]}")
@pytest.mark.parametrize("counts", [[5, 0, 38], [1, 1, 1], [33, 31]], ids=str)
def test_grouped_linear_orders(counts, orders, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    _skip("grouped_mm", backend, dtype)
    G, K, N = len(counts), 19, 35
    ids = torch.repeat_interleave(torch.arange(G), torch.tensor(counts))[torch.randperm(sum(counts))]
    plan = smk.group_plan(ids, G)
    x = torch.randn(sum(counts), K, dtype=dtype, requires_grad=True)
    w = torch.randn(G, N, K, dtype=dtype, requires_grad=True)
    b = torch.randn(G, N, dtype=dtype, requires_grad=True)
    inp, outp = orders
    perm = plan.sorted_to_orig
    g_of_input = ids if inp == "token" else ids[perm]

    def truth(x64, w64, b64):  # independent: F.linear per row with its group's weights, in the stated orders
        rows = torch.stack([F.linear(x64[i], w64[g_of_input[i]], b64[g_of_input[i]]) for i in range(len(ids))])
        if inp != outp:  # token -> sorted: sorted position r holds token sorted_to_orig[r]; and back
            rows = rows[plan.sorted_to_orig] if inp == "token" else rows[plan.orig_to_sorted]
        return rows

    check_multilinear(
        lambda x, w, b: smk.grouped_linear(x, w, plan, b, input_order=inp, output_order=outp, backend=backend),
        truth, [x, w, b], dtype, DEFAULT_TOL[dtype],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("counts", [[4, 0, 9], [1], [0, 17]], ids=str)
def test_grouped_norms_match_a_per_slice_loop(counts, norm, backend):
    dtype = _dtype(backend)
    _skip("modality_norm", backend, dtype)
    G, D = len(counts), 24
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = torch.randn(sum(counts), D, dtype=dtype, requires_grad=True)
    w = (torch.rand(G, D, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(G, D, dtype=dtype, requires_grad=True)
    if norm == "rms":
        y = smk.grouped_rms_norm(x, w, offsets, 1e-5, backend=backend)
    else:
        y = smk.grouped_layer_norm(x, w, b, offsets, 1e-5, backend=backend)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    pieces = []
    for g in range(G):
        xs = x64[offsets[g] : offsets[g + 1]]
        if norm == "rms":
            pieces.append(F.rms_norm(xs, (D,), w64[g], 1e-5))
        else:
            pieces.append(F.layer_norm(xs, (D,), w64[g], b64[g], 1e-5))
    ref = torch.cat(pieces)
    dy = torch.randn_like(ref)
    rows_group = torch.repeat_interleave(torch.arange(G), torch.tensor(counts))
    s_out, s_dx, s_dw, s_db = norm_scales(norm, x, rows_group, w, b if norm == "layer" else None, dy)
    tol = NORM_TOL.get(dtype, Tol(rtol=0.0, atol=2.5 * EPS[torch.float64]))
    assert_close_verbose(y, ref, dtype, "y", tol=tol, scale=s_out)
    leaves = (x, w) if norm == "rms" else (x, w, b)
    leaves64 = (x64, w64) if norm == "rms" else (x64, w64, b64)
    for got, want, name, sc in zip(torch.autograd.grad(y, leaves, dy.to(dtype)), torch.autograd.grad(ref, leaves64, dy),
                                   ("dx", "dw", "db"), (s_dx, s_dw, s_db)):
        assert_close_verbose(got, want, dtype, name, tol=tol, scale=sc)
    empty = [g for g, c in enumerate(counts) if c == 0]
    if empty:
        (dw,) = torch.autograd.grad(
            smk.grouped_rms_norm(x, w, offsets, backend=backend), w, torch.randn(sum(counts), D, dtype=dtype)
        )
        assert not dw[empty].any(), "weight gradient of an empty group must be exactly zero"


def test_sort_and_unsort_rows_are_inverse_and_differentiable():
    ids = torch.tensor([[2, 0, 1, 0], [1, 1, 2, 0]])
    plan = smk.group_plan(ids, 3)
    x = torch.randn(8, 3, 5, dtype=torch.float64, requires_grad=True)
    xs = smk.sort_rows(x, plan)
    assert torch.equal(xs, x[plan.sorted_to_orig])
    assert torch.equal(smk.unsort_rows(xs, plan), x)
    assert torch.autograd.gradcheck(lambda t: smk.sort_rows(t, plan), (x,))
    assert torch.autograd.gradgradcheck(lambda t: smk.unsort_rows(t, plan) * t, (x,))
    with pytest.raises(ValueError, match="`x`"):
        smk.sort_rows(torch.randn(7, 3), plan)


# ---- modules: forward_sorted chained vs the token-order mask-loop reference ----

B, S, DIM, HEADS, HIDDEN = 2, 10, 32, 4, 40
CASES = [  # (M, layout, block kwargs)
    (1, "random", dict()),
    (2, "random", dict()),
    (2, "spans", dict(norm_placement="pre", qk_norm=True)),
    (3, "random", dict(norm="layer", n_kv_heads=2)),
    (3, "absent", dict(qk_norm=True)),
    (3, "spans", dict()),
]


def _perturb(module):
    with torch.no_grad():  # norms start at one and per-modality copies are equal: make every modality differ
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-{c[1]}-{len(c[2])}")
def test_chained_sorted_blocks_match_token_order_reference(case, backend):
    M, layout, kw = case
    dtype = _dtype(backend)
    _skip("modality_norm", backend, dtype)
    torch.manual_seed(1)
    blocks = [MoTBlock(DIM, HEADS, HIDDEN, M, backend=backend, **kw).to(dtype) for _ in range(2)]
    for blk in blocks:
        _perturb(blk)
    ids = _ids(layout, M, B, S)
    x = torch.randn(B, S, DIM, dtype=dtype, requires_grad=True)
    plan = smk.group_plan(ids, M) if M > 1 else None
    h = smk.sort_rows(x.reshape(B * S, DIM), plan) if plan is not None else x.reshape(B * S, DIM)
    for blk in blocks:
        h = blk.forward_sorted(h, plan, (B, S), ids)
    y = (smk.unsort_rows(h, plan) if plan is not None else h).view(B, S, DIM)
    refs = [copy.deepcopy(blk).double() for blk in blocks]
    x64 = x.detach().double().requires_grad_(True)
    r = x64
    for blk in refs:
        r = mot_block_ref(blk, r, ids, math_attention=False)
    tol = BLOCK_TOL[dtype]
    assert_close_verbose(y, r, dtype, "out", tol=tol)
    dy = torch.randn_like(r)
    y.backward(dy.to(dtype))
    r.backward(dy)
    assert_close_verbose(x.grad, x64.grad, dtype, "dx", tol=tol)
    for blk, ref in zip(blocks, refs):
        for (name, p), (_, p64) in zip(blk.named_parameters(), ref.named_parameters()):
            assert_close_verbose(p.grad, p64.grad, dtype, f"d{name}", tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,layout", [(1, "random"), (2, "spans"), (3, "absent")])
def test_transformer_sorted_stream_matches_reference(M, layout, backend):
    dtype = _dtype(backend)
    _skip("modality_norm", backend, dtype)
    torch.manual_seed(2)
    model = MoTTransformer(37, DIM, 2, HEADS, HIDDEN, M, qk_norm=True, backend=backend).to(dtype)
    _perturb(model)
    tokens, ids = torch.randint(0, 37, (B, S)), _ids(layout, M, B, S, seed=3)
    logits = model(tokens, ids if M > 1 else None)
    ref_model = copy.deepcopy(model).double()
    h = ref_model.embed(tokens)
    for layer in ref_model.layers:
        h = mot_block_ref(layer, h, ids, math_attention=False)
    ref = ref_model.lm_head(_norm(ref_model.norm, h, ids))
    assert_close_verbose(logits, ref, dtype, "logits", tol=BLOCK_TOL[dtype])
    dy = torch.randn_like(ref)
    logits.backward(dy.to(dtype))
    ref.backward(dy)
    for (name, p), (_, p64) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert_close_verbose(p.grad, p64.grad, dtype, f"d{name}", tol=BLOCK_TOL[dtype])


@pytest.mark.parametrize("M", [1, 3])
def test_every_forward_sorted_equals_its_token_order_forward(M):
    torch.manual_seed(4)
    dtype = torch.float64
    ids = _ids("random", M, B, S)
    plan = smk.group_plan(ids, M) if M > 1 else None
    x = torch.randn(B, S, DIM, dtype=dtype)

    def sort(t):
        t = t.reshape(B * S, -1)
        return smk.sort_rows(t, plan) if plan is not None else t

    modules = [
        (MoTRMSNorm(DIM, M, dtype=dtype), dict()),
        (MoTLayerNorm(DIM, M, dtype=dtype), dict()),
        (MoTFeedForward(DIM, HIDDEN, M, dtype=dtype), dict()),
        (MoTAttention(DIM, HEADS, M, qk_norm=True, dtype=dtype), dict(batch_shape=(B, S), modality_ids=ids)),
    ]
    for module, extra in modules:
        _perturb(module)
        want = module(x, ids if M > 1 else None)
        got = module.forward_sorted(sort(x), plan, **extra)
        name = type(module).__name__
        torch.testing.assert_close(got, sort(want), msg=lambda m, name=name: f"{name}: {m}")
    if M > 1:
        lin = MoTLinear(DIM, 7, M, bias=True, dtype=dtype)
        torch.testing.assert_close(lin.forward_sorted(sort(x), plan), sort(lin(x, ids)))


def test_forward_sorted_checks_its_arguments():
    block = MoTBlock(DIM, HEADS, HIDDEN, 2)
    ids = _ids("random", 2, B, S)
    plan = smk.group_plan(ids, 2)
    h = torch.randn(B * S, DIM)
    with pytest.raises(TypeError, match="`plan`"):
        block.forward_sorted(h, None, (B, S), ids)
    with pytest.raises(ValueError, match="`batch_shape`"):
        block.forward_sorted(h, plan, (B, S + 1), ids)
    with pytest.raises(ValueError, match="`x`"):
        block.forward_sorted(h.view(B, S, DIM), plan, (B, S), ids)
    with pytest.raises(ValueError, match="`plan`"):
        block.forward_sorted(h[:-1], plan, (B, S), ids)
    # The ids default to those the plan was built from.
    torch.testing.assert_close(block.forward_sorted(h, plan, (B, S)), block.forward_sorted(h, plan, (B, S), ids))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the embedding's: its input has no grad
@pytest.mark.parametrize("M", [1, 2])
def test_sorted_stream_runs_every_submodule_through_its_hooks(M):
    # The sorted entry points are module calls: forward hooks and full backward hooks of every submodule fire when
    # a model keeps the sorted stream (what profilers, FSDP's unshard hooks and user hooks rely on).
    torch.manual_seed(5)
    model = MoTTransformer(37, DIM, 2, HEADS, HIDDEN, M, qk_norm=True)
    tokens, ids = torch.randint(0, 37, (B, S)), _ids("random", M, B, S)
    fwd, bwd, handles = set(), set(), []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: fwd.add(name)))
            handles.append(module.register_full_backward_hook(lambda m, gi, go, name=name: bwd.add(name)))
    model(tokens, ids if M > 1 else None).sum().backward()
    for h in handles:
        h.remove()
    leaves = {n for n, _ in model.named_modules() if n and n != "layers"}
    assert fwd == leaves
    assert bwd == leaves
    # sorted_rows is the documented flag behind forward_sorted
    plan = smk.group_plan(ids, M) if M > 1 else None
    h = torch.randn(B * S, DIM)
    block = model.layers[0]
    torch.testing.assert_close(block(h, ids, plan, sorted_rows=True, batch_shape=(B, S)),
                               block.forward_sorted(h, plan, (B, S), ids))
    with pytest.raises(TypeError, match="`batch_shape`"):
        block(h, ids, plan, sorted_rows=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_grouped_norm_residual_is_added_in_the_op(norm, backend):
    """``residual + norm(x)``: the same bits as the add done outside (the norm's output plus the residual, one
    rounding), the residual's gradient the output's, and ``residual`` may be ``x`` itself or strided."""
    dtype = _dtype(backend)
    _skip("modality_norm", backend, dtype)
    offsets = torch.tensor([0, 5, 5, 12])
    x = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    w = (torch.rand(3, 16, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(3, 16, dtype=dtype, requires_grad=True)
    base = torch.randn(12, 40, dtype=dtype)
    r = base[:, 3:19].requires_grad_(True)  # row stride 40

    def norm_of(x, **kw):
        if norm == "rms":
            return smk.grouped_rms_norm(x, w, offsets, backend=backend, **kw)
        return smk.grouped_layer_norm(x, w, b, offsets, backend=backend, **kw)

    for residual in (r, x):
        fused = norm_of(x, residual=residual)
        apart = residual + norm_of(x)
        assert torch.equal(fused, apart)
        dy = torch.randn_like(fused)
        leaves = [x, w, r] if residual is r else [x, w]
        for got, want in zip(torch.autograd.grad(fused, leaves, dy), torch.autograd.grad(apart, leaves, dy)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_norm_residual_errors_and_module_paths():
    offsets = torch.tensor([0, 2, 5])
    x, w = torch.randn(5, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"`residual` must have the shape of `x` \(5, 4\)"):
        smk.grouped_rms_norm(x, w, offsets, residual=torch.randn(5, 3))
    with pytest.raises(TypeError, match="`residual`"):
        smk.grouped_rms_norm(x, w, offsets, residual=torch.randn(5, 4, dtype=torch.float64))
    ids = torch.tensor([[0, 1, 1, 0, 1]])
    plan = smk.group_plan(ids, 2)
    for M in (1, 2):
        norm = MoTRMSNorm(4, M)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        p = plan if M > 1 else None
        h = torch.randn(5, 4)
        assert torch.equal(norm.forward_sorted(x, p, residual=h), h + norm.forward_sorted(x, p))
        with pytest.raises(ValueError, match="`residual` is taken with sorted rows only"):
            norm(x[None], ids[:, :5] if M > 1 else None, residual=h[None])
