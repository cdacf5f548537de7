"""modality_rms_norm / modality_layer_norm on every backend vs an independent float64 truth.

The truth is ``F.rms_norm`` / ``F.layer_norm`` applied, modality by modality, to the rows of that modality with
that modality's weights (not ``sparsemm_kernels.reference``, which *is* the ``torch`` backend). Each element is
checked against ``rtol * |want| + atol * scale * sqrt(L)`` (see ``sparsemm_kernels.utils.testing``), with
``scale`` the magnitude of what makes the element (:func:`_scales`) and ``L`` the number of summed terms.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsemm_kernels.backend import BackendUnavailableError, unsupported_reasons
from sparsemm_kernels.ops.norms import modality_layer_norm, modality_rms_norm
from sparsemm_kernels.utils.testing import EPS, EPS32, Tol, assert_close_verbose, ids_from_counts

FP16, BF16 = torch.float16, torch.bfloat16
# Measured worst ratios over this module (SPARSEMM_TOL_LOG; interpreter and CPU torch, both backends, both
# norms, every dtype):
# * float32: err <= 0.84 eps32 * scale * sqrt(L) (dx; out 0.47, db 0.48, dW 0.32) -> atol = 2.5 eps32.
# * float16: one float32 computation rounded once: (err - atol term) <= 0.50 eps16 |want| -> rtol = 1.5 eps16.
# * bfloat16: 0.99 eps |want| (the interpreter rounds float32 -> bfloat16 toward zero; see test_grouped_mm)
#   -> rtol = 3 eps.
TOL = {
    torch.float32: Tol(rtol=0.0, atol=2.5 * EPS32),
    FP16: Tol(rtol=1.5 * EPS[FP16], atol=2.5 * EPS32),
    BF16: Tol(rtol=3 * EPS[BF16], atol=2.5 * EPS32),
}

# (tokens per modality, D, modalities interleaved?). The interpreter is slow (about 10 ms per row for forward
# and backward): few rows, many edges. The backward splits rows over at most 8 programs there. Every input has
# rows of very different size (x 1e-2 .. 1e1), so eps matters in the small ones.
CASES = [
    ([7], 16, False),               # M = 1
    ([5, 9], 33, True),             # M = 2, D off the power of two
    ([12, 0, 9], 96, True),         # middle modality absent: its weight/bias grads exactly 0
    ([1, 20, 6], 64, False),        # a modality with one token; contiguous runs
    ([3, 4, 2], 3, True),           # tiny odd D (D = 2 makes the LayerNorm dx a pure cancellation)
    ([0, 0, 0], 8, False),          # R = 0
    ([23, 17, 11], 40, True),       # several rows per program, uneven last block
    ([40, 0, 60], 96, True),        # 100 rows: 4 forward row tiles (32 rows at D=96), 2 backward steps per program
]
DTYPES = [torch.float32, FP16, BF16]
BACKENDS = ["triton", "cpu", "torch"]
NORMS = ["rms", "layer"]
EPS_NORM = 1e-5


def _skip_unless_runs(backend, device, dtype):
    reasons = unsupported_reasons("modality_norm", backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _x(shape, dtype, device):
    """Rows of very different magnitude (1e-2 .. 1e1) with a nonzero mean; needs grad."""
    scale = 10 ** torch.empty(*shape[:-1], 1, device=device).uniform_(-2, 1)
    return ((torch.randn(shape, device=device) + 0.5) * scale).to(dtype).requires_grad_(True)


def _params(norm, M, D, dtype, device, bias=True):
    """Weights around 1 and biases around 0, as after training; distinct per modality."""
    w = (1 + 0.5 * torch.randn(M, D, device=device)).to(dtype).requires_grad_(True)
    b = (0.5 * torch.randn(M, D, device=device)).to(dtype).requires_grad_(True) if norm == "layer" and bias else None
    return w, b


def _run(norm, x, ids, w, b, **kw):
    if norm == "rms":
        return modality_rms_norm(x, ids, w, EPS_NORM, **kw)
    return modality_layer_norm(x, ids, w, b, EPS_NORM, **kw)


def _rows(x, ids):
    """``x`` as ``(R, D)`` rows and each row's modality (per-head ids repeat over the heads)."""
    if ids.dim() == x.dim() - 2:
        ids = ids[..., None].expand(*ids.shape, x.shape[-2])
    return x.reshape(-1, x.shape[-1]), ids.reshape(-1)


