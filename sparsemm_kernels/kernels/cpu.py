"""Launchers for the extension's C++ CPU ops: check -> allocate -> call ``sparsemm_kernels._C``.

The C++ side trusts what it is given (pointers, strides, row indices), so every shape, dtype, device and
index-range check happens here, on CPU tensors where reading values costs no device sync. No autograd here.
"""

from __future__ import annotations

import torch

from sparsemm_kernels import _ext
from sparsemm_kernels.utils.checks import check_dim, check_int_tensor, check_positive_int, check_tensor

_GEMM_DTYPES = (torch.float32, torch.float64)


def group_plan_cpu(ids: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stable counting sort of group ids (C++).

    Args:
        ids: ``(n,)`` int32 | int64 CPU tensor (any shape is flattened); ids should lie in ``[0, num_groups)``.
        num_groups: ``G >= 1``.

    Returns:
        ``sorted_to_orig (n,) int64`` (original index of each row, group by group, increasing within a group),
        ``counts (G,) int64``, ``offsets (G+1,) int64`` (``offsets[0] = 0``, ``offsets[G] = n``), and the
        index of the first id outside ``[0, G)`` or ``-1``. Such ids are sorted as the nearest valid id, so
        the three tensors always form a complete plan.
    """
    c = _ext.require()
    check_int_tensor(ids, "ids")
    _check_cpu(ids, "ids")
    check_positive_int(num_groups, "num_groups")
    ids = ids.reshape(-1).contiguous()
    n = ids.numel()
    sorted_to_orig = torch.empty(n, dtype=torch.int64)
    counts = torch.empty(num_groups, dtype=torch.int64)
    offsets = torch.empty(num_groups + 1, dtype=torch.int64)
    first_bad = c.group_plan_cpu(
        ids.data_ptr(), _ext.dtype_code(ids.dtype), n, num_groups,
        sorted_to_orig.data_ptr(), counts.data_ptr(), offsets.data_ptr(),
    )  # fmt: skip
    return sorted_to_orig, counts, offsets, int(first_bad)


def grouped_gemm_cpu(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    gather_a: bool = False,
    scatter_c: bool = False,
    transpose_w: bool = False,
    out: torch.Tensor | None = None,
    check_rows: bool = True,
) -> torch.Tensor:
    """Grouped GEMM (C++): for each group ``g`` and sorted position ``r`` in ``[offsets[g], offsets[g+1])``::

        C[cr] = A[ar] @ W[g]^T (+ bias[g])     transpose_w=False (forward; A has K columns, C has N)
        C[cr] = A[ar] @ W[g]   (+ bias[g])     transpose_w=True  (dX;      A has N columns, C has K)

    with ``ar = rows[r] if gather_a else r`` and ``cr = rows[r] if scatter_c else r``.

    Args:
        a: ``(Ta, K or N)`` float32 | float64 CPU.
        w: ``(G, N, K)`` same dtype (nn.Linear layout per group); any strides.
        offsets: ``(G+1,)`` int64, non-decreasing from ``offsets[0] >= 0``; ``M = offsets[G] - offsets[0]``.
        bias: optional ``(G, N)`` (or ``(G, K)`` with ``transpose_w``), same dtype.
        rows: ``(>= offsets[G],)`` int64, needed by ``gather_a``/``scatter_c``; gathered ids lie in
            ``[0, Ta)``, scattered ids in ``[0, Tc)`` and are distinct (each output row has one writer).
        out: optional ``(Tc, N or K)`` output with unit column stride, written in place and returned. Rows
            no group writes are left untouched. Must not overlap ``a``.
        check_rows: raise ``ValueError`` for ``rows`` values out of range or repeated (scatter). With
            ``False`` (a caller that validated, or chose not to) the kernel skips positions whose row is out
            of range, and a repeated scattered row is written more than once.

    Returns:
        ``out``, or a new ``(Tc, N or K)`` tensor with ``Tc = len(rows)`` for gather-only and ``Tc = Ta``
        otherwise; its rows that no group writes (only when ``M < Tc``) are zero.
    """
    c = _ext.require()
    a = _check_gemm_operand(a, "a")
    check_tensor(w, "w")
    check_dim(w, 3, "w", "(G, N, K)")
    _check_like(a, "a", w, "w")
    num_groups, n_dim, k_dim = w.shape
    # B[g, k, j] of the C++ op: k runs over A's columns, j over C's columns.
    if transpose_w:
        k_dim, j_dim, b_stride_k, b_stride_j = n_dim, k_dim, w.stride(1), w.stride(2)
    else:
        j_dim, b_stride_k, b_stride_j = n_dim, w.stride(2), w.stride(1)
    if a.shape[1] != k_dim:
        raise ValueError(
            f"`a` must have {k_dim} columns to multiply `w` of shape {tuple(w.shape)} "
            f"(transpose_w={transpose_w}), got shape {tuple(a.shape)}"
        )
    offsets, start, end = _check_offsets(offsets, num_groups)
    if (gather_a or scatter_c) and rows is None:
        raise ValueError("`rows` is required when gather_a or scatter_c is set")
    if rows is not None:
        rows = _check_rows(rows, end)
    if out is None:
        tc = rows.shape[0] if (gather_a and not scatter_c) else a.shape[0]
        # Every row written exactly once only when the positions cover them and the scattered rows were checked.
        alloc = torch.empty if (end - start == tc and (not scatter_c or check_rows)) else torch.zeros
        out = alloc(tc, j_dim, dtype=a.dtype)
    else:
        _check_out(out, a, j_dim)
    tc = out.shape[0]
    if not gather_a and end > a.shape[0]:
        raise ValueError(f"`offsets` ends at {end} but `a` has only {a.shape[0]} rows")
    if not scatter_c and end > tc:
        raise ValueError(f"`offsets` ends at {end} but the output has only {tc} rows")
    if gather_a and check_rows:
        _check_row_range(rows[start:end], a.shape[0], "rows", "rows of `a`")
    if scatter_c and check_rows:
        _check_row_range(rows[start:end], tc, "rows", "output rows")
        if end > start and int(torch.bincount(rows[start:end], minlength=tc).max()) > 1:
            raise ValueError("`rows` must not repeat an output row when scatter_c is set (one writer per row)")
    bias_ptr, bias_stride = 0, 0
    if bias is not None:
        check_tensor(bias, "bias")
        _check_like(a, "a", bias, "bias")
        if tuple(bias.shape) != (num_groups, j_dim):
            raise ValueError(f"`bias` must have shape {(num_groups, j_dim)}, got {tuple(bias.shape)}")
        bias = _unit_col_stride(bias)
        bias_ptr, bias_stride = bias.data_ptr(), bias.stride(0)
    c.grouped_gemm_cpu(
        # A: pointer, row stride
        a.data_ptr(), a.stride(0),
        # B = W viewed as [G, k, j]
        w.data_ptr(), w.stride(0), b_stride_k, b_stride_j,
        # bias: pointer, group stride (0 = none)
        bias_ptr, bias_stride,
        # C: pointer, row stride
        out.data_ptr(), out.stride(0),
        # plan
        offsets.data_ptr(), rows.data_ptr() if rows is not None else 0, gather_a, scatter_c,
        # sizes: groups, k, j; row bounds of A and C; positions (rows of the plan); dtype
        num_groups, k_dim, j_dim, a.shape[0], tc, rows.shape[0] if rows is not None else min(a.shape[0], tc),
        _ext.dtype_code(a.dtype),
    )  # fmt: skip
    return out


def grouped_gemm_dw_cpu(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    gathered: bool = False,
    compute_dbias: bool = False,
    check_rows: bool = True,
    gather_dy: bool | None = None,
    gather_x: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (and bias) gradient of the grouped GEMM (C++)::

        dW[g] = sum_{r in group g} dY[rr]^T X[rr]      (N, K)
        db[g] = sum_{r in group g} dY[rr]              (N,)

    with ``rr = rows[r] if gathered else r``, rows summed in increasing ``r`` (bitwise reproducible).

    Args:
        dy: ``(T, N)`` float32 | float64 CPU.
        x: ``(T, K)`` same dtype.
        offsets: ``(G+1,)`` int64, non-decreasing from ``offsets[0] >= 0``, ``offsets[G] <= T`` unless
            ``gathered``.
        rows: ``(>= offsets[G],)`` int64 with values in ``[0, T)``; required when ``gathered``.
        check_rows: raise ``ValueError`` for ``rows`` values out of range; with ``False`` the kernel skips them.
        gather_dy, gather_x: read only ``dy`` (or only ``x``) through ``rows``; both default to ``gathered``.

    Returns:
        ``dw (G, N, K)`` and ``dbias (G, N)`` (or ``None`` unless ``compute_dbias``), in ``dy``'s dtype; an
        empty group's gradients are exactly zero.
    """
    c = _ext.require()
    dy = _check_gemm_operand(dy, "dy")
    x = _check_gemm_operand(x, "x")
    _check_like(dy, "dy", x, "x")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"`x` must have as many rows as `dy` ({dy.shape[0]}), got shape {tuple(x.shape)}")
    check_tensor(offsets, "offsets")
    num_groups = offsets.shape[0] - 1 if offsets.dim() == 1 else -1
    if num_groups < 0:
        raise ValueError(f"`offsets` must be 1-D of length G+1 >= 1, got shape {tuple(offsets.shape)}")
    offsets, start, end = _check_offsets(offsets, num_groups)
    t, n_dim, k_dim = dy.shape[0], dy.shape[1], x.shape[1]
    gather_dy = gathered if gather_dy is None else gather_dy
    gather_x = gathered if gather_x is None else gather_x
    gathered = gather_dy or gather_x
    if gathered:
        if rows is None:
            raise ValueError("`rows` is required when gathered is set")
        rows = _check_rows(rows, end)
        if check_rows:
            _check_row_range(rows[start:end], t, "rows", "rows of `dy`/`x`")
    if not (gather_dy and gather_x) and end > t:  # the operand that is not gathered is read at the positions
        raise ValueError(f"`offsets` ends at {end} but `dy` and `x` have only {t} rows")
    dw = torch.empty(num_groups, n_dim, k_dim, dtype=dy.dtype)
    dbias = torch.empty(num_groups, n_dim, dtype=dy.dtype) if compute_dbias else None
    c.grouped_gemm_dw_cpu(
        dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
        dw.data_ptr(), dbias.data_ptr() if dbias is not None else 0,
        offsets.data_ptr(), rows.data_ptr() if gathered else 0, gather_dy, gather_x,
        num_groups, n_dim, k_dim, t, rows.shape[0] if gathered else t, _ext.dtype_code(dy.dtype),
    )  # fmt: skip
    return dw, dbias


