"""SwiGLU activation on a fused gate/up projection: ``swiglu(gate_up) = silu(a) * b``.

The FFN ``(silu(x W1^T) * (x W3^T)) W2^T`` computes ``gate_up = x [W1; W3]^T`` with one grouped GEMM; this
op is the activation between that GEMM and the down projection. ``sparsemm::swiglu`` and
``sparsemm::swiglu_bwd`` are ``torch.library`` custom ops: on the ``triton`` backend one fused forward kernel
and one fused backward kernel that writes ``d_gate_up`` directly; on the ``torch`` backend
:func:`~sparsemm_kernels.reference.swiglu.swiglu_ref` and its autograd. A second derivative is refused.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.reference.swiglu import swiglu_bwd_ref, swiglu_ref
from sparsemm_kernels.utils.checks import check_float_tensor


@torch.library.custom_op("sparsemm::swiglu", mutates_args=())
def swiglu_op(gate_up: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``silu(a) * b`` for ``gate_up = [a | b]`` along the last dim; ``(..., H)`` contiguous."""
    if select_backend("swiglu", gate_up.device, gate_up.dtype, backend) == "torch":
        return swiglu_ref(gate_up).contiguous()
    from sparsemm_kernels.kernels.triton.swiglu import swiglu_fwd

    return swiglu_fwd(gate_up)


@swiglu_op.register_fake
def _(gate_up, backend):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("sparsemm::swiglu_bwd", mutates_args=())
def swiglu_bwd_op(gate_up: torch.Tensor, dy: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``d gate_up = [dy * b * s * (1 + a (1 - s)) | dy * silu(a)]`` with ``s = sigmoid(a)``."""
    if select_backend("swiglu", gate_up.device, gate_up.dtype, backend) == "torch":
        return swiglu_bwd_ref(gate_up, dy).contiguous()
    from sparsemm_kernels.kernels.triton.swiglu import swiglu_bwd

    return swiglu_bwd(gate_up, dy)


@swiglu_bwd_op.register_fake
def _(gate_up, dy, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    gate_up, backend = inputs
    ctx.save_for_backward(gate_up)  # the sigmoid is recomputed: no extra activation memory
    ctx.backend = backend


def _backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return swiglu_bwd_op(gate_up, dy, ctx.backend), None


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward through swiglu (MoTFeedForward) is not supported: its backward is a fused kernel"
    )


swiglu_op.register_autograd(_backward, setup_context=_setup)
swiglu_bwd_op.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


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
        ``(..., H)`` in ``gate_up``'s dtype (autocast leaves it alone, as torch does for ``silu``),
        differentiable in ``gate_up`` (first derivatives only):
        ``da = dy * b * s * (1 + a * (1 - s))`` with ``s = sigmoid(a)``, ``db = dy * silu(a)``.
        float16/bfloat16 are computed in float32 and rounded once; the sigmoid never overflows
        (large ``|a|`` gives ``silu(a) -> a`` or ``0``).
    """
    check_float_tensor(gate_up, "gate_up")
    if gate_up.dim() < 1:
        raise ValueError("`gate_up` must be at least 1-D (..., 2H), got a 0-d tensor")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"`gate_up` must have an even last dimension (..., 2H), got shape {tuple(gate_up.shape)}")
    return torch.ops.sparsemm.swiglu(gate_up, check_backend_name(backend))