def _truth(norm, x, ids, w, b):
    """Per modality, torch's own norm over that modality's rows with its weights (float64, differentiable)."""
    xr, rid = _rows(x, ids)
    D = xr.shape[-1]
    out = xr.new_zeros(xr.shape)
    for m in range(w.shape[0]):
        sel = rid == m
        if norm == "rms":
            ym = F.rms_norm(xr[sel], (D,), w[m], EPS_NORM)
        else:
            ym = F.layer_norm(xr[sel], (D,), w[m], None if b is None else b[m], EPS_NORM)
        out = out.index_put((sel,), ym)
    return out.reshape(x.shape)


def _scales(norm, x, ids, w, b, dy):
    """Per-element ``scale * sqrt(L)`` of out, dx, dW, db (float64), from the error model.

    ``x_hat = (x - mu) rstd`` is known to ``eps * h * sqrt(D)`` with ``h = (|x - mu| + mean|x|) rstd``
    (``|x| rstd`` for RMSNorm): the row sums of the statistics have D terms and ``x - mu`` cancels. Then
    out: ``h |w| sqrt(D) + |b|``;  dx: ``rstd (|g| + h mean(|g| h) [+ mean|g|]) sqrt(D)`` with ``g = w dy``;
    dW: ``sum over the modality's rows of |dy| h sqrt(D)``, db: ``sum |dy|``, both times sqrt(rows).
    """
    xr, rid = _rows(x.detach().double(), ids)
    dyr = dy.detach().double().reshape(xr.shape)
    R, D = xr.shape
    M = w.shape[0]
    wr = w.detach().double()[rid]
    mu = xr.mean(-1, keepdim=True) if norm == "layer" else torch.zeros_like(xr[:, :1])
    rstd = ((xr - mu).square().mean(-1, keepdim=True) + EPS_NORM).rsqrt()
    h = (xr - mu).abs() * rstd
    if norm == "layer":
        h = h + xr.abs().mean(-1, keepdim=True) * rstd
    sqrt_d = D**0.5
    s_out = h * wr.abs() * sqrt_d
    if b is not None:
        s_out = s_out + b.detach().double().abs()[rid]
    g = (wr * dyr).abs()
    s_dx = rstd * (g + h * (g * h).mean(-1, keepdim=True))
    if norm == "layer":
        s_dx = s_dx + rstd * g.mean(-1, keepdim=True)
    s_dx = s_dx * sqrt_d
    zeros = torch.zeros(M, D, dtype=torch.float64, device=xr.device)
    count = zeros[:, 0].index_add(0, rid, torch.ones(R, dtype=torch.float64, device=xr.device))
    s_dw = zeros.index_add(0, rid, dyr.abs() * h) * sqrt_d
    s_db = zeros.index_add(0, rid, dyr.abs())
    root = count.sqrt()[:, None]
    return s_out.reshape(x.shape), s_dx.reshape(x.shape), s_dw * root, s_db * root


def check_against_truth(norm, x, ids, w, b, dtype, backend, dy=None):
    """Forward and every gradient of the op vs the float64 truth; returns the op's gradients.

    ``x`` (and ``w``, ``b``) need grad; they may be views (strided layouts reach the op as they are).
    """
    tol = TOL[dtype]
    out = _run(norm, x, ids, w, b, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    want = _truth(norm, x64, ids, w64, b64)
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(dtype)
    s_out, s_dx, s_dw, s_db = _scales(norm, x, ids, w, b, dy)
    assert_close_verbose(out, want, dtype, "out", tol=tol, scale=s_out)
    live = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, live, dy)
    want_g = torch.autograd.grad(want, [t for t in (x64, w64, b64) if t is not None], dy.double())
    for name, g, r, s in zip(("dx", "dw", "db"), got, want_g, (s_dx, s_dw, s_db)):
        assert g.dtype == dtype
        assert_close_verbose(g, r, dtype, name, tol=tol, scale=s)
    return got