def expert_choice_cpu(
    scores: torch.Tensor, token_mask: torch.Tensor | None, capacity: int, limit: torch.Tensor | None
) -> torch.Tensor:
    """Expert-choice routing (C++ segmented top-k, one thread per expert at a time).

    Args:
        scores: ``[N, E]`` float CPU tensor, any strides (float16/bfloat16 are read as float32, exactly).
        token_mask: None, ``[N]`` or ``[N, E]`` bool; False is never chosen.
        capacity: slots per expert, ``>= 1``.
        limit: None or ``[E]`` int64 per-expert caps (``<= capacity``; negative counts as 0).

    Returns:
        ``[E, capacity]`` int64: per expert its ``min(capacity, N, limit[e])`` highest-scoring eligible tokens
        (ties to the lower token) in ascending order, then ``-1``. NaN and ``-inf`` scores are never chosen.
    """
    c = _ext.require()
    check_tensor(scores, "scores")
    _check_cpu(scores, "scores")
    check_dim(scores, 2, "scores", "[N, E]")
    check_positive_int(capacity, "capacity")
    N, E = scores.shape
    if scores.dtype not in _GEMM_DTYPES:
        scores = scores.float()  # float16/bfloat16 -> float32 is exact: the same ranking
    mask_mode, mask_ptr, msn, mse = 0, 0, 0, 0
    if token_mask is not None:
        check_tensor(token_mask, "token_mask")
        _check_cpu(token_mask, "token_mask")
        if token_mask.dtype != torch.bool or tuple(token_mask.shape) not in ((N,), (N, E)):
            raise ValueError(f"`token_mask` must be bool [N] or [N, E] = [{N}, {E}], got {token_mask.dtype} "
                             f"{tuple(token_mask.shape)}")
        token_mask = token_mask.view(torch.uint8)
        mask_mode = token_mask.dim()
        mask_ptr, msn = token_mask.data_ptr(), token_mask.stride(0)
        mse = token_mask.stride(1) if mask_mode == 2 else 0
    limit_ptr = 0
    if limit is not None:
        check_int_tensor(limit, "limit")
        _check_cpu(limit, "limit")
        if tuple(limit.shape) != (E,):
            raise ValueError(f"`limit` must have shape ({E},), got {tuple(limit.shape)}")
        limit = limit.to(torch.int64).contiguous()
        limit_ptr = limit.data_ptr()
    out = torch.empty(E, capacity, dtype=torch.int64)
    c.expert_choice_cpu(scores.data_ptr(), _ext.dtype_code(scores.dtype), N, E, scores.stride(0), scores.stride(1),
                        mask_ptr, mask_mode, msn, mse, limit_ptr, capacity, out.data_ptr())
    return out


