"""SwiGLU activation on a fused gate/up projection: ``swiglu(gate_up) = silu(a) * b``.

The FFN ``(silu(x W1^T) * (x W3^T)) W2^T`` computes ``gate_up = x [W1; W3]^T`` with one grouped GEMM; this
op is the activation between that GEMM and the down projection. The ``triton`` backend is one fused
forward kernel and one fused backward kernel that writes ``d_gate_up`` directly; the ``torch`` backend is
:func:`~sparsemm_kernels.reference.swiglu.swiglu_ref`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparsemm_kernels.backend import select_backend
from sparsemm_kernels.reference.swiglu import swiglu_ref
from sparsemm_kernels.utils.checks import check_float_tensor


class SwiGLUFunction(torch.autograd.Function):
    """Autograd for the Triton SwiGLU kernels; saves ``gate_up`` and recomputes the sigmoid in backward."""

    @staticmethod
    def forward(ctx, gate_up):
        """gate_up: (..., 2H) float16 | bfloat16 | float32. Returns (..., H) in gate_up's dtype."""
        from sparsemm_kernels.kernels.triton.swiglu import swiglu_fwd

        ctx.save_for_backward(gate_up)
        return swiglu_fwd(gate_up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from sparsemm_kernels.kernels.triton.swiglu import swiglu_bwd

        (gate_up,) = ctx.saved_tensors
        return swiglu_bwd(gate_up, dy)


def swiglu(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection.

    ::

        gate_up (..., 2H) = [ a = x W1^T | b = x W3^T ]   ->   out (..., H) = silu(a) * b,
        silu(a) = a * sigmoid(a)

    Args:
        gate_up: ``(..., 2H)`` float16 | bfloat16 | float32 | float64, at least 1-D with an even last
            dimension; the gate in the first ``H`` columns, the up projection in the last ``H``. May be
            non-contiguous (a row stride costs nothing; a non-unit column stride costs a copy).
        backend: ``"triton"``, ``"torch"`` or ``"auto"``/None (see :mod:`sparsemm_kernels.backend`).

    Returns:
        ``(..., H)`` in ``gate_up``'s dtype, differentiable in ``gate_up``:
        ``da = dy * b * s * (1 + a * (1 - s))`` with ``s = sigmoid(a)``, ``db = dy * silu(a)``.
        float16/bfloat16 are computed in float32 and rounded once; the sigmoid never overflows
        (large ``|a|`` gives ``silu(a) -> a`` or ``0``).
    """
    check_float_tensor(gate_up, "gate_up")
    if gate_up.dim() < 1:
        raise ValueError("`gate_up` must be at least 1-D (..., 2H), got a 0-d tensor")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"`gate_up` must have an even last dimension (..., 2H), got shape {tuple(gate_up.shape)}")
    name = select_backend("swiglu", gate_up.device, gate_up.dtype, backend)
    if name == "torch":
        return swiglu_ref(gate_up)
    return SwiGLUFunction.apply(gate_up)
