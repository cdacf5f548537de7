"""Grouped linear over row groups: ``grouped_mm`` (rows already grouped) and ``grouped_linear`` (rows in
original order, routed by a :class:`~sparsemm_kernels.plan.GroupPlan`).

Pipeline: two ``torch.library`` custom ops, each with a fake implementation and autograd:

* ``sparsemm::grouped_gemm``    ``C_g = A_g W_g^T + b_g`` (or ``A_g W_g`` with ``transpose_w``: the dX pass);
* ``sparsemm::grouped_gemm_dw`` ``dW_g = dY_g^T X_g`` and ``db_g = sum dY_g``.

The backward of each is built from the two of them, so second derivatives are exact to any order: the
grouped GEMM is bilinear in ``(x, W)``, and the weight gradient is bilinear in ``(dY, X)``. In the routed form
the kernels gather rows through ``plan.sorted_to_orig`` on load and/or scatter them back on store, so no
permuted copy of ``x``, ``dY`` or the output exists. The ``torch`` backend runs ATen per group, writing each
group's product straight into its slice of the output (``addmm(out=)``): the fast path on CPU. Index values
(offsets, a plan's rows) are checked inside the op, where ``torch.compile`` does not trace, per the ``mode`` of
:mod:`sparsemm_kernels.utils.checks`.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, resolve_backend, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import (
    MODES,
    OFF,
    TRUSTED,
    autocast_to,
    check_dim,
    check_float_tensor,
    check_int_tensor,
    check_offsets_tensor,
    check_offsets_values,
    check_permutation_values,
    check_same_device,
    check_same_dtype,
    sanitized_offsets,
    validation_mode,
)


def _backend(x: torch.Tensor, num_groups: int, requested: str | None) -> str:
    # Any group count the plan allows runs on every backend (the Triton kernels search a per-call group table).
    return select_backend("grouped_mm", x.device, x.dtype, requested)


def _check_index_values(offsets, rows, num_rows: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    check_offsets_values(offsets, num_rows, "offsets" if rows is None else "plan.offsets", mode)
    if rows is not None:
        check_permutation_values(rows, "plan.sorted_to_orig", mode)


def _host_offsets(offsets: torch.Tensor, num_rows: int, mode: str) -> torch.Tensor:
    """Offsets for the host-side backends (cpu, torch), which read them: sanitized when unchecked."""
    return sanitized_offsets(offsets, num_rows) if mode == OFF else offsets


def _valid_rows(rows: torch.Tensor | None, num_rows: int, mode: str):
    """``(rows to index with, mask of positions whose row exists)``; the mask is None for a checked plan."""
    if rows is None or mode != OFF:
        return rows, None
    valid = (rows >= 0) & (rows < num_rows)
    return torch.where(valid, rows, 0), valid


_HAS_ATEN_GROUPED_MM = hasattr(torch, "_grouped_mm")
#: From this many groups on, the CPU float32 torch backend hands the per-group loop to ``torch._grouped_mm``
#: (one ATen call): with few groups the loop costs the same, with many (fine-grained MoE) its Python overhead
#: dominates.
ATEN_GROUPED_MM_MIN_GROUPS = 8


def _aten_grouped_mm(a: torch.Tensor, b: torch.Tensor, bounds: list[int]) -> torch.Tensor | None:
    """Every group's ``a[s:e] @ b[g]`` (``b (G, K, N)``, out ``(T, N)``), or with ``a`` of shape ``(K, T)`` every
    ``a[:, s:e] @ b[s:e]`` (out ``(G, K, N)``, zeros for an empty group), by ``torch._grouped_mm`` in one call; None
    where it does not run (not the CPU float32 case with many groups, or strides it refuses): the caller loops."""
    if (len(bounds) - 1 < ATEN_GROUPED_MM_MIN_GROUPS or not _HAS_ATEN_GROUPED_MM or a.device.type != "cpu"
            or a.dtype != torch.float32 or b.dtype != a.dtype or min(a.shape) == 0 or min(b.shape) == 0):
        return None
    for t in (a, b):  # its layout rules: one unit stride in the last two dims, the other 16-byte aligned
        if not (t.stride(-1) == 1 or t.stride(-2) == 1) or any(st % 4 for st in t.stride()[-2:] if st != 1):
            return None
        if t.data_ptr() % 16:
            return None
    try:
        return torch._grouped_mm(a, b, offs=torch.tensor(bounds[1:], dtype=torch.int32))
    except RuntimeError:  # a layout its checks refuse that ours let through: the loop computes the same
        return None


def _sorted_products(a, wt, bias, bounds, out=None):
    """Every group's ``a[s:e] @ wt[g] (+ bias[g])`` in sorted row order (``wt (G, K, J)``); with ``out`` given,
    added into it (``out`` must hold every row: a row of an empty group keeps its value)."""
    if out is None:
        out = _aten_grouped_mm(a, wt, bounds) if bias is None else None
        if out is not None:
            return out
        out, add = torch.empty(a.shape[0], wt.shape[2], dtype=a.dtype, device=a.device), False
    else:
        add = True
    for g in range(wt.shape[0]):
        s, e = bounds[g], bounds[g + 1]
        if e <= s:
            continue
        if add:
            out[s:e].addmm_(a[s:e], wt[g])
        elif bias is not None:
            torch.addmm(bias[g], a[s:e], wt[g], out=out[s:e])
        else:
            torch.mm(a[s:e], wt[g], out=out[s:e])
    return out


def _inverse(idx: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation ``idx``."""
    return torch.empty_like(idx).scatter_(0, idx, torch.arange(idx.shape[0], device=idx.device, dtype=idx.dtype))


