"""What only a GPU can check: bf16 tensor-core numerics, TF32 policy, int64 indexing past 2^31 elements."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.reference import grouped_mm_ref
from sparsemm_kernels.utils.testing import assert_close_verbose, ids_from_counts, offsets_from_counts

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("counts", [[1000, 24], [0, 513, 0, 129], [7] * 64, [4096, 0, 1]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_forward_backward(counts, dtype):
    K, N = 384, 320
    offsets = offsets_from_counts(counts, DEV)
    x = torch.randn(sum(counts), K, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(len(counts), N, K, device=DEV) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(len(counts), N, device=DEV, dtype=dtype, requires_grad=True)
    out = smk.grouped_mm(x, w, offsets, b, backend="triton")
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = grouped_mm_ref(x64, w64, offsets, b64)
    assert_close_verbose(out, ref, dtype, "out")
    dy = torch.randn_like(ref).to(dtype)
    got = torch.autograd.grad(out, [x, w, b], dy)
    want = torch.autograd.grad(ref, [x64, w64, b64], dy.double())
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        assert_close_verbose(g, r, dtype, name)


def test_fp32_follows_allow_tf32():
    counts, K, N = [300, 212], 1024, 256
    offsets = offsets_from_counts(counts, DEV)
    x = torch.randn(sum(counts), K, device=DEV)
    w = torch.randn(2, N, K, device=DEV)
    ref = grouped_mm_ref(x.double(), w.double(), offsets)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = smk.grouped_mm(x, w, offsets, backend="triton")
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = smk.grouped_mm(x, w, offsets, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    err_exact = ((exact.double() - ref).norm() / ref.norm()).item()
    err_fast = ((fast.double() - ref).norm() / ref.norm()).item()
    assert err_exact < 1e-5, f"full fp32 expected without TF32, got rel. error {err_exact:.2e}"
    assert err_fast < 5e-3


def test_indexing_past_2_to_31_elements():
    """x has T*K > 2^31 elements: row offsets must be computed in int64."""
    K, N = 1024, 16
    T = (1 << 31) // K + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * T * K * 2:
        pytest.skip(f"needs ~{3 * T * K * 2 / 2**30:.1f} GiB free GPU memory")
    counts = [T - 5000, 5000]
    x = torch.empty(T, K, device=DEV, dtype=torch.bfloat16).normal_()
    w = torch.randn(2, N, K, device=DEV, dtype=torch.bfloat16)
    offsets = offsets_from_counts(counts, DEV)
    out = smk.grouped_mm(x, w, offsets, backend="triton")
    tail = slice(T - 6000, T)
    ref = torch.cat([x[T - 6000 : T - 5000].double() @ w[0].double().t(), x[T - 5000 :].double() @ w[1].double().t()])
    assert_close_verbose(out[tail], ref, torch.bfloat16, "out tail")
    dy = torch.randn(T, N, device=DEV, dtype=torch.bfloat16)
    from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm_dw

    dw, _ = grouped_gemm_dw(dy, x, offsets)
    ref_dw1 = dy[T - 5000 :].double().t() @ x[T - 5000 :].double()
    assert_close_verbose(dw[1], ref_dw1, torch.bfloat16, "dW of the group past 2^31")
    del x, out, dy


def test_routed_large_interleaved_batch():
    counts = [3000, 1000, 96]
    ids = ids_from_counts(counts, shuffle=True).to(DEV)
    plan = smk.group_plan(ids, 3)
    x = torch.randn(len(ids), 512, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(3, 768, 512, device=DEV, dtype=torch.bfloat16) / 512**0.5
    out = smk.grouped_linear(x, w, plan, backend="triton")
    ref = torch.zeros(len(ids), 768, device=DEV, dtype=torch.float64)
    for g in range(3):
        ref[ids == g] = x[ids == g].double() @ w[g].double().t()
    assert_close_verbose(out, ref, torch.bfloat16, "out")
