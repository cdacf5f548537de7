"""modality_rms_norm / modality_layer_norm on every available backend vs the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from sparsemm_kernels.backend import BackendUnavailableError, unsupported_reasons
from sparsemm_kernels.ops.norms import modality_layer_norm, modality_rms_norm
from sparsemm_kernels.reference.norms import modality_layer_norm_ref, modality_rms_norm_ref
from sparsemm_kernels.utils.testing import assert_close_verbose, ids_from_counts

# (tokens per modality, D, modalities interleaved?). The interpreter is slow (about 10 ms per row for forward
# and backward): few rows, many edges. The backward splits rows over at most 8 programs there.
CASES = [
    ([7], 16, False),               # M = 1
    ([5, 9], 33, True),             # M = 2, D off the power of two
    ([12, 0, 9], 96, True),         # middle modality absent: its weight/bias grads exactly 0
    ([1, 20, 6], 64, False),        # a modality with one token; contiguous runs
    ([3, 4, 2], 3, True),           # tiny odd D (D = 2 makes the LayerNorm dx a pure cancellation)
    ([0, 0, 0], 8, False),          # R = 0
    ([23, 17, 11], 40, True),       # several rows per program, uneven last block
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]
NORMS = ["rms", "layer"]


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("modality_norm", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _params(norm, M, D, dtype, device, bias=True):
    """Weights around 1 and biases around 0, as after training; distinct per modality."""
    w = (1 + 0.5 * torch.randn(M, D, device=device)).to(dtype).requires_grad_(True)
    b = (0.5 * torch.randn(M, D, device=device)).to(dtype).requires_grad_(True) if norm == "layer" and bias else None
    return w, b


def _run(norm, x, ids, w, b, **kw):
    if norm == "rms":
        return modality_rms_norm(x, ids, w, **kw)
    return modality_layer_norm(x, ids, w, b, **kw)


def _ref(norm, x, ids, w, b, eps=1e-5):
    if norm == "rms":
        return modality_rms_norm_ref(x, ids, w, eps)
    return modality_layer_norm_ref(x, ids, w, b, eps)


def _double(*ts):
    return [t.detach().double().requires_grad_(True) if t is not None else None for t in ts]


def _grads(out, inputs, dy):
    live = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, live, dy))


def _check_against_reference(norm, x, ids, w, b, dtype, backend, dy=None):
    """Forward and every gradient of the op vs the float64 reference; returns the op's grads."""
    out = _run(norm, x, ids, w, b, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    x64, w64, b64 = _double(x, w, b)
    ref = _ref(norm, x64, ids, w64, b64)
    assert_close_verbose(out, ref, dtype, "out")
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(dtype)
    got = _grads(out, [x, w, b], dy)
    want = _grads(ref, [x64, w64, b64], dy.double())
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        assert g.dtype == dtype
        assert_close_verbose(g, r, dtype, name)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", CASES, ids=[f"{len(c[0])}m-{sum(c[0])}r-d{c[1]}" for c in CASES])
def test_matches_reference(case, norm, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    counts, D, interleaved = case
    ids = ids_from_counts(counts, shuffle=interleaved).to(device)
    x = (torch.randn(sum(counts), D, device=device) * 2 + 0.5).to(dtype).requires_grad_(True)
    w, b = _params(norm, len(counts), D, dtype, device)
    got = _check_against_reference(norm, x, ids, w, b, dtype, backend)
    absent = [m for m, c in enumerate(counts) if c == 0]
    for g in got[1:]:
        assert torch.count_nonzero(g[absent]) == 0, "grads of a modality absent from the batch must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_3d_input(norm, dtype, backend, device):
    """x (B, S, D) with ids (B, S); the second sequence is single-modality."""
    _skip_unless_runs(backend, device, dtype)
    B, S, D, M = 2, 11, 24, 3
    ids = torch.randint(0, M, (B, S), device=device)
    ids[1] = 2
    x = torch.randn(B, S, D, device=device).to(dtype).requires_grad_(True)
    w, b = _params(norm, M, D, dtype, device)
    _check_against_reference(norm, x, ids, w, b, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_per_head(norm, dtype, backend, device):
    """QK-norm layout: x (B, S, H, d_h), ids (B, S), weights (M, d_h); every head of a token uses its id."""
    _skip_unless_runs(backend, device, dtype)
    B, S, H, dh, M = 2, 5, 3, 16, 2
    ids = torch.randint(0, M, (B, S), device=device, dtype=torch.int32)
    x = torch.randn(B, S, H, dh, device=device).to(dtype).requires_grad_(True)
    w, b = _params(norm, M, dh, dtype, device)
    _check_against_reference(norm, x, ids, w, b, dtype, backend)
    # The per-head form equals the per-row form with each token's id repeated over its heads.
    per_row = ids[..., None].expand(B, S, H)
    assert torch.equal(_run(norm, x, ids, w, b, backend=backend), _run(norm, x, per_row, w, b, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_per_head_view_of_fused_qkv(norm, backend, device):
    """q as a strided view of a fused qkv projection (as in MoTAttention): read in place, not copied."""
    _skip_unless_runs(backend, device, torch.float32)
    B, S, H, dh, M = 2, 6, 2, 8, 3
    qkv = torch.randn(B * S, 3 * H * dh, device=device, requires_grad=True)
    q = qkv[:, : H * dh].view(B, S, H, dh)
    assert not q.is_contiguous()
    ids = torch.randint(0, M, (B, S), device=device)
    w, b = _params(norm, M, dh, torch.float32, device)
    out = _run(norm, q, ids, w, b, backend=backend)
    qkv64, w64, b64 = _double(qkv, w, b)
    ref = _ref(norm, qkv64[:, : H * dh].view(B, S, H, dh), ids, w64, b64)
    assert_close_verbose(out, ref, torch.float32, "out")
    dy = torch.randn(B, S, H, dh, device=device)
    got, want = _grads(out, [qkv, w, b], dy), _grads(ref, [qkv64, w64, b64], dy.double())
    for name, g, r in zip(("dqkv", "dw", "db"), got, want):
        assert_close_verbose(g, r, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_non_contiguous_x_and_dy(norm, backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    T, D, M = 19, 21, 3
    x = torch.randn(D, 2 * T, device=device).t()[::2]  # (T, D), strides (2, 2T)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    ids = torch.randint(0, M, (T,), device=device)
    w, b = _params(norm, M, D, torch.float32, device)
    dy = torch.randn(D, T, device=device).t()  # column-major grad
    _check_against_reference(norm, x, ids, w, b, torch.float32, backend, dy=dy)
    # (S, B, D) memory seen as (B, S, D): not viewable as rows, so it is copied once.
    xt = torch.randn(7, 2, D, device=device).transpose(0, 1).requires_grad_(True)
    _check_against_reference(norm, xt, torch.randint(0, M, (2, 7), device=device), w, b, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_without_bias_and_partial_grads(backend, device):
    """No bias; then only x needs a gradient; then only the weight (frozen input)."""
    _skip_unless_runs(backend, device, torch.float32)
    T, D, M = 15, 12, 2
    ids = torch.randint(0, M, (T,), device=device)
    x = torch.randn(T, D, device=device, requires_grad=True)
    w, _ = _params("layer", M, D, torch.float32, device, bias=False)
    _check_against_reference("layer", x, ids, w, None, torch.float32, backend)
    x64, w64 = _double(x, w)
    ref = modality_layer_norm_ref(x64, ids, w64)
    dy = torch.randn(T, D, device=device)
    (dx,) = torch.autograd.grad(modality_layer_norm(x, ids, w.detach(), backend=backend), [x], dy)
    assert_close_verbose(dx, torch.autograd.grad(ref, [x64], dy.double(), retain_graph=True)[0], torch.float32, "dx")
    (dw,) = torch.autograd.grad(modality_rms_norm(x.detach(), ids, w, backend=backend), [w], dy)
    ref_rms = modality_rms_norm_ref(x64.detach(), ids, w64)
    assert_close_verbose(dw, torch.autograd.grad(ref_rms, [w64], dy.double())[0], torch.float32, "dw")
    b = torch.zeros(M, D, device=device, requires_grad=True)  # only the bias trains
    (db,) = torch.autograd.grad(modality_layer_norm(x.detach(), ids, w.detach(), b, backend=backend), [b], dy)
    want_db = torch.zeros(M, D, dtype=torch.float64, device=device).index_add(0, ids, dy.double())
    assert_close_verbose(db, want_db, torch.float32, "db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_modalities(backend, device):
    """M = 64 in one one-hot block, and M = 70 split into two modality chunks, with absent modalities."""
    _skip_unless_runs(backend, device, torch.float32)
    for M in (64, 70):
        T, D = 40, 8
        ids = torch.randint(0, M, (T,), device=device)
        ids[0] = M - 1
        x = torch.randn(T, D, device=device, requires_grad=True)
        w, b = _params("layer", M, D, torch.float32, device)
        got = _check_against_reference("layer", x, ids, w, b, torch.float32, backend)
        absent = torch.ones(M, dtype=torch.bool, device=device).index_fill(0, ids, False)
        assert torch.count_nonzero(got[1][absent]) == 0 and torch.count_nonzero(got[2][absent]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_one_modality_equals_torch_functional(norm, backend, device):
    _skip_unless_runs(backend, device, torch.float32)
    T, D, eps = 13, 20, 1e-6
    x = torch.randn(T, D, device=device, requires_grad=True)
    w, b = _params(norm, 1, D, torch.float32, device)
    ids = torch.zeros(T, dtype=torch.long, device=device)
    if norm == "rms":
        out = modality_rms_norm(x, ids, w, eps, backend=backend)
        want = F.rms_norm(x, (D,), w[0], eps)
    else:
        out = modality_layer_norm(x, ids, w, b, eps, backend=backend)
        want = F.layer_norm(x, (D,), w[0], b[0], eps)
    assert_close_verbose(out, want, torch.float32, "out")
    dy = torch.randn(T, D, device=device)
    for name, g, r in zip(("dx", "dw", "db"), _grads(out, [x, w, b], dy), _grads(want, [x, w, b], dy)):
        assert_close_verbose(g, r, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_repeated_runs_are_bitwise_identical(norm, dtype, device):
    _skip_unless_runs("triton", device, dtype)
    T, D, M = 45, 24, 3
    ids = torch.randint(0, M, (T,), device=device)
    x = torch.randn(T, D, device=device).to(dtype)
    w, b = _params(norm, M, D, dtype, device)
    dy = torch.randn(T, D, device=device).to(dtype)
    results = []
    for _ in range(3):
        xs, ws, bs = (t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b))
        out = _run(norm, xs, ids, ws, bs, backend="triton")
        results.append([out.detach(), *_grads(out, [xs, ws, bs], dy)])
    for later in results[1:]:
        for a, c in zip(results[0], later):
            assert torch.equal(a, c)


X = torch.randn(2, 3, 4)
IDS = torch.tensor([[0, 1, 1], [1, 0, 0]])
W = torch.ones(2, 4)
B = torch.zeros(2, 4)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(x=X.long()), TypeError, "x"),
        (dict(x=[1.0]), TypeError, "x"),
        (dict(x=torch.randn(2, 3, 0), weight=torch.ones(2, 0), bias=None), ValueError, "x"),   # D = 0
        (dict(ids=IDS.float()), TypeError, "modality_ids"),                                     # float ids
        (dict(ids=IDS[:, :2]), ValueError, "modality_ids"),                                     # shape matches neither
        (dict(ids=IDS.t()), ValueError, "modality_ids"),
        (dict(ids=torch.tensor([[0, 1, 2], [0, 0, 0]])), ValueError, "modality_ids"),          # id 2 with M = 2
        (dict(ids=torch.tensor([[0, -1, 0], [0, 0, 0]])), ValueError, "modality_ids"),         # negative id
        (dict(ids=IDS.to("meta")), ValueError, "modality_ids"),                                 # device mismatch
        (dict(weight=W[0]), ValueError, "weight"),                                              # not 2-D
        (dict(weight=torch.ones(2, 5)), ValueError, "weight"),                                  # dim != D
        (dict(weight=W.double()), TypeError, "weight"),                                         # dtype mismatch
        (dict(weight=W.long()), TypeError, "weight"),
        (dict(weight=W.to("meta")), ValueError, "weight"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="1e-5"), TypeError, "eps"),
        (dict(eps=True), TypeError, "eps"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
@pytest.mark.parametrize("norm", NORMS)
def test_bad_input(norm, kwargs, exc, name):
    args = dict(x=X, ids=IDS, weight=W, bias=B, eps=1e-5, backend=None)
    args.update(kwargs)
    with pytest.raises(exc, match=f"`{name}`"):
        if norm == "rms":
            modality_rms_norm(args["x"], args["ids"], args["weight"], args["eps"], backend=args["backend"])
        else:
            modality_layer_norm(
                args["x"], args["ids"], args["weight"], args["bias"], args["eps"], backend=args["backend"]
            )


@pytest.mark.parametrize(
    "bias,exc",
    [
        (torch.zeros(2, 5), ValueError),    # dim != D
        (torch.zeros(3, 4), ValueError),    # M != weight's M
        (torch.zeros(4), ValueError),       # not 2-D
        (B.half(), TypeError),              # dtype mismatch
        (B.to("meta"), ValueError),         # device mismatch
        ("0", TypeError),
    ],
)
def test_layer_norm_bad_bias(bias, exc):
    with pytest.raises(exc, match="`bias`"):
        modality_layer_norm(X, IDS, W, bias)


def test_forced_triton_reports_why_it_cannot_run():
    with pytest.raises(BackendUnavailableError, match="float64"):
        modality_rms_norm(X.double(), IDS, W.double(), backend="triton")
    _skip_unless_runs("triton", "cpu", torch.float32)
    from sparsemm_kernels.kernels.triton.norms import MAX_FUSED_D

    D = MAX_FUSED_D + 1
    with pytest.raises(BackendUnavailableError, match=f"D = {D}"):
        modality_rms_norm(torch.randn(2, D), torch.zeros(2, dtype=torch.long), torch.ones(1, D), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_bf16_realistic_size_on_gpu(norm):
    """8192 rows x 1024 and a QK-norm layout (4, 1024, 16, 128), bf16, three modalities."""
    dev = torch.device("cuda")
    for shape, ids_shape in (((8192, 1024), (8192,)), ((4, 1024, 16, 128), (4, 1024))):
        ids = torch.randint(0, 3, ids_shape, device=dev)
        x = torch.randn(shape, device=dev).to(torch.bfloat16).requires_grad_(True)
        w, b = _params(norm, 3, shape[-1], torch.bfloat16, dev)
        _check_against_reference(norm, x, ids, w, b, torch.bfloat16, "triton")
