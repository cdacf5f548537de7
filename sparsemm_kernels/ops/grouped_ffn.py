"""The grouped SwiGLU FFN as one op: ``out_g = (silu(x_g W1[g]^T) * (x_g W3[g]^T)) W2[g]^T`` over row groups.

The FFN of a Mixture-of-Transformers modality or of an MoE expert is three grouped GEMMs around a SwiGLU. As one op
it is one public call and one autograd node instead of four, with the same kernels underneath: the gate and up
projections through :mod:`sparsemm_kernels.ops.grouped_linears` (one read of the rows, ``dX`` summed in one
buffer), :func:`~sparsemm_kernels.silu_mul`'s kernels, the down projection's grouped GEMM. On CPU the per-call
host cost of those pieces is what a grouped block pays beyond a dense one.

Two ``torch.library`` custom ops:

* ``sparsemm::grouped_swiglu_ffn``      ``(out, gate, up, h)``; ``gate``, ``up``, ``h = silu(gate) * up`` are
  returned (not differentiable) so that autograd saves them for the backward;
* ``sparsemm::grouped_swiglu_ffn_bwd``  ``(dX, dW1, dW3, dW2)``.

First derivatives only, as :func:`~sparsemm_kernels.silu_mul` (a second derivative is refused).
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, resolve_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.ops.grouped_linear import (
    _backward_mode,
    _check_operands,
    _grouped_gemm,
    _grouped_gemm_dw,
)
from sparsemm_kernels.ops.grouped_linears import _multi, _multi_bwd
from sparsemm_kernels.ops.swiglu import _refuse_double_backward, _silu_mul, _silu_mul_bwd
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import (
    TRUSTED,
    autocast_to,
    check_float_tensor,
    check_offsets_tensor,
    check_same_device,
    check_same_dtype,
    validation_mode,
)


def _ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    mode: str,
    backend: str | None,
    act_backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, gate, up, h)``: ``gate = x W1^T``, ``up = x W3^T``, ``h = silu(gate) * up``, ``out = h W2^T`` per
    group of rows ``offsets[g]:offsets[g+1]`` (offsets values checked, per ``mode``, by the GEMMs)."""
    gate, up = _multi(x, [w1, w3], offsets, None, False, False, mode, backend)
    h = _silu_mul(gate, up, act_backend)
    return _grouped_gemm(h, w2, None, offsets, None, False, False, False, mode, backend), gate, up, h


def _ffn_fake(x, w1, w3, w2, offsets, mode, backend, act_backend):
    T, H = x.shape[0], w1.shape[1]
    return x.new_empty(T, w2.shape[1]), x.new_empty(T, H), x.new_empty(T, H), x.new_empty(T, H)