def _to_token_order(out, idx, valid, inverse=None):
    """Sorted rows ``out`` written back to their original rows ``idx`` (``valid``: see :func:`_valid_rows`)."""
    if valid is not None:  # unchecked plan: a position whose row does not exist writes nothing
        out = out * valid[:, None]
        return torch.zeros_like(out).index_put_((idx[valid],), out[valid])  # sync-ok: torch backend, host-side
    # A permutation: gather through its inverse (index_select is ~2.5x index_copy_ on CPU).
    return out.index_select(0, _inverse(idx) if inverse is None else inverse)


def _gemm_torch(x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode):
    """ATen per group: ``addmm`` straight into the group's slice of a sorted output (no concatenation, no
    zero-fill), gathering with ``index_select`` and scattering as a gather through the inverse permutation."""
    T = x.shape[0]
    w = weight.transpose(1, 2) if transpose_w else weight  # (G, J, K)
    bounds = _host_offsets(offsets, T, mode).tolist()  # sync-ok: the torch backend loops on the host
    idx, valid = _valid_rows(rows, T, mode)
    a = x.index_select(0, idx) if gather_a else x
    out = _sorted_products(a, w.transpose(1, 2), bias, bounds)
    if scatter_c:
        return _to_token_order(out, idx, valid)
    return out if valid is None else out * valid[:, None]


def _gemm_kernel(name, x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode):
    T, J = x.shape[0], (weight.shape[2] if transpose_w else weight.shape[1])
    # An unchecked plan may not be a permutation: start from zeros so that no output row is left unwritten.
    out = x.new_zeros(T, J) if (mode == OFF and rows is not None) else None
    if name == "triton":
        from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm

        return grouped_gemm(
            x, weight, offsets, bias=bias, rows=rows, gather_a=gather_a, scatter_c=scatter_c,
            transpose_w=transpose_w, out=out,
        )
    from sparsemm_kernels.kernels.cpu import grouped_gemm_cpu

    return grouped_gemm_cpu(
        x, weight, _host_offsets(offsets, T, mode), bias=bias, rows=rows, gather_a=gather_a, scatter_c=scatter_c,
        transpose_w=transpose_w, out=out, check_rows=False,
    )