def _case_id(c):
    return f"{len(c[0])}m-{sum(c[0])}r-d{c[1]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_truth(case, norm, dtype, backend, device):
    _skip_unless_runs(backend, device, dtype)
    counts, D, interleaved = case
    ids = ids_from_counts(counts, shuffle=interleaved).to(device)
    x = _x((sum(counts), D), dtype, device)
    w, b = _params(norm, len(counts), D, dtype, device)
    got = check_against_truth(norm, x, ids, w, b, dtype, backend)
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
    x = _x((B, S, D), dtype, device)
    w, b = _params(norm, M, D, dtype, device)
    check_against_truth(norm, x, ids, w, b, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_per_head(norm, dtype, backend, device):
    """QK-norm layout: x (B, S, H, d_h), ids (B, S), weights (M, d_h); every head of a token uses its id."""
    _skip_unless_runs(backend, device, dtype)
    B, S, H, dh, M = 2, 5, 3, 16, 2
    ids = torch.randint(0, M, (B, S), device=device, dtype=torch.int32)
    x = _x((B, S, H, dh), dtype, device)
    w, b = _params(norm, M, dh, dtype, device)
    check_against_truth(norm, x, ids, w, b, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_per_head_view_of_fused_qkv(norm, backend, device):
    """q as a strided view of a fused qkv projection (as in MoTAttention): read in place, not copied."""
    _skip_unless_runs(backend, device, torch.float32)
    B, S, H, dh, M = 2, 6, 2, 8, 3
    qkv = _x((B * S, 3 * H * dh), torch.float32, device)
    q = qkv[:, : H * dh].view(B, S, H, dh)
    assert not q.is_contiguous()
    ids = torch.randint(0, M, (B, S), device=device)
    w, b = _params(norm, M, dh, torch.float32, device)
    check_against_truth(norm, q, ids, w, b, torch.float32, backend)


def _col_major(shape, device):
    return torch.randn(tuple(reversed(shape)), device=device).permute(*reversed(range(len(shape))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, FP16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_strided_operands(norm, dtype, backend, device):
    """Column-major x and dY; a row-padded dY; a stride-0 (expanded) dY; a (S, B, D) x seen as (B, S, D);
    column-strided weight and bias (the API accepts any layout)."""
    _skip_unless_runs(backend, device, dtype)
    T, D, M = 19, 37, 3
    ids = torch.randint(0, M, (T,), device=device)
    w = (1 + 0.5 * torch.randn(D, M, device=device)).to(dtype).requires_grad_(True).t()
    b = (0.5 * torch.randn(D, M, device=device)).to(dtype).requires_grad_(True).t() if norm == "layer" else None
    assert not w.is_contiguous()
    x = (_col_major((T, D), device) * 3).to(dtype).requires_grad_(True)
    assert x.stride(0) == 1
    dys = {
        "col-major": _col_major((T, D), device).to(dtype),
        "row-padded": torch.randn(T, D + 9, device=device).to(dtype)[:, 4 : 4 + D],
        "expanded": torch.randn(1, D, device=device).to(dtype).expand(T, D),
    }
    for dy in dys.values():
        check_against_truth(norm, x, ids, w, b, dtype, backend, dy=dy)
    # (S, B, D) memory seen as (B, S, D): not viewable as rows, so it is copied once; dY transposed likewise.
    xt = _x((7, 2, D), dtype, device).transpose(0, 1)
    dyt = torch.randn(7, 2, D, device=device).to(dtype).transpose(0, 1)
    check_against_truth(norm, xt, torch.randint(0, M, (2, 7), device=device), w, b, dtype, backend, dy=dyt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_without_bias_and_partial_grads(backend, device):
    """No bias; then only x needs a gradient; then only the weight (frozen input); then only the bias."""
    _skip_unless_runs(backend, device, torch.float32)
    T, D, M = 15, 12, 2
    tol = TOL[torch.float32]
    ids = torch.randint(0, M, (T,), device=device)
    x = _x((T, D), torch.float32, device)
    w, _ = _params("layer", M, D, torch.float32, device, bias=False)
    check_against_truth("layer", x, ids, w, None, torch.float32, backend)
    dy = torch.randn(T, D, device=device)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    _, s_dx, s_dw, s_db = _scales("layer", x, ids, w, None, dy)
    (dx,) = torch.autograd.grad(modality_layer_norm(x, ids, w.detach(), backend=backend), [x], dy)
    (want,) = torch.autograd.grad(_truth("layer", x64, ids, w64.detach(), None), [x64], dy.double())
    assert_close_verbose(dx, want, torch.float32, "dx", tol=tol, scale=s_dx)
    _, _, s_dw, _ = _scales("rms", x, ids, w, None, dy)
    (dw,) = torch.autograd.grad(modality_rms_norm(x.detach(), ids, w, backend=backend), [w], dy)
    (want,) = torch.autograd.grad(_truth("rms", x64.detach(), ids, w64, None), [w64], dy.double())
    assert_close_verbose(dw, want, torch.float32, "dw", tol=tol, scale=s_dw)
    b = torch.zeros(M, D, device=device, requires_grad=True)  # only the bias trains
    (db,) = torch.autograd.grad(modality_layer_norm(x.detach(), ids, w.detach(), b, backend=backend), [b], dy)
    want_db = torch.zeros(M, D, dtype=torch.float64, device=device).index_add(0, ids, dy.double())
    assert_close_verbose(db, want_db, torch.float32, "db", tol=tol, scale=s_db)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_modalities(backend, device):
    """M = 64 in one one-hot block, and M = 70 split into two modality chunks, with absent modalities."""
    _skip_unless_runs(backend, device, torch.float32)
    for M in (64, 70):
        T, D = 40, 8
        ids = torch.randint(0, M, (T,), device=device)
        ids[0] = M - 1
        x = _x((T, D), torch.float32, device)
        w, b = _params("layer", M, D, torch.float32, device)
        got = check_against_truth("layer", x, ids, w, b, torch.float32, backend)
        absent = torch.ones(M, dtype=torch.bool, device=device).index_fill(0, ids, False)
        assert torch.count_nonzero(got[1][absent]) == 0 and torch.count_nonzero(got[2][absent]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("M,D", [(70, 8), (3, 4096)])
def test_frozen_weight_dx_with_several_modality_chunks(M, D, norm, backend, device):
    """Only x needs a gradient (frozen norm weights) while the weight-gradient split would take several modality
    chunks (M past the one-hot block: 70 at D=8, 3 at D=4096): every row of dx is written and right."""
    _skip_unless_runs(backend, device, torch.float32)
    T = 16
    ids = torch.arange(T, device=device) % M
    x = _x((T, D), torch.float32, device)
    w, b = _params(norm, M, D, torch.float32, device)
    dy = torch.randn(T, D, device=device)
    b = b.detach() if b is not None else None
    (dx,) = torch.autograd.grad(_run(norm, x, ids, w.detach(), b, backend=backend), [x], dy)
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(
        _truth(norm, x64, ids, w.detach().double(), None if b is None else b.double()), [x64], dy.double())
    _, s_dx, _, _ = _scales(norm, x, ids, w, b, dy)
    assert_close_verbose(dx, want, torch.float32, "dx", tol=TOL[torch.float32], scale=s_dx)


def test_partial_memory_bound_keeps_the_gradients(monkeypatch, device):
    """With the weight-gradient partials bounded to one row block's worth, the triton backward still matches."""
    from sparsemm_kernels.kernels.triton import norms as triton_norms

    _skip_unless_runs("triton", device, torch.float32)
    monkeypatch.setattr(triton_norms, "_MAX_PARTIAL_ENTRIES", 1)
    T, D, M = 37, 24, 3
    ids = torch.randint(0, M, (T,), device=device)
    x = _x((T, D), torch.float32, device)
    w, b = _params("layer", M, D, torch.float32, device)
    check_against_truth("layer", x, ids, w, b, torch.float32, "triton")


@pytest.mark.parametrize("norm", NORMS)
def test_weight_without_rows_is_refused(norm):
    # M = 0 with rows to normalise: no modality's weights exist (a kernel would read before `weight`).
    empty = torch.ones(0, 4)
    with pytest.raises(ValueError, match="`weight` has no rows"):
        _run(norm, X, torch.zeros(2, 3, dtype=torch.long), empty, torch.zeros(0, 4), validate=False)


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
        x = _x(shape, torch.bfloat16, dev)
        w, b = _params(norm, 3, shape[-1], torch.bfloat16, dev)
        check_against_truth(norm, x, ids, w, b, torch.bfloat16, "triton")


def test_torch_backend_output_is_contiguous_like_its_fake():
    # A dense but transposed x: the output is contiguous, as the fake implementation (what torch.compile plans
    # with) says, not x's strides.
    from sparsemm_kernels.ops.norms import grouped_rms_norm

    x = torch.randn(8, 12).t()  # (12, 8), column-major
    ids = torch.tensor([0, 1] * 6)
    y = modality_rms_norm(x, ids, torch.ones(2, 8), backend="torch")
    assert y.is_contiguous()
    y = grouped_rms_norm(x, torch.ones(2, 8), torch.tensor([0, 5, 12]), backend="torch")
    assert y.is_contiguous()
