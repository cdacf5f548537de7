"""What only a GPU can check: tensor-core numerics (bf16, fp16, TF32 on and off), the autotuned tile configs,
int64 indexing past 2^31 elements, and bitwise reproducibility of the reducing kernels when programs really run
concurrently. Every test carries the ``gpu`` mark (skipped without CUDA); the interpreter versions of the tile
configs run on the CPU too.

Not run on the machine these were written on (no GPU there): the tolerances marked "GPU" below are sized from
the error model and the interpreter's measurements, and should be re-measured on a first GPU run with
``SPARSEMM_TOL_LOG=/tmp/tol.jsonl pytest -m gpu tests`` (then ``python -m sparsemm_kernels.utils.testing``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsemm_kernels as smk
from sparsemm_kernels.utils.testing import (
    EPS,
    EPS32,
    Tol,
    assert_close_verbose,
    check_multilinear,
    ids_from_counts,
    offsets_from_counts,
)

DEV = "cuda"
gpu = pytest.mark.gpu
BF16, FP16 = torch.bfloat16, torch.float16


def _subnormal(dtype):
    """Spacing of the subnormals of ``dtype`` (2^-24 for float16)."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


# GPU: one float32 accumulation (tensor cores) rounded to nearest once: rtol 1.5 eps (3x the half-ulp bound).
# atol: the interpreter measures 1.1 eps32 * sum|terms| * sqrt(L); MMA units add products with a truncated
# alignment, so allow ~2x that before the 3x margin -> 7 eps32. (GPU: to be re-measured.)
# float16 floor: a result that underflows into fp16's subnormals (below 2^-14) is rounded to their fixed spacing
# 2^-24, off by up to half of it, which rtol * |want| does not cover there -> 1.5 subnormal spacings
# (as tests/ops/test_swiglu.py).
GPU_TOL = {
    BF16: Tol(rtol=1.5 * EPS[BF16], atol=7 * EPS32),
    FP16: Tol(rtol=1.5 * EPS[FP16], atol=7 * EPS32, floor=1.5 * _subnormal(FP16)),
    torch.float32: Tol(rtol=0.0, atol=7 * EPS32),
}


def _truth_mm(offsets):
    def truth(x, w, b=None):
        bounds = offsets.tolist()
        pieces = [F.linear(x[bounds[g] : bounds[g + 1]], w[g], None if b is None else b[g]) for g in range(w.shape[0])]
        return torch.cat(pieces)

    return truth