def _ffn_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    h: torch.Tensor,
    offsets: torch.Tensor,
    need: list[bool],
    mode: str,
    backend: str | None,
    act_backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dW1, dW3, dW2)`` from ``dy = d out`` and the forward's ``gate, up, h``; ``need`` flags
    ``[x, w1, w3, w2]`` (an input not needed gets an empty ``(0,)`` tensor)."""
    dh = _grouped_gemm(dy, w2, None, offsets, None, False, False, True, mode, backend)
    dw2 = _grouped_gemm_dw(dy, h, offsets, None, False, False, False, mode, backend)[0] if need[3] else x.new_empty(0)
    dgate, dup = _silu_mul_bwd(gate, up, dh, act_backend)
    dx, dw1, dw3 = _multi_bwd(x, [w1, w3], [dgate, dup], offsets, None, False, False, need[0], need[1:3], mode,
                              backend)
    return dx, dw1, dw3, dw2


def _ffn_bwd_fake(dy, x, w1, w3, w2, gate, up, h, offsets, need, mode, backend, act_backend):
    return tuple(t.new_empty(t.shape if n else (0,)) for t, n in zip((x, w1, w3, w2), need))


def _setup(ctx, inputs, output):
    x, w1, w3, w2, offsets, mode, backend, act_backend = inputs
    _, gate, up, h = output
    ctx.mark_non_differentiable(gate, up, h)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the three saved activations
    ctx.save_for_backward(x, w1, w3, w2, gate, up, h, offsets)
    ctx.mode = _backward_mode(mode)
    ctx.backend, ctx.act_backend = backend, act_backend


def _backward(ctx, dy, _dgate, _dup, _dh):
    need = list(ctx.needs_input_grad[:4])
    if dy is None or not any(need):
        return (None,) * 8
    x, w1, w3, w2, gate, up, h, offsets = ctx.saved_tensors
    grads = grouped_swiglu_ffn_bwd_op(dy, x, w1, w3, w2, gate, up, h, offsets, need, ctx.mode, ctx.backend,
                                      ctx.act_backend)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


def _no_setup(ctx, inputs, output):
    pass


grouped_swiglu_ffn_op = Op("sparsemm::grouped_swiglu_ffn", _ffn, _ffn_fake, _setup, _backward)
grouped_swiglu_ffn_bwd_op = Op(
    "sparsemm::grouped_swiglu_ffn_bwd", _ffn_bwd, _ffn_bwd_fake, _no_setup, _refuse_double_backward
)


def _check_ffn_weights(x, w1, w3, w2) -> None:
    _check_operands(x, w1, None, "w1")
    _check_operands(x, w3, None, "w3")
    if w3.shape != w1.shape:
        raise ValueError(f"`w3` must have the shape of `w1` {tuple(w1.shape)}, got {tuple(w3.shape)}")
    check_float_tensor(w2, "w2")
    check_same_device("x", x, "w2", w2)
    check_same_dtype("x", x, "w2", w2)
    G, H, D = w1.shape
    if tuple(w2.shape) != (G, D, H):
        raise ValueError(f"`w2` must have shape (G, dim, hidden) = {(G, D, H)}, got {tuple(w2.shape)}")


def grouped_swiglu_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor | GroupPlan,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """SwiGLU FFN per row group, one op: ``out_g = (silu(x_g W1[g]^T) * (x_g W3[g]^T)) W2[g]^T``.

    ::

        x (T, dim)   rows of group g: offsets[g]:offsets[g+1]
        w1, w3 (G, hidden, dim)   w2 (G, dim, hidden)   ->   out (T, dim)

    What ``grouped_mm(silu_mul(grouped_mm(x, w1, o), grouped_mm(x, w3, o)), w2, o)`` computes, with one autograd
    node: the per-modality FFN of a group-sorted MoT stream, or the experts of an MoE over their sorted slots.

    Args:
        x: ``(T, dim)`` float16 | bfloat16 | float32 | float64, rows grouped (any strides).
        w1, w3: ``(G, hidden, dim)``; w2: ``(G, dim, hidden)``; x's dtype and device, any strides.
        offsets: ``(G+1,)`` int32 or int64 group offsets as in :func:`grouped_mm`, or a :class:`GroupPlan` whose
            rows ``x`` holds in plan order (its offsets are used; a plan from :func:`group_plan` is not re-checked).
        backend: see :mod:`sparsemm_kernels.backend`: the GEMMs run the ``grouped_mm`` backend, the activation the
            ``swiglu`` one (a named backend must run both).
        validate: how offsets values are checked, as in :func:`grouped_mm`.

    Returns:
        ``(T, dim)`` in ``x``'s dtype (the autocast dtype under autocast); differentiable in ``x``, ``w1``,
        ``w3``, ``w2`` (first derivatives; a second derivative raises, as for :func:`silu_mul`). The weight
        gradients of an empty group are exactly zero.
    """
    x, w1, w3, w2 = autocast_to(x, w1, w3, w2)
    _check_ffn_weights(x, w1, w3, w2)
    if isinstance(offsets, GroupPlan):
        plan = offsets
        if plan.num_rows != x.shape[0]:
            raise ValueError(f"`offsets` (a plan) covers {plan.num_rows} rows but `x` has {x.shape[0]}")
        offsets, mode = plan.offsets, (TRUSTED if plan.trusted else validation_mode(validate, x.device))
    else:
        mode = validation_mode(validate, x.device)
    check_offsets_tensor(offsets, w1.shape[0], x)
    requested = check_backend_name(backend)
    gemm_backend = resolve_backend("grouped_mm", x, requested)
    act_backend = resolve_backend("swiglu", x, requested)
    offsets = offsets.to(torch.int64).contiguous()
    return grouped_swiglu_ffn_op(x, w1, w3, w2, offsets, mode, gemm_backend, act_backend)[0]