def _grouped_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    rows: torch.Tensor | None,
    gather_a: bool,
    scatter_c: bool,
    transpose_w: bool,
    mode: str,
    backend: str | None,
) -> torch.Tensor:
    """``out[c_r] = x[a_r] @ B_g (+ bias[g])`` over the sorted positions ``r`` of each group ``g``.

    ``B_g = weight[g]^T`` (``weight (G, N, K)``, out ``(T, N)``) or ``weight[g]`` with ``transpose_w``
    (out ``(T, K)``); ``a_r = rows[r]`` with ``gather_a`` (x in original row order) else ``r``, ``c_r =
    rows[r]`` with ``scatter_c`` (output in original order) else ``r``. ``offsets (G+1,) int64``; ``mode``
    one of :data:`~sparsemm_kernels.utils.checks.MODES`.
    """
    if transpose_w and bias is not None:
        raise ValueError("`bias` is not supported with transpose_w (the dX pass has none)")
    if (gather_a or scatter_c) and rows is None:
        raise ValueError("`rows` is required to gather or scatter")
    _check_index_values(offsets, rows, x.shape[0], mode)
    G = weight.shape[0]
    T, K = x.shape
    J = weight.shape[2] if transpose_w else weight.shape[1]
    name = _backend(x, G, backend)
    if G == 0 or T == 0 or J == 0 or (K == 0 and bias is None):  # nothing to compute (and no host read of offsets)
        return x.new_zeros(T, J)
    if name == "torch" or K == 0:
        return _gemm_torch(x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode)
    return _gemm_kernel(name, x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode)


def _grouped_gemm_fake(x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode, backend):
    J = weight.shape[2] if transpose_w else weight.shape[1]
    return x.new_empty(x.shape[0], J)


def _sorted_dw(d, xs, bounds):
    """``dW[g] = d_g^T xs_g`` over sorted rows, by ``mm`` straight into ``dW[g]`` (exact zeros for an empty group)."""
    dw = _aten_grouped_mm(d.t(), xs, bounds)
    if dw is None:
        dw = torch.empty(len(bounds) - 1, d.shape[1], xs.shape[1], dtype=d.dtype, device=d.device)
        for g in range(len(bounds) - 1):
            s, e = bounds[g], bounds[g + 1]
            if e > s:
                torch.mm(d[s:e].t(), xs[s:e], out=dw[g])
            else:
                dw[g].zero_()
    return dw


def _dw_torch(dy, x, offsets, rows, gather_dy, gather_x, compute_dbias, mode):
    """ATen per group: ``dW[g] = dY_g^T X_g`` by ``mm`` straight into ``dW[g]``, ``db[g]`` by ``sum``."""
    T, N = dy.shape[0], dy.shape[1]
    G = offsets.shape[0] - 1
    bounds = _host_offsets(offsets, T, mode).tolist()  # sync-ok: the torch backend loops on the host
    idx, valid = _valid_rows(rows, T, mode)
    d = dy.index_select(0, idx) if gather_dy else dy
    xs = x.index_select(0, idx) if gather_x else x
    if valid is not None:  # unchecked plan: a position whose row does not exist adds nothing
        d = d * valid[:, None]
    dw = _sorted_dw(d, xs, bounds)
    if not compute_dbias:
        return dw, dy.new_empty(0)
    db = torch.empty(G, N, dtype=dy.dtype, device=dy.device)
    for g in range(G):
        s, e = bounds[g], bounds[g + 1]
        if e > s:
            torch.sum(d[s:e], 0, out=db[g])
        else:
            db[g].zero_()
    return dw, db


