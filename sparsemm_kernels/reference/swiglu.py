"""SwiGLU activation in plain PyTorch: the truth the Triton kernels are tested against, and the ``torch`` backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``a, b = gate_up[..., :H], gate_up[..., H:]`` and ``silu(a) = a * sigmoid(a)``.

    Args:
        gate_up: ``(..., 2H)`` any float dtype; the gate ``a = x W1^T`` then the up projection ``b = x W3^T``.

    Returns:
        ``(..., H)`` in ``gate_up``'s dtype, differentiable through ordinary autograd. float16/bfloat16 are
        computed in float32 (as the kernels do); float32 and float64 are computed in their own precision.
    """
    compute = torch.float32 if gate_up.dtype in (torch.float16, torch.bfloat16) else gate_up.dtype
    h = gate_up.shape[-1] // 2
    g = gate_up.to(compute)
    a, b = g[..., :h], g[..., h:]
    return (F.silu(a) * b).to(gate_up.dtype)


def swiglu_bwd_ref(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``d gate_up = [da | db]`` of :func:`swiglu_ref` by its closed form: with ``s = sigmoid(a)``,
    ``da = dy * b * s * (1 + a (1 - s))`` (torch's fused ``silu_backward`` of ``dy * b``) and
    ``db = dy * silu(a)``, written straight into the two halves of the result. Same precision rules;
    ``gate_up``'s dtype."""
    compute = torch.float32 if gate_up.dtype in (torch.float16, torch.bfloat16) else gate_up.dtype
    h = gate_up.shape[-1] // 2
    g, d = gate_up.to(compute), dy.to(compute)
    a, b = g[..., :h], g[..., h:]
    out = torch.empty(g.shape, dtype=compute, device=g.device)
    torch.ops.aten.silu_backward.grad_input(d * b, a, grad_input=out[..., :h])
    torch.mul(d, F.silu(a), out=out[..., h:])
    return out.to(gate_up.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the two-tensor SwiGLU); float16/bfloat16 computed in float32, ``gate``'s dtype out."""
    compute = torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def silu_mul_bwd_ref(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up)`` of :func:`silu_mul_ref` by the closed form of :func:`swiglu_bwd_ref`."""
    compute = torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype
    a, b, d = gate.to(compute), up.to(compute), dy.to(compute)
    da = torch.ops.aten.silu_backward(d * b, a)
    return da.to(gate.dtype), (d * F.silu(a)).to(gate.dtype)
