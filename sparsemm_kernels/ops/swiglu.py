"""SwiGLU activation on a fused gate/up projection: ``swiglu(gate_up) = silu(a) * b``.

The FFN ``(silu(x W1^T) * (x W3^T)) W2^T`` computes ``gate_up = x [W1; W3]^T`` with one grouped GEMM; this
op is the activation between that GEMM and the down projection. ``sparsemm::swiglu`` and
``sparsemm::swiglu_bwd`` are ``torch.library`` custom ops: on the ``triton`` backend one fused forward kernel
and one fused backward kernel that writes ``d_gate_up`` directly; on the ``cpu`` backend the extension's C++
loops (one pass each way, one exponential per element; float32/float64); on the ``torch`` backend
:func:`~sparsemm_kernels.reference.swiglu.swiglu_ref` and its autograd. A second derivative is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsemm_kernels.backend import check_backend_name, resolve_backend, select_backend
from sparsemm_kernels.kernels.cpu import silu_mul_bwd_cpu, silu_mul_fwd_cpu, swiglu_bwd_cpu, swiglu_fwd_cpu
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.reference.swiglu import silu_mul_bwd_ref, silu_mul_ref, swiglu_bwd_ref, swiglu_ref
from sparsemm_kernels.utils.checks import check_float_tensor


def _swiglu(gate_up: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``silu(a) * b`` for ``gate_up = [a | b]`` along the last dim; ``(..., H)`` contiguous."""
    name = select_backend("swiglu", gate_up.device, gate_up.dtype, backend)
    if name == "torch":
        return swiglu_ref(gate_up).contiguous()
    if name == "cpu":
        return swiglu_fwd_cpu(gate_up)
    from sparsemm_kernels.kernels.triton.swiglu import swiglu_fwd

    return swiglu_fwd(gate_up)


def _swiglu_fake(gate_up, backend):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _swiglu_bwd(gate_up: torch.Tensor, dy: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``d gate_up = [dy * b * s * (1 + a (1 - s)) | dy * silu(a)]`` with ``s = sigmoid(a)``."""
    name = select_backend("swiglu", gate_up.device, gate_up.dtype, backend)
    if name == "torch":
        return swiglu_bwd_ref(gate_up, dy).contiguous()
    if name == "cpu":
        return swiglu_bwd_cpu(gate_up, dy)
    from sparsemm_kernels.kernels.triton.swiglu import swiglu_bwd

    return swiglu_bwd(gate_up, dy)


def _swiglu_bwd_fake(gate_up, dy, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    gate_up, backend = inputs
    ctx.save_for_backward(gate_up)  # the sigmoid is recomputed: no extra activation memory
    ctx.backend = backend


def _backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return swiglu_bwd_op(gate_up, dy, ctx.backend), None


def _no_setup(ctx, inputs, output):
    pass


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward through swiglu (MoTFeedForward) is not supported: its backward is a fused kernel"
    )


swiglu_op = Op("sparsemm::swiglu", _swiglu, _swiglu_fake, _setup, _backward)
swiglu_bwd_op = Op("sparsemm::swiglu_bwd", _swiglu_bwd, _swiglu_bwd_fake, _no_setup, _refuse_double_backward)


def _silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # In place where the dtype allows: on the CPU every fresh activation-sized tensor costs its page faults.
    if gate.dtype in (torch.float16, torch.bfloat16):
        return silu_mul_ref(gate, up).contiguous()
    return F.silu(gate).contiguous().mul_(up)


def _silu_mul_bwd_torch(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor):
    if gate.dtype in (torch.float16, torch.bfloat16):
        dg, du = silu_mul_bwd_ref(gate, up, dy)
        return dg.contiguous(), du.contiguous()
    dg = torch.mul(dy, up).contiguous()
    torch.ops.aten.silu_backward.grad_input(dg, gate, grad_input=dg)  # elementwise: safe in place
    return dg, F.silu(gate).contiguous().mul_(dy)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of one shape; contiguous output."""
    name = select_backend("swiglu", gate.device, gate.dtype, backend)
    if name == "torch":
        return _silu_mul_torch(gate, up)
    if name == "cpu":
        return silu_mul_fwd_cpu(gate, up)
    from sparsemm_kernels.kernels.triton.swiglu import silu_mul_fwd

    return silu_mul_fwd(gate, up)


def _silu_mul_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


def _silu_mul_bwd(
    gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, backend: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up) = (dy * up * s * (1 + gate (1 - s)), dy * silu(gate))`` with ``s = sigmoid(gate)``."""
    name = select_backend("swiglu", gate.device, gate.dtype, backend)
    if name == "torch":
        return _silu_mul_bwd_torch(gate, up, dy)
    if name == "cpu":
        return silu_mul_bwd_cpu(gate, up, dy)
    from sparsemm_kernels.kernels.triton.swiglu import silu_mul_bwd

    return silu_mul_bwd(gate, up, dy)


def _silu_mul_bwd_fake(gate, up, dy, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _silu_mul_setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _silu_mul_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = silu_mul_bwd_op(gate, up, dy, ctx.backend)
    return dg, du, None


silu_mul_op = Op("sparsemm::silu_mul", _silu_mul, _silu_mul_fake, _silu_mul_setup, _silu_mul_backward)
silu_mul_bwd_op = Op("sparsemm::silu_mul_bwd", _silu_mul_bwd, _silu_mul_bwd_fake, _no_setup, _refuse_double_backward)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation of separate gate and up projections: ``silu(gate) * up``.

    The two-tensor form of :func:`swiglu` (``gate = x W1^T``, ``up = x W3^T``, each from its own GEMM: no
    concatenated weight, and contiguous operands for the elementwise work). Same kernels, precision and
    backends as :func:`swiglu`.

    Args:
        gate, up: ``(..., H)`` float16 | bfloat16 | float32 | float64 of one shape, dtype and device; any row
            strides.
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or ``"auto"``/None.

    Returns:
        ``(..., H)`` in ``gate``'s dtype; differentiable in ``gate`` and ``up`` (first derivatives only).
    """
    check_float_tensor(gate, "gate")
    check_float_tensor(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"`up` must have the shape of `gate` {tuple(gate.shape)}, got {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"`up` has dtype {up.dtype} but `gate` has dtype {gate.dtype}; they must match")
    if gate.device != up.device:
        raise ValueError(f"`up` is on {up.device} but `gate` is on {gate.device}")
    if gate.dim() < 1:
        raise ValueError("`gate` must be at least 1-D (..., H), got a 0-d tensor")
    return silu_mul_op(gate, up, resolve_backend("swiglu", gate, check_backend_name(backend)))


def swiglu(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection.

    ::

        gate_up (..., 2H) = [ a = x W1^T | b = x W3^T ]   ->   out (..., H) = silu(a) * b,
        silu(a) = a * sigmoid(a)

    Args:
        gate_up: ``(..., 2H)`` float16 | bfloat16 | float32 | float64, at least 1-D with an even last
            dimension; the gate in the first ``H`` columns, the up projection in the last ``H``. May be
            non-contiguous (a row stride costs nothing; a non-unit column stride costs a copy).
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or ``"auto"``/None (see :mod:`sparsemm_kernels.backend`).

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
    return swiglu_op(gate_up, resolve_backend("swiglu", gate_up, check_backend_name(backend)))