def _grouped_gemm_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor | None,
    gather_dy: bool,
    gather_x: bool,
    compute_dbias: bool,
    mode: str,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dW (G, N, K)`` with ``dW[g] = dY_g^T X_g`` and ``db (G, N)`` with ``db[g] = sum_r dY_g[r]`` (an empty
    ``(0,)`` tensor unless ``compute_dbias``); ``dy`` (``x``) read through ``rows`` with ``gather_dy``
    (``gather_x``). ``dy (T, N)``, ``x (T, K)``. Empty groups get exact zeros."""
    if (gather_dy or gather_x) and rows is None:
        raise ValueError("`rows` is required to gather")
    _check_index_values(offsets, rows, dy.shape[0], mode)
    G = offsets.shape[0] - 1
    T, N, K = dy.shape[0], dy.shape[1], x.shape[1]
    name = _backend(dy, G, backend)
    if G == 0 or T == 0 or N == 0 or (K == 0 and not compute_dbias):  # all zeros (and no host read of offsets)
        return dy.new_zeros(G, N, K), (dy.new_zeros(G, N) if compute_dbias else dy.new_empty(0))
    if name == "torch" or K == 0:
        return _dw_torch(dy, x, offsets, rows, gather_dy, gather_x, compute_dbias, mode)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.grouped_gemm import grouped_gemm_dw

        dw, db = grouped_gemm_dw(
            dy, x, offsets, rows=rows, gather_dy=gather_dy, gather_x=gather_x, compute_dbias=compute_dbias
        )
    else:
        from sparsemm_kernels.kernels.cpu import grouped_gemm_dw_cpu

        dw, db = grouped_gemm_dw_cpu(
            dy, x, _host_offsets(offsets, T, mode), rows=rows, gather_dy=gather_dy, gather_x=gather_x,
            compute_dbias=compute_dbias, check_rows=False,
        )
    return dw, (db if db is not None else dy.new_empty(0))


def _grouped_gemm_dw_fake(dy, x, offsets, rows, gather_dy, gather_x, compute_dbias, mode, backend):
    G = offsets.shape[0] - 1
    db = dy.new_empty(G, dy.shape[1]) if compute_dbias else dy.new_empty(0)
    return dy.new_empty(G, dy.shape[1], x.shape[1]), db


def _backward_mode(mode: str) -> str:
    # Values were checked (or the plan trusted) by the forward; an unchecked plan stays unchecked.
    return OFF if mode == OFF else TRUSTED


def _gemm_setup(ctx, inputs, output):
    x, weight, bias, offsets, rows, gather_a, scatter_c, transpose_w, mode, backend = inputs
    ctx.save_for_backward(x, weight, offsets, rows)
    ctx.gather_a, ctx.scatter_c, ctx.transpose_w = gather_a, scatter_c, transpose_w
    ctx.mode, ctx.backend = _backward_mode(mode), backend


def _gemm_backward(ctx, dy):
    """``C = A B_g``: ``dA = dC B_g^T`` (dC read where C was written, dA written where A was read) and
    ``dW_g = dC_g^T A_g`` (or its transpose for ``transpose_w``)."""
    x, weight, offsets, rows = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    ga, sc, mode, backend = ctx.gather_a, ctx.scatter_c, ctx.mode, ctx.backend
    if sc and need_x and (need_w or need_b) and mode == TRUSTED and _backend(dy, weight.shape[0], backend) == "torch":
        # The torch backend gathers with a copy: gather dC into sorted order once for both dX and dW. (The
        # kernels gather on load for free, so they keep reading dC where it is.)
        dy, sc = dy.index_select(0, rows), False
    dx = dw = db = None
    if need_x:
        dx = grouped_gemm_op(dy, weight, None, offsets, rows, sc, ga, not ctx.transpose_w, mode, backend)
    if need_w or need_b:
        if ctx.transpose_w:  # C = A W_g: dW_g = A_g^T dC_g (bias is refused in this mode)
            dw, _ = grouped_gemm_dw_op(x, dy, offsets, rows, ga, sc, False, mode, backend)
        else:
            dw, db = grouped_gemm_dw_op(dy, x, offsets, rows, sc, ga, need_b, mode, backend)
    return dx, (dw if need_w else None), (db if need_b else None), None, None, None, None, None, None, None


def _dw_setup(ctx, inputs, output):
    dy, x, offsets, rows, gather_dy, gather_x, compute_dbias, mode, backend = inputs
    ctx.save_for_backward(dy, x, offsets, rows)
    ctx.gather_dy, ctx.gather_x, ctx.compute_dbias = gather_dy, gather_x, compute_dbias
    ctx.mode, ctx.backend = _backward_mode(mode), backend


def _dw_backward(ctx, ddw, ddb):
    """``dW = dY^T X`` and ``db = sum dY`` are bilinear: ``d(dY) = X ddW^T + ddb``, ``dX = dY ddW``."""
    dy, x, offsets, rows = ctx.saved_tensors
    gd, gx, mode, backend = ctx.gather_dy, ctx.gather_x, ctx.mode, ctx.backend
    if ddw is None:
        ddw = dy.new_zeros(offsets.shape[0] - 1, dy.shape[1], x.shape[1])
    bias = ddb if (ctx.compute_dbias and ddb is not None) else None
    d_dy = d_x = None
    if ctx.needs_input_grad[0]:
        d_dy = grouped_gemm_op(x, ddw, bias, offsets, rows, gx, gd, False, mode, backend)
    if ctx.needs_input_grad[1]:
        d_x = grouped_gemm_op(dy, ddw, None, offsets, rows, gd, gx, True, mode, backend)
    return d_dy, d_x, None, None, None, None, None, None, None


grouped_gemm_op = Op("sparsemm::grouped_gemm", _grouped_gemm, _grouped_gemm_fake, _gemm_setup, _gemm_backward)
grouped_gemm_dw_op = Op("sparsemm::grouped_gemm_dw", _grouped_gemm_dw, _grouped_gemm_dw_fake, _dw_setup, _dw_backward)


def _check_operands(x, weight, bias, weight_name: str = "weight"):
    check_float_tensor(x, "x")
    check_dim(x, 2, "x", "(T, K)")
    check_float_tensor(weight, weight_name)
    check_dim(weight, 3, weight_name, "(G, N, K) with nn.Linear layout per group")
    check_same_device("x", x, weight_name, weight)
    check_same_dtype("x", x, weight_name, weight)
    if weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"`{weight_name}` has in_features {weight.shape[2]} (shape {tuple(weight.shape)}) but `x` has "
            f"{x.shape[1]} columns"
        )
    if bias is not None:
        check_float_tensor(bias, "bias")
        check_same_device("x", x, "bias", bias)
        check_same_dtype("x", x, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0], weight.shape[1]):
            raise ValueError(
                f"`bias` must have shape (G, N) = {(weight.shape[0], weight.shape[1])}, got {tuple(bias.shape)}"
            )


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Grouped matrix multiply over contiguous row groups.

    ::

        x (T, K)        weight (G, N, K)         out (T, N)
        [ group 0 ]  @  W[0]^T (+ bias[0])  ->   [ group 0 ]
        [ group 1 ]  @  W[1]^T (+ bias[1])  ->   [ group 1 ]
        ...

    Args:
        x: ``(T, K)`` float16 | bfloat16 | float32 | float64; rows of group ``g`` are
            ``offsets[g]:offsets[g+1]``. Any strides.
        weight: ``(G, N, K)``, same dtype and device as ``x`` (nn.Linear layout per group); any strides.
        offsets: ``(G+1,)`` int32 or int64, ``offsets[0] = 0``, non-decreasing, ``offsets[G] = T``
            (``GroupPlan.offsets``). Groups may be empty.
        bias: optional ``(G, N)``, any strides.
        backend: see :mod:`sparsemm_kernels.backend`; default: the fastest for the device.
        validate: how ``offsets`` values are checked: eagerly (``ValueError``) on CPU, by an asynchronous
            device assertion on CUDA, eagerly with ``True``; not at all with ``False``, in which case
            offsets are read as clamped into ``[0, T]`` and made non-decreasing (every row is still written
            exactly once, from in-range rows only).

    Returns:
        ``(T, N)`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``, like ``nn.Linear``).
        Differentiable in ``x``, ``weight`` and ``bias``, to any order; the weight gradient of an empty group
        is exactly zero. fp16/bf16 accumulate in fp32; fp32 stays fp32 unless
        torch allows TF32 for float32 matmuls (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the
        legacy ``allow_tf32``).
    """
    x, weight, bias = autocast_to(x, weight, bias)
    _check_operands(x, weight, bias)
    check_offsets_tensor(offsets, weight.shape[0], x)
    backend = resolve_backend("grouped_mm", x, check_backend_name(backend))
    offsets = offsets.to(torch.int64).contiguous()
    mode = validation_mode(validate, x.device)
    return grouped_gemm_op(x, weight, bias, offsets, None, False, False, False, mode, backend)


