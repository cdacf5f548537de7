"""Several grouped linears of one input through one plan: ``q, k, v = grouped_linears(x, (Wq, Wk, Wv), plan)``.

The Q/K/V projections of a Mixture-of-Transformers layer (and its FFN's W1/W3 pair) read the same rows through
the same plan. As one op they share one gather of the input, one host read of the offsets and one inverse
permutation, record one autograd node, and the backward sums the input gradient of every weight in place
(``dX = sum_i dY_i W_i``, one buffer) instead of adding separate products: on CPU the host-side cost of a
block's projections is the cost that sets it apart from a dense block. No weight is concatenated.

Two ``torch.library`` custom ops:

* ``sparsemm::grouped_gemm_multi``      ``[C_i] = [A_g W_i[g]^T]`` for every weight ``i``;
* ``sparsemm::grouped_gemm_multi_bwd``  ``dX = sum_i dC_i W_i[g]`` and every ``dW_i[g] = dC_i,g^T A_g``.

Second derivatives are exact: when the backward itself is differentiated (``create_graph=True``) it is built
from the single-weight ops of :mod:`sparsemm_kernels.ops.grouped_linear`, which are differentiable to any order.
The kernels (``triton``, ``cpu``) run one launch per weight; the ``torch`` backend (the CPU default) shares the
gather, offsets and permutation. An unchecked plan (``validate=False``) runs exactly the single-weight op per
weight, so it reads and writes what :func:`~sparsemm_kernels.grouped_linear` does.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.ops.grouped_linear import (
    _backend,
    _backward_mode,
    _check_index_values,
    _check_operands,
    _check_plan,
    _grouped_gemm,
    _grouped_gemm_dw,
    _inverse,
    _routed_args,
    _sorted_dw,
    _sorted_products,
    _to_token_order,
    grouped_gemm_dw_op,
    grouped_gemm_op,
)
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import OFF, autocast_to


def _shared_path(x, weights, offsets, rows, gather_a: bool, scatter_c: bool, mode: str, backend) -> bool:
    """Checks the index arguments, then says whether the torch backend's shared gather/offsets/permutation path
    runs (else one single-weight op per weight): a checked plan (an unchecked one keeps the single-weight op's
    handling of rows that do not exist) and no empty dimension."""
    if (gather_a or scatter_c) and rows is None:
        raise ValueError("`rows` is required to gather or scatter")
    _check_index_values(offsets, rows, x.shape[0], mode)
    return (_backend(x, offsets.shape[0] - 1, backend) == "torch" and mode != OFF and min(x.shape) > 0
            and all(min(w.shape) > 0 for w in weights))


def _multi(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: torch.Tensor,
    rows: torch.Tensor | None,
    gather_a: bool,
    scatter_c: bool,
    mode: str,
    backend: str | None,
) -> list[torch.Tensor]:
    """``C_i[c_r] = x[a_r] @ weights[i][g]^T`` over the sorted positions ``r`` of each group ``g``, for every
    ``i``; ``a_r``, ``c_r`` as in :func:`~sparsemm_kernels.ops.grouped_linear._grouped_gemm`."""
    if not _shared_path(x, weights, offsets, rows, gather_a, scatter_c, mode, backend):
        return [_grouped_gemm(x, w, None, offsets, rows, gather_a, scatter_c, False, mode, backend) for w in weights]
    bounds = offsets.tolist()  # sync-ok: the torch backend loops on the host
    a = x.index_select(0, rows) if gather_a else x
    outs = [_sorted_products(a, w.transpose(1, 2), None, bounds) for w in weights]
    if not scatter_c:
        return outs
    inverse = _inverse(rows)
    return [_to_token_order(out, rows, None, inverse) for out in outs]


def _multi_fake(x, weights, offsets, rows, gather_a, scatter_c, mode, backend):
    return [x.new_empty(x.shape[0], w.shape[1]) for w in weights]


def _multi_bwd(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    offsets: torch.Tensor,
    rows: torch.Tensor | None,
    gather_a: bool,
    scatter_c: bool,
    need_x: bool,
    need_w: list[bool],
    mode: str,
    backend: str | None,
) -> list[torch.Tensor]:
    """``[dX, dW_0, dW_1, ...]``: ``dX[a_r] = sum_i dC_i[c_r] @ weights[i][g]`` and ``dW_i[g] = sum_r dC_i[c_r]^T
    x[a_r]``; an input whose flag is False gets an empty ``(0,)`` tensor."""
    if not _shared_path(x, weights, offsets, rows, gather_a, scatter_c, mode, backend):
        dx = x.new_empty(0)
        if need_x:
            dx = _grouped_gemm(grads[0], weights[0], None, offsets, rows, scatter_c, gather_a, True, mode, backend)
            for d, w in zip(grads[1:], weights[1:]):  # dx is this op's own buffer
                dx.add_(_grouped_gemm(d, w, None, offsets, rows, scatter_c, gather_a, True, mode, backend))
        dws = [_grouped_gemm_dw(d, x, offsets, rows, scatter_c, gather_a, False, mode, backend)[0] if need
               else x.new_empty(0) for d, need in zip(grads, need_w)]
        return [dx, *dws]
    bounds = offsets.tolist()  # sync-ok: the torch backend loops on the host
    # Into sorted order once: each dC_i feeds both dX and dW_i.
    ds = [d.index_select(0, rows) if scatter_c else d for d in grads]
    dx = x.new_empty(0)
    if need_x:
        dx = _sorted_products(ds[0], weights[0], None, bounds)
        for d, w in zip(ds[1:], weights[1:]):
            _sorted_products(d, w, None, bounds, out=dx)
        if gather_a:
            dx = _to_token_order(dx, rows, None)
    xs = x.index_select(0, rows) if gather_a and any(need_w) else x
    return [dx, *(_sorted_dw(d, xs, bounds) if need else x.new_empty(0) for d, need in zip(ds, need_w))]


def _multi_bwd_fake(x, weights, grads, offsets, rows, gather_a, scatter_c, need_x, need_w, mode, backend):
    return [x.new_empty(x.shape if need_x else (0,)),
            *(w.new_empty(w.shape if need else (0,)) for w, need in zip(weights, need_w))]


def _setup(ctx, inputs, output):
    x, weights, offsets, rows, gather_a, scatter_c, mode, backend = inputs
    ctx.save_for_backward(x, offsets, rows, *weights)
    ctx.gather_a, ctx.scatter_c, ctx.mode, ctx.backend = gather_a, scatter_c, _backward_mode(mode), backend


def _backward(ctx, grads):
    x, offsets, rows, *weights = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], list(ctx.needs_input_grad[1])
    ga, sc, mode, backend = ctx.gather_a, ctx.scatter_c, ctx.mode, ctx.backend
    rest = (None,) * 6
    if torch.is_grad_enabled():  # the backward is itself differentiated: the single-weight ops, exact to any order
        dx = None
        if need_x:
            for d, w in zip(grads, weights):
                part = grouped_gemm_op(d, w, None, offsets, rows, sc, ga, True, mode, backend)
                dx = part if dx is None else dx + part
        dws = [grouped_gemm_dw_op(d, x, offsets, rows, sc, ga, False, mode, backend)[0] if need else None
               for d, need in zip(grads, need_w)]
        return (dx, dws, *rest)
    dx, *dws = grouped_gemm_multi_bwd_op(x, weights, grads, offsets, rows, ga, sc, need_x, need_w, mode, backend)
    return (dx if need_x else None, [dw if need else None for dw, need in zip(dws, need_w)], *rest)


def _no_setup(ctx, inputs, output):
    pass


def _differentiated_by_the_single_weight_ops(ctx, *grads):
    raise RuntimeError(
        "sparsemm::grouped_gemm_multi_bwd is not differentiated itself: a backward run with create_graph=True "
        "is built from sparsemm::grouped_gemm / grouped_gemm_dw instead"
    )


grouped_gemm_multi_op = Op("sparsemm::grouped_gemm_multi", _multi, _multi_fake, _setup, _backward)
grouped_gemm_multi_bwd_op = Op(
    "sparsemm::grouped_gemm_multi_bwd", _multi_bwd, _multi_bwd_fake, _no_setup, _differentiated_by_the_single_weight_ops
)


def grouped_linears(
    x: torch.Tensor,
    weights,
    plan: GroupPlan,
    *,
    input_order: str = "token",
    output_order: str = "token",
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Several grouped linears of one input: ``out_j[i] = x[i] @ weights[j][g_i]^T`` for every weight ``j``.

    What ``tuple(grouped_linear(x, w, plan, ...) for w in weights)`` computes, as one op: one gather of ``x``, one
    read of the plan, one autograd node, and a backward that sums every weight's share of ``dx`` in one buffer.
    For the Q/K/V projections of a layer (``q, k, v = grouped_linears(x, (wq, wk, wv), plan)``) or an FFN's
    gate and up projections, without concatenating the weights.

    Args:
        x: ``(T, K)`` float16 | bfloat16 | float32 | float64, rows in ``input_order``.
        weights: a non-empty list or tuple of ``(G, N_j, K)`` weights (nn.Linear layout per group; the output
            widths ``N_j`` may differ), each of ``x``'s dtype and device, any strides.
        plan: :class:`GroupPlan` over the ``T`` rows with ``G`` groups (from :func:`group_plan`).
        input_order, output_order: ``"token"`` or ``"sorted"``, as in :func:`grouped_linear`.
        backend: see :mod:`sparsemm_kernels.backend` (the ``grouped_mm`` op's backends).
        validate: for a plan not built by :func:`group_plan`, as in :func:`grouped_linear`.

    Returns:
        A tuple of ``(T, N_j)`` tensors in ``x``'s dtype (the autocast dtype under autocast), rows in
        ``output_order``; differentiable in ``x`` and every weight, to any order.
    """
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"`weights` must be a list or tuple of (G, N, K) tensors, got {type(weights).__name__}")
    if not weights:
        raise ValueError("`weights` must hold at least one weight")
    x, *weights = autocast_to(x, *weights)
    for j, w in enumerate(weights):
        _check_operands(x, w, None, f"weights[{j}]")
        if w.shape[0] != weights[0].shape[0]:
            raise ValueError(f"`weights[{j}]` has {w.shape[0]} groups but `weights[0]` has {weights[0].shape[0]}")
    _check_plan(plan, x.shape[0], weights[0].shape[0], x, "weights[0]")
    offsets, rows, gather, scatter, mode, backend = _routed_args(x, plan, input_order, output_order, validate, backend)
    return tuple(grouped_gemm_multi_op(x, weights, offsets, rows, gather, scatter, mode, backend))