def _operands(counts, K, N, dtype, bias=True):
    x = torch.randn(sum(counts), K, device=DEV).to(dtype).requires_grad_(True)
    w = (torch.randn(len(counts), N, K, device=DEV) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(len(counts), N, device=DEV).to(dtype).requires_grad_(True) if bias else None
    return x, w, b


@gpu
@pytest.mark.parametrize("counts", [[1000, 24], [0, 513, 0, 129], [7] * 64, [4096, 0, 1]])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_half_precision_forward_backward(counts, dtype):
    K, N = 384, 320
    offsets = offsets_from_counts(counts, DEV)
    x, w, b = _operands(counts, K, N, dtype)
    check_multilinear(lambda x, w, b: smk.grouped_mm(x, w, offsets, b, backend="triton"), _truth_mm(offsets),
                      [x, w, b], dtype, GPU_TOL[dtype])


@gpu
def test_routed_large_interleaved_batch():
    counts = [3000, 1000, 96]
    ids = ids_from_counts(counts, shuffle=True).to(DEV)
    plan = smk.group_plan(ids, 3)
    x, w, b = _operands(counts, 512, 768, BF16)

    def truth(x, w, b):
        out = x.new_zeros(x.shape[0], w.shape[1])
        for g in range(w.shape[0]):
            out = out.index_put((ids == g,), F.linear(x[ids == g], w[g], b[g]))
        return out

    check_multilinear(lambda x, w, b: smk.grouped_linear(x, w, plan, b, backend="triton"), truth, [x, w, b], BF16,
                      GPU_TOL[BF16])


# ---- TF32: used exactly when torch allows it, in all three GEMMs ---------------------------------------------

def _tf32_probe(shape):
    """``s (1 + r 2^-14)`` with ``s = +-1``, ``r`` in 1..7: exact in float32, and so are their products with +-1 and
    every partial sum of up to 256 of them (|sum| < 2^9 on a 2^-14 grid: 23 bits). TF32 keeps 10 mantissa bits:
    it rounds every one of them to +-1 (``r 2^-14 < 2^-11``). So a float32 GEMM of these is exact in any order
    and a TF32 GEMM misses ``sum s r 2^-14``, about 100x the float32 error bound."""
    sign = torch.randint(0, 2, shape, device=DEV) * 2 - 1
    r = torch.randint(1, 8, shape, device=DEV)
    return (sign * (1 + r * 2.0**-14)).float()


def _signs(shape):
    return (torch.randint(0, 2, shape, device=DEV) * 2 - 1).float()


def _tf32_cases():
    """(name, run, truth, scale): each GEMM with the probe on one side and +-1 on the other, sums of <= 256."""
    counts = [256, 200]
    offsets = offsets_from_counts(counts, DEV)
    from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm, grouped_gemm_dw

    x, w = _tf32_probe((456, 256)), _signs((2, 256, 256))  # forward: sums over K = 256
    dy, wd = _tf32_probe((456, 256)), _signs((2, 256, 256))  # dX: sums over N = 256
    dyw, xw = _signs((456, 256)), _tf32_probe((456, 256))  # dW: sums over a group's <= 256 rows
    b = offsets.tolist()

    def per_group(f):
        return torch.cat([f(g, slice(b[g], b[g + 1])) for g in range(2)])

    return [
        ("forward", lambda: grouped_gemm(x, w, offsets),
         lambda t: per_group(lambda g, r: t(x)[r] @ t(w)[g].t())),
        ("dX", lambda: grouped_gemm(dy, wd, offsets, transpose_w=True),
         lambda t: per_group(lambda g, r: t(dy)[r] @ t(wd)[g])),
        ("dW", lambda: grouped_gemm_dw(dyw, xw, offsets)[0],
         lambda t: torch.stack([t(dyw)[b[g] : b[g + 1]].t() @ t(xw)[b[g] : b[g + 1]] for g in range(2)])),
    ]


@gpu
@pytest.mark.parametrize("case", range(3), ids=["forward", "dX", "dW"])
def test_fp32_uses_tf32_exactly_when_allowed(case):
    name, run, truth_of = _tf32_cases()[case]
    want = truth_of(lambda t: t.double())
    scale = truth_of(lambda t: t.double().abs())  # sum |terms|
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = run().double()
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = run().double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    ratio_exact = ((exact - want).abs() / (EPS32 * scale)).max().item()
    ratio_fast = ((fast - want).abs() / (EPS32 * scale)).median().item()
    # float32 FMA on these inputs is exact: anything above one eps32 * scale means TF32 (or worse) was used.
    assert ratio_exact <= 1.0, f"{name}: allow_tf32=False but error {ratio_exact:.3g} eps32 * scale: not float32"
    # TF32 drops r 2^-14 from every input: the median element is off by ~100 eps32 * scale.
    assert ratio_fast >= 10.0, f"{name}: allow_tf32=True but median error {ratio_fast:.3g} eps32 * scale: TF32 unused"


# ---- the autotuned tile configs, each forced in turn ----------------------------------------------------------

def _tuned_configs(monkeypatch):
    """The GPU config lists of kernels/triton/configs.py (what SPARSEMM_AUTOTUNE=1 autotunes over)."""
    from sparsemm_kernels.kernels.triton import configs

    monkeypatch.setattr(configs, "is_interpreting", lambda: False)
    monkeypatch.setenv("SPARSEMM_AUTOTUNE", "1")
    return configs.grouped_gemm_configs(), configs.grouped_gemm_dw_configs()


def _autotuners():
    """The forward/dX and dW autotuners of grouped_gemm.py, found by their tile names."""
    import triton

    from sparsemm_kernels.kernels.triton import grouped_gemm as mod

    tuners = [v for v in vars(mod).values() if isinstance(v, triton.runtime.Autotuner)]
    fwd = [t for t in tuners if "BLOCK_J" in t.configs[0].kwargs]
    dw = [t for t in tuners if "BLOCK_N" in t.configs[0].kwargs]
    assert len(fwd) == 1 and len(dw) == 1, [t.configs for t in tuners]
    return fwd[0], dw[0]


def _forced(tuner, config, monkeypatch):
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})