_ORDERS = ("token", "sorted")


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: GroupPlan,
    bias: torch.Tensor | None = None,
    *,
    input_order: str = "token",
    output_order: str = "token",
    backend: str | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """``out[i] = x[i] @ weight[g_i]^T + bias[g_i]`` for rows routed by ``plan``.

    With ``input_order="token"`` (default) the kernels read row ``i`` of ``x`` through
    ``plan.sorted_to_orig``; with ``output_order="token"`` (default) they write each result back to its
    original row: no permuted copy of ``x`` or of the output is made. ``"sorted"`` means rows in plan order
    (group by group, as :func:`grouped_mm` takes them), so layers that keep a group-sorted stream can switch
    order inside the GEMM itself: ``input_order="sorted", output_order="token"`` (Q/K/V for global
    attention) and ``"token"``/``"sorted"`` (the attention output projection).

    Args:
        x: ``(T, K)`` float16 | bfloat16 | float32 | float64, rows in ``input_order``.
        weight: ``(G, N, K)``; bias: optional ``(G, N)``.
        plan: :class:`GroupPlan` over the ``T`` rows with ``G`` groups (from :func:`group_plan`).
        input_order, output_order: ``"token"`` or ``"sorted"``.
        backend: see :mod:`sparsemm_kernels.backend`.
        validate: for a plan not built by :func:`group_plan` (``plan.trusted`` False): its offsets and
            ``sorted_to_orig`` (a permutation) are checked as in :func:`grouped_mm`. With ``False`` they are
            not, and a position whose row is out of range is skipped (rows nobody writes are zero).

    Returns:
        ``(T, N)`` in ``x``'s dtype (the autocast dtype under autocast), rows in ``output_order``;
        differentiable in ``x``, ``weight`` and ``bias``, to any order.
    """
    x, weight, bias = autocast_to(x, weight, bias)
    _check_operands(x, weight, bias)
    _check_plan(plan, x.shape[0], weight.shape[0], x)
    offsets, rows, gather, scatter, mode, backend = _routed_args(x, plan, input_order, output_order, validate, backend)
    return grouped_gemm_op(x, weight, bias, offsets, rows, gather, scatter, False, mode, backend)