def _router_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits [N, E]`` checked (a float CPU tensor, ``1 <= k <= E``), float16/bfloat16 read as float32."""
    check_tensor(logits, "logits")
    _check_cpu(logits, "logits")
    check_dim(logits, 2, "logits", "[N, E]")
    check_positive_int(k, "top_k")
    if k > logits.shape[1]:
        raise ValueError(f"`top_k` must be in [1, {logits.shape[1]}], got {k}")
    return logits if logits.dtype in _GEMM_DTYPES else logits.float()


def token_topk_cpu(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Token-choice top-k (C++): ``[N, k]`` int64, per row of ``logits [N, E]`` (float CPU tensor, any strides;
    float16/bfloat16 read as float32, exactly) the ``k`` largest, descending, ties to the lower index."""
    c = _ext.require()
    logits = _router_logits(logits, k)
    N, E = logits.shape
    out = torch.empty(N, k, dtype=torch.int64)
    c.token_topk_cpu(logits.data_ptr(), _ext.dtype_code(logits.dtype), N, E, logits.stride(0), logits.stride(1), k,
                     out.data_ptr())
    return out


def token_choice_plan_cpu(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Token-choice routing fused with its plan (C++), for ``logits [N, E]`` (float CPU tensor, any strides;
    float16/bfloat16 read as float32, exactly), ``1 <= k <= E``.

    Returns ``expert_idx [N, k]`` int64 (as :func:`token_topk_cpu`), ``gates [N, k]`` (float64 for float64 logits,
    else float32: the softmax over each row's ``k`` chosen logits) and the stable sort of the ``N * k`` pairs
    ``p = t * k + j`` by expert: ``sorted_to_orig``, ``slots`` (the token of each sorted pair), ``counts [E]``,
    ``offsets [E + 1]``, ``orig_to_sorted``, int64.
    """
    c = _ext.require()
    logits = _router_logits(logits, k)
    N, E = logits.shape
    idx = torch.empty(N, k, dtype=torch.int64)
    gates = torch.empty(N, k, dtype=logits.dtype)
    sorted_to_orig, slots, orig_to_sorted = (torch.empty(N * k, dtype=torch.int64) for _ in range(3))
    counts, offsets = torch.empty(E, dtype=torch.int64), torch.empty(E + 1, dtype=torch.int64)
    c.token_choice_plan_cpu(
        logits.data_ptr(), _ext.dtype_code(logits.dtype), N, E, logits.stride(0), logits.stride(1), k,
        idx.data_ptr(), gates.data_ptr(), sorted_to_orig.data_ptr(), slots.data_ptr(), counts.data_ptr(),
        offsets.data_ptr(), orig_to_sorted.data_ptr(),
    )  # fmt: skip
    return idx, gates, sorted_to_orig, slots, counts, offsets, orig_to_sorted


def _check_norm_operands(x, weight, bias, ids, heads, offsets) -> tuple[torch.Tensor, int]:
    """``x`` with unit column stride and the group count; raises for what the C++ norms cannot take."""
    for t, name in ((x, "x"), (weight, "weight")):
        check_tensor(t, name)
        _check_cpu(t, name)
    if x.dtype not in _GEMM_DTYPES:
        raise TypeError(f"`x` must be float32 or float64 for the C++ norms, got {x.dtype}")
    check_dim(x, 2, "x", "(rows, dim)")
    check_dim(weight, 2, "weight", "(groups, dim)")
    _check_like(x, "x", weight, "weight")
    if weight.shape[1] != x.shape[1] or weight.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"`weight` must be (groups >= 1, {x.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None:
        _check_like(x, "x", bias, "bias")
        if bias.shape != weight.shape:
            raise ValueError(f"`bias` must have the weight's shape {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if (ids is None) == (offsets is None):
        raise ValueError("exactly one of `ids` and `offsets` must be given")
    if ids is not None:
        check_int_tensor(ids, "ids")
        _check_cpu(ids, "ids")
        check_positive_int(heads, "heads")
        if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() * heads != x.shape[0]:
            raise ValueError(f"`ids` must be int64 (rows / heads,) = ({x.shape[0] // heads},), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    else:
        _check_cpu(offsets, "offsets")
        if offsets.dtype != torch.int64 or tuple(offsets.shape) != (weight.shape[0] + 1,):
            raise ValueError(f"`offsets` must be int64 of shape ({weight.shape[0] + 1},), got {offsets.dtype} "
                             f"{tuple(offsets.shape)}")
    return _unit_col_stride(x), weight.shape[0]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def group_norm_fwd_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    *,
    ids: torch.Tensor | None = None,
    heads: int = 1,
    offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group RMSNorm (``is_rms``) or LayerNorm of the rows of ``x (R, D)`` (C++, one pass per row).

    Row ``r`` belongs to group ``ids[r // heads]`` (clamped into ``[0, G)``) or, with ``offsets`` (int64
    ``(G+1,)``, non-decreasing from 0 to R: a ValueError otherwise), to the group whose range holds it.
    ``weight``/``bias (G, D)``, x's dtype (float32 or float64). Returns ``y (R, D)`` contiguous, ``mean (R,)``
    (``(0,)`` for RMSNorm) and ``rstd (R,)`` in x's dtype.
    """
    c = _ext.require()
    x, G = _check_norm_operands(x, weight, bias, ids, heads, offsets)
    R, D = x.shape
    # Contiguous operands held in locals: a temporary's memory would be freed before the C++ call reads it.
    weight, bias, ids, offsets = (None if t is None else t.contiguous() for t in (weight, bias, ids, offsets))
    y = torch.empty(R, D, dtype=x.dtype)
    mean = x.new_empty(0 if is_rms else R)
    rstd = x.new_empty(R)
    if R == 0:  # nothing to read (an empty ids tensor has no address)
        return y, mean, rstd
    c.group_norm_fwd_cpu(
        x.data_ptr(), x.stride(0), weight.data_ptr(), _ptr(bias), _ptr(ids), _ptr(offsets), heads, R, D, G,
        float(eps), bool(is_rms), y.data_ptr(), _ptr(None if is_rms else mean), rstd.data_ptr(),
        _ext.dtype_code(x.dtype),
    )  # fmt: skip
    return y, mean, rstd


def group_norm_bwd_cpu(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
    *,
    ids: torch.Tensor | None = None,
    heads: int = 1,
    offsets: torch.Tensor | None = None,
    need_dx: bool = True,
    need_dw: bool = True,
    need_db: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` of :func:`group_norm_fwd_cpu` from its ``mean``/``rstd`` (None where not asked for);
    groups as there. Weight gradients are summed in double over fixed row chunks, so they do not depend on the
    thread count; a group without rows gets zeros."""
    c = _ext.require()
    x, G = _check_norm_operands(x, weight, None, ids, heads, offsets)
    R, D = x.shape
    check_tensor(dy, "dy")
    _check_like(x, "x", dy, "dy")
    if tuple(dy.shape) != (R, D):
        raise ValueError(f"`dy` must have x's shape {(R, D)}, got {tuple(dy.shape)}")
    for t, name, n in ((rstd, "rstd", R), (mean, "mean", 0 if is_rms else R)):
        _check_like(x, "x", t, name)
        if tuple(t.shape) != (n,):
            raise ValueError(f"`{name}` must have shape ({n},), got {tuple(t.shape)}")
    dy = _unit_col_stride(dy)
    weight, ids, offsets, mean, rstd = (
        None if t is None else t.contiguous() for t in (weight, ids, offsets, mean, rstd)
    )
    dx = torch.empty(R, D, dtype=x.dtype) if need_dx else None
    dw = torch.empty(G, D, dtype=x.dtype) if need_dw else None
    db = torch.empty(G, D, dtype=x.dtype) if need_db else None
    if R == 0:  # no rows: zero weight gradients (an empty ids tensor has no address)
        return dx, (dw.zero_() if need_dw else None), (db.zero_() if need_db else None)
    c.group_norm_bwd_cpu(
        dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), weight.data_ptr(), _ptr(ids), _ptr(offsets), heads,
        R, D, G, bool(is_rms), _ptr(None if is_rms else mean), rstd.data_ptr(), _ptr(dx), _ptr(dw), _ptr(db),
        _ext.dtype_code(x.dtype),
    )  # fmt: skip
    return dx, dw, db


def _activation_rows(t: torch.Tensor, name: str, cols: int) -> torch.Tensor:
    """``t`` as ``(rows, cols)`` with unit column stride (a view when its strides allow)."""
    check_tensor(t, name)
    _check_cpu(t, name)
    if t.dtype not in _GEMM_DTYPES:
        raise TypeError(f"`{name}` must be float32 or float64 for the C++ SwiGLU, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"`{name}` must have at least one dimension")
    return _unit_col_stride(t.reshape(-1, cols))


def _same_shape(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    _check_like(ref, ref_name, t, name)
    if t.shape != ref.shape:
        raise ValueError(f"`{name}` must have `{ref_name}`'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")


def _silu_mul_rows(g: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> None:
    """``h = silu(g) * u`` over ``(rows, H)`` views with unit column strides (C++)."""
    _ext.require().silu_mul_fwd_cpu(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), h.data_ptr(), h.stride(0),
                                    g.shape[0], g.shape[1], _ext.dtype_code(g.dtype))


def _silu_mul_bwd_rows(g, u, d, dg, du) -> None:
    """``dg, du`` of :func:`_silu_mul_rows` from ``d`` (C++); ``(rows, H)`` views with unit column strides."""
    _ext.require().silu_mul_bwd_cpu(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), d.data_ptr(), d.stride(0),
                                    dg.data_ptr(), dg.stride(0), du.data_ptr(), du.stride(0), g.shape[0], g.shape[1],
                                    _ext.dtype_code(g.dtype))


def silu_mul_fwd_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (C++, one pass, float32/float64): ``gate``, ``up`` of one shape, any strides; the
    result contiguous in that shape."""
    _same_shape(gate, "gate", up, "up")
    H = gate.shape[-1] if gate.dim() else 1
    h = torch.empty(gate.shape, dtype=gate.dtype)
    if h.numel():
        _silu_mul_rows(_activation_rows(gate, "gate", H), _activation_rows(up, "up", H), h.view(-1, H))
    return h


def silu_mul_bwd_cpu(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d gate, d up) = (dy * up * s * (1 + gate (1 - s)), dy * silu(gate))``, ``s = sigmoid(gate)`` (C++, one
    pass); contiguous, in ``gate``'s shape."""
    _same_shape(gate, "gate", up, "up")
    _same_shape(gate, "gate", dy, "dy")
    H = gate.shape[-1] if gate.dim() else 1
    dg, du = torch.empty(gate.shape, dtype=gate.dtype), torch.empty(gate.shape, dtype=gate.dtype)
    if dg.numel():
        g, u, d = (_activation_rows(t, n, H) for t, n in ((gate, "gate"), (up, "up"), (dy, "dy")))
        _silu_mul_bwd_rows(g, u, d, dg.view(-1, H), du.view(-1, H))
    return dg, du


def _half_width(gate_up: torch.Tensor) -> int:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"`gate_up` must have an even last dimension, got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


def swiglu_fwd_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``gate_up = [a | b]`` along the last dim (C++): ``(..., H)`` contiguous; the halves
    are read in place (row stride 2H)."""
    H = _half_width(gate_up)
    h = torch.empty(*gate_up.shape[:-1], H, dtype=gate_up.dtype)
    if h.numel():
        gu = _activation_rows(gate_up, "gate_up", 2 * H)
        _silu_mul_rows(gu[:, :H], gu[:, H:], h.view(-1, H))
    return h


def swiglu_bwd_cpu(gate_up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``d gate_up = [dy * b * s * (1 + a (1 - s)) | dy * silu(a)]`` (C++, one pass); contiguous, gate_up's
    shape, both halves written in place."""
    H = _half_width(gate_up)
    if tuple(dy.shape) != (*gate_up.shape[:-1], H):
        raise ValueError(f"`dy` must have shape {(*gate_up.shape[:-1], H)}, got {tuple(dy.shape)}")
    _check_like(gate_up, "gate_up", dy, "dy")
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype)
    if dgu.numel():
        gu, d, out = _activation_rows(gate_up, "gate_up", 2 * H), _activation_rows(dy, "dy", H), dgu.view(-1, 2 * H)
        _silu_mul_bwd_rows(gu[:, :H], gu[:, H:], d, out[:, :H], out[:, H:])
    return dgu


def _check_cpu(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"`{name}` must be a CPU tensor for the C++ kernels, got device {t.device}")


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (any row stride), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_gemm_operand(t: torch.Tensor, name: str) -> torch.Tensor:
    check_tensor(t, name)
    if t.dtype not in _GEMM_DTYPES:
        raise TypeError(f"`{name}` must be float32 or float64 for the C++ grouped GEMM, got {t.dtype}")
    _check_cpu(t, name)
    check_dim(t, 2, name, "(rows, columns)")
    return _unit_col_stride(t)


def _check_like(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"`{name}` has dtype {t.dtype} but `{ref_name}` has dtype {ref.dtype}; they must match")
    _check_cpu(t, name)


def _check_offsets(offsets: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, int, int]:
    """Contiguous int64 ``offsets`` with its first and last values (CPU: reading them costs no sync)."""
    check_tensor(offsets, "offsets")
    if offsets.dtype != torch.int64:
        raise TypeError(f"`offsets` must be int64, got {offsets.dtype}")
    _check_cpu(offsets, "offsets")
    if tuple(offsets.shape) != (num_groups + 1,):
        raise ValueError(f"`offsets` must have shape (G+1,) = ({num_groups + 1},), got {tuple(offsets.shape)}")
    offsets = offsets.contiguous()
    start, end = int(offsets[0]), int(offsets[-1])  # sync-ok: CPU tensor
    if start < 0:
        raise ValueError(f"`offsets` must start at >= 0, got offsets[0]={start}")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"`offsets` must be non-decreasing, got {offsets}")
    return offsets, start, end


def _check_rows(rows: torch.Tensor, end: int) -> torch.Tensor:
    check_tensor(rows, "rows")
    if rows.dtype != torch.int64:
        raise TypeError(f"`rows` must be int64, got {rows.dtype}")
    _check_cpu(rows, "rows")
    if rows.dim() != 1 or rows.shape[0] < end:
        raise ValueError(f"`rows` must be 1-D with at least offsets[G]={end} entries, got {tuple(rows.shape)}")
    return rows.contiguous()


def _check_row_range(used: torch.Tensor, limit: int, name: str, what: str) -> None:
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= limit):
        raise ValueError(
            f"`{name}` must index {what} in [0, {limit}), got values in [{int(used.min())}, {int(used.max())}]"
        )


def _check_out(out: torch.Tensor, a: torch.Tensor, j_dim: int) -> None:
    check_tensor(out, "out")
    _check_like(a, "a", out, "out")
    check_dim(out, 2, "out", "(rows, columns)")
    if out.shape[1] != j_dim:
        raise ValueError(f"`out` must have {j_dim} columns, got shape {tuple(out.shape)}")
    if j_dim > 1 and out.stride(1) != 1:
        raise ValueError(f"`out` must have unit column stride (it is written in place), got {out.stride()}")
    if out.shape[0] > 1 and out.stride(0) < j_dim:
        raise ValueError(f"`out` rows must not overlap (row stride >= {j_dim}), got strides {out.stride()}")
    if out.numel() and a.numel() and out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr():
        raise ValueError("`out` must not share memory with `a` (rows are read while others are written)")