def _config_cases(monkeypatch):
    """(forward/dX config, dW config) pairs: every config of both lists once, the shorter list cycled."""
    fwd_configs, dw_configs = _tuned_configs(monkeypatch)
    n = max(len(fwd_configs), len(dw_configs))
    return [(fwd_configs[i % len(fwd_configs)], dw_configs[i % len(dw_configs)]) for i in range(n)]


def _collected_config_cases():
    """:func:`_config_cases` at collection time (its patches undone at once): one test case per pair, so each
    compiles and checks one forward/dX and one dW config and stays well inside a per-test timeout."""
    with pytest.MonkeyPatch.context() as mp:
        return _config_cases(mp)


def _config_id(config):
    """``MxJxK`` (forward/dX) or ``NxKxM`` (dW, the order of configs._dw), warps, stages, register cap."""
    kw = config.kwargs
    keys = ("BLOCK_M", "BLOCK_J", "BLOCK_K") if "BLOCK_J" in kw else ("BLOCK_N", "BLOCK_K", "BLOCK_M")
    tile = "x".join(str(kw[k]) for k in keys)
    return f"{tile}w{config.num_warps}s{config.num_stages}" + (f"r{config.maxnreg}" if config.maxnreg else "")


CONFIG_CASES = _collected_config_cases()
CONFIG_IDS = [f"{i}-fwd{_config_id(f)}-dw{_config_id(d)}" for i, (f, d) in enumerate(CONFIG_CASES)]