def _routed_args(x, plan, input_order, output_order, validate, backend):
    """``(offsets, rows, gather, scatter, mode, backend)`` for the routed GEMM ops, from a checked ``plan``."""
    for name, order in (("input_order", input_order), ("output_order", output_order)):
        if order not in _ORDERS:
            raise ValueError(f"`{name}` must be 'token' or 'sorted', got {order!r}")
    backend = resolve_backend("grouped_mm", x, check_backend_name(backend))
    mode = TRUSTED if plan.trusted else validation_mode(validate, x.device)
    gather, scatter = input_order == "token", output_order == "token"
    rows = plan.sorted_to_orig.contiguous() if (gather or scatter) else None
    return plan.offsets.contiguous(), rows, gather, scatter, mode, backend


def _check_plan(plan, num_rows: int, num_groups: int, x: torch.Tensor, weight_name: str = "weight") -> None:
    if not isinstance(plan, GroupPlan):
        raise TypeError(f"`plan` must be a GroupPlan (from sparsemm_kernels.group_plan), got {type(plan).__name__}")
    if plan.num_rows != num_rows:
        raise ValueError(f"`plan` covers {plan.num_rows} rows but `x` has {num_rows}")
    if plan.num_groups != num_groups:
        raise ValueError(f"`plan` has {plan.num_groups} groups but `{weight_name}` has {num_groups}")
    for name, t in (("plan.offsets", plan.offsets), ("plan.sorted_to_orig", plan.sorted_to_orig)):
        check_int_tensor(t, name)
        check_same_device("x", x, name, t)
    if plan.offsets.dtype != torch.int64 or tuple(plan.offsets.shape) != (num_groups + 1,):
        raise ValueError(f"`plan.offsets` must be int64 of shape ({num_groups + 1},), got "
                         f"{plan.offsets.dtype} {tuple(plan.offsets.shape)}")
    if plan.sorted_to_orig.dtype != torch.int64 or tuple(plan.sorted_to_orig.shape) != (num_rows,):
        raise ValueError(f"`plan.sorted_to_orig` must be int64 of shape ({num_rows},), got "
                         f"{plan.sorted_to_orig.dtype} {tuple(plan.sorted_to_orig.shape)}")