def _run_config(monkeypatch, device, dtype, counts, K, N, tol, fwd_cfg, dw_cfg):
    """grouped_mm forward, dX and dW with the autotuners forced to ``fwd_cfg`` (forward and dX) and ``dw_cfg``."""
    fwd, dw = _autotuners()
    offsets = offsets_from_counts(counts, device)
    _forced(fwd, fwd_cfg, monkeypatch)
    _forced(dw, dw_cfg, monkeypatch)
    x = torch.randn(sum(counts), K, device=device).to(dtype).requires_grad_(True)
    w = (torch.randn(len(counts), N, K, device=device) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(len(counts), N, device=device).to(dtype).requires_grad_(True)
    try:
        check_multilinear(lambda x, w, b: smk.grouped_mm(x, w, offsets, b, backend="triton"),
                          _truth_mm(offsets), [x, w, b], dtype, tol)
    except AssertionError as exc:
        raise AssertionError(f"forward/dX config {fwd_cfg}, dW config {dw_cfg}: {exc}") from None


@gpu
@pytest.mark.parametrize("configs", CONFIG_CASES, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_autotuned_configs_on_gpu(monkeypatch, dtype, configs):
    fwd_cfg, dw_cfg = configs
    _run_config(monkeypatch, DEV, dtype, [1030, 0, 77, 513], 392, 520, GPU_TOL[dtype], fwd_cfg, dw_cfg)


# ---- int64 indexing ------------------------------------------------------------------------------------------

def _need_free(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"needs ~{nbytes / 2**30:.1f} GiB free GPU memory")


@gpu
def test_forward_and_dw_past_2_to_31_elements():
    """x has T*K > 2^31 elements: row offsets into x must be computed in int64."""
    K, N = 1024, 16
    T = (1 << 31) // K + 4096
    _need_free(3 * T * K * 2)
    counts = [T - 5000, 5000]
    x = torch.empty(T, K, device=DEV, dtype=BF16).normal_()
    w = torch.randn(2, N, K, device=DEV, dtype=BF16)
    offsets = offsets_from_counts(counts, DEV)
    out = smk.grouped_mm(x, w, offsets, backend="triton")
    tail, last = slice(T - 6000, T - 5000), slice(T - 5000, T)
    x_tail = x[T - 6000 :].double()
    want = torch.cat([x_tail[:1000] @ w[0].double().t(), x_tail[1000:] @ w[1].double().t()])
    scale = torch.cat([x_tail[:1000].abs() @ w[0].double().abs().t(), x_tail[1000:].abs() @ w[1].double().abs().t()])
    assert_close_verbose(out[tail.start :], want, BF16, "out tail", tol=GPU_TOL[BF16], scale=scale * K**0.5)
    dy = torch.randn(T, N, device=DEV, dtype=BF16)
    from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm_dw

    dw, _ = grouped_gemm_dw(dy, x, offsets)
    want = dy[last].double().t() @ x[last].double()
    scale = dy[last].double().abs().t() @ x[last].double().abs() * 5000**0.5
    assert_close_verbose(dw[1], want, BF16, "dW of the group past 2^31", tol=GPU_TOL[BF16], scale=scale)


@gpu
def test_dx_past_2_to_31_elements():
    """dX = dY W has T*K > 2^31 elements: its row offsets (the store, and the gather/scatter of the routed form)
    must be int64. Checked on the last rows, through the op's backward."""
    K, N = 1024, 16
    T = (1 << 31) // K + 4096
    _need_free(3 * T * K * 2 + (1 << 30))
    counts = [T - 3000, 3000]
    ids = ids_from_counts(counts, shuffle=False).to(DEV)
    ids[-4000:] = ids[-4000:].flip(0)  # the last rows interleave the two groups
    plan = smk.group_plan(ids, 2)
    x = torch.empty(T, K, device=DEV, dtype=BF16).normal_().requires_grad_(True)
    w = (torch.randn(2, N, K, device=DEV) / K**0.5).to(BF16)
    dy = torch.randn(T, N, device=DEV, dtype=BF16)
    for name, run in (("grouped_mm", lambda: smk.grouped_mm(x, w, offsets_from_counts(counts, DEV), backend="triton")),
                      ("grouped_linear", lambda: smk.grouped_linear(x, w, plan, backend="triton"))):
        (dx,) = torch.autograd.grad(run(), [x], dy)
        rows = torch.arange(T - 4000, T, device=DEV)
        g = ids[rows] if name == "grouped_linear" else (rows >= T - 3000).long()
        wg, dyr = w.double()[g], dy[rows].double()[:, None, :]  # (rows, N, K), (rows, 1, N)
        want, scale = (dyr @ wg)[:, 0], (dyr.abs() @ wg.abs())[:, 0]
        assert_close_verbose(dx[rows], want, BF16, f"{name} dx tail", tol=GPU_TOL[BF16], scale=scale * N**0.5)
        del dx


# ---- determinism where programs really run concurrently -------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_reducing_kernels_are_bitwise_reproducible(dtype):
    """Forward, dX and dW (K- and row-reductions) of the routed GEMM, and the norm backward (dW partials summed
    over programs): three runs, bitwise equal. Only meaningful on a GPU, where programs run concurrently."""
    counts = [3000, 0, 1200, 77]
    ids = ids_from_counts(counts, shuffle=True).to(DEV)
    plan = smk.group_plan(ids, len(counts))
    x, w, b = _operands(counts, 512, 384, dtype)
    dy = torch.randn(sum(counts), 384, device=DEV).to(dtype)
    nw = torch.randn(len(counts), 512, device=DEV).to(dtype).requires_grad_(True)
    nb = torch.randn(len(counts), 512, device=DEV).to(dtype).requires_grad_(True)
    dyn = torch.randn(sum(counts), 512, device=DEV).to(dtype)

    def once():
        out = smk.grouped_linear(x, w, plan, b, backend="triton")
        grads = torch.autograd.grad(out, [x, w, b], dy)
        y = smk.modality_layer_norm(x, ids, nw, nb, backend="triton")
        return [out, *grads, y, *torch.autograd.grad(y, [x, nw, nb], dyn)]

    first = once()
    for _ in range(2):
        for a, c in zip(first, once()):
            assert torch.equal(a, c)


# ---- a whole MoT block in bf16, forward and backward ----------------------------------------------------------

@gpu
def test_block_bf16_forward_backward_vs_float64():
    """bf16 block (Triton kernels, SDPA) vs float64, each error at most c x the error of the same block computed
    by plain PyTorch in bf16 (the reference-style block): c = 2 forward, 3 backward (flash-attn's rule)."""
    from sparsemm_kernels.nn import MoTBlock
    from sparsemm_kernels.reference.mot import mot_block_ref

    dev = torch.device(DEV)
    torch.manual_seed(0)
    block = MoTBlock(256, 4, 512, 3, qk_norm=True, n_kv_heads=2, device=dev)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 3, (2, 256), device=dev)
    x = torch.randn(2, 256, 256, device=dev)
    dy = torch.randn(2, 256, 256, device=dev)

    def run(module, fn, dtype):
        xi = x.to(dtype).requires_grad_(True)
        out = fn(module, xi)
        params = list(module.parameters())
        grads = torch.autograd.grad(out, [xi, *params], dy.to(dtype))
        return [out, *grads]

    names = ["out", "dx"] + [n for n, _ in block.named_parameters()]
    ref = run(copy.deepcopy(block).double(), lambda m, xi: mot_block_ref(m, xi, ids), torch.float64)
    ours = run(copy.deepcopy(block).bfloat16(), lambda m, xi: m(xi, ids), BF16)
    torch_bf16 = run(copy.deepcopy(block).bfloat16(), lambda m, xi: mot_block_ref(m, xi, ids), BF16)
    for i, (name, got, base, want) in enumerate(zip(names, ours, torch_bf16, ref)):
        c = 2 if i == 0 else 3
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        assert err <= c * base_err + 1e-5, f"{name}: max error {err:.3g} > {c} x PyTorch-bf16's {base_err:.3g}"


# ---- Avg-K on the GPU: both strategies in bf16, the fused selection, reproducibility ---------------------------

def _avgk_inputs(N, d, d_ff, dtype):
    torch.manual_seed(1)
    return (torch.randn(N, d, device=DEV).to(dtype), (torch.randn(d_ff, d, device=DEV) / d**0.5).to(dtype),
            (torch.randn(d, d_ff, device=DEV) / 16).to(dtype), (torch.randn(d_ff, d, device=DEV) / d**0.5).to(dtype))


@gpu
@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
@pytest.mark.parametrize("g", [16, 64])
def test_avgk_bf16_vs_float64_on_the_same_blocks(strategy, g):
    """Both strategies in bf16 (Triton kernels) vs float64 on the blocks the bf16 selection chose: each error at most
    2x (forward) / 3x (gradients) the error of the same computation in plain PyTorch bf16 (gathered blocks, bmm)."""
    x, w_in, w_out, _ = _avgk_inputs(300, 256, 2048, BF16)
    k = 512 // g
    blocks = smk.avgk_select(x, w_in, g, k)

    def run(dtype, fn):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w_in, w_out)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    def loop(xx, wi, wo):  # the chosen blocks, float64 or bf16, plain PyTorch
        keys = wi.view(-1, g, wi.shape[1])[blocks].reshape(xx.shape[0], k * g, -1)
        vals = wo.t().reshape(-1, g, wo.shape[0])[blocks].reshape(xx.shape[0], k * g, -1)
        return torch.bmm(F.gelu(torch.bmm(keys, xx[:, :, None])).transpose(1, 2), vals)[:, 0]

    ours = run(BF16, lambda a, b, c: smk.avgk_ffn(a, b, c, g, k, strategy=strategy))
    ref = run(torch.float64, loop)
    base = run(BF16, loop)
    for i, (name, got, want, b) in enumerate(zip(["out", "dx", "dw_in", "dw_out"], ours, ref, base)):
        err = (got.double() - want).abs().max().item()
        base_err = (b.double() - want).abs().max().item()
        c = 2 if i == 0 else 3
        assert err <= c * base_err + 1e-5, f"{strategy} g{g} {name}: {err:.3g} > {c} x PyTorch-bf16's {base_err:.3g}"


@gpu
@pytest.mark.parametrize("n_blocks", [64, 256, 512])
def test_avgk_fused_selection_matches_the_gemm_path_on_exact_scores(n_blocks):
    """Small integers: every score exact in bf16, so the fused kernel and the GEMM + top-k path agree to the tie."""
    torch.manual_seed(2)
    x = torch.randint(-1, 2, (1000, 64), device=DEV).to(BF16)
    w = (torch.randint(-1, 2, (n_blocks * 4, 64), device=DEV) * 4).to(BF16)
    got = smk.avgk_select(x, w, 4, 7, backend="triton")
    scores = x.double() @ w.double().view(n_blocks, 4, 64).mean(1).t()
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7].sort(dim=1).values
    assert torch.equal(got, want)


@gpu
def test_avgk_gathered_gradients_are_bitwise_reproducible():
    x, w_in, w_out, _ = _avgk_inputs(2000, 256, 2048, BF16)

    def once():
        leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
        out = smk.avgk_ffn(*leaves, 32, 8, strategy="gathered")
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    first = once()
    for _ in range(2):
        for a, c in zip(first, once()):
            assert torch.equal(a, c)
