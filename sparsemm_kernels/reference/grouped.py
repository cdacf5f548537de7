"""Reference grouped GEMM: one ``x_g @ W_g^T + b_g`` per group, in a Python loop."""

from __future__ import annotations

import torch


def grouped_mm_ref(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``offsets[g]:offsets[g+1]`` of ``x (T, K)`` times ``weight[g] (N, K)`` transposed, plus ``bias[g]``.

    Returns ``(T, N)`` in ``x``'s dtype. Differentiable in ``x``, ``weight`` and ``bias``; an empty group
    gets an exactly-zero weight gradient. Reads ``offsets`` on the host.
    """
    bounds = offsets.tolist()
    # unbind: one backward node for all groups (indexing weight[g] per group would build G full-size grads)
    weights = weight.unbind(0)
    biases = bias.unbind(0) if bias is not None else None
    pieces = []
    for g, w in enumerate(weights):
        y = x[bounds[g] : bounds[g + 1]] @ w.t()
        if biases is not None:
            y = y + biases[g]
        pieces.append(y)
    if not pieces:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(pieces, dim=0)


def grouped_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    sorted_to_orig: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row ``i`` of the result is ``x[i] @ weight[g_i]^T + bias[g_i]``, with ``x (T, K)`` in original order.

    Gathers ``x`` into group order with ``sorted_to_orig``, runs :func:`grouped_mm_ref`, and puts each row
    back where it came from.
    """
    y_sorted = grouped_mm_ref(x[sorted_to_orig], weight, offsets, bias)
    out = torch.zeros_like(y_sorted)
    return out.index_copy(0, sorted_to_orig, y_sorted)


def grouped_mm_dw_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor | None = None,
    compute_dbias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group weight and bias gradients: ``dW[g] = dY_g^T X_g`` ``(N, K)`` and ``db[g] = sum_r dY_g[r]``.

    ``dy (T, N)``, ``x (T, K)``; group ``g`` is sorted positions ``offsets[g]:offsets[g+1]``, whose rows are
    ``rows[r]`` (original order) or ``r`` itself. float16/bfloat16 accumulate in float32; results in ``dy``'s
    dtype; an empty group gets exact zeros. Reads ``offsets`` on the host.
    """
    bounds = offsets.tolist()
    G, N, K = len(bounds) - 1, dy.shape[1], x.shape[1]
    acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
    dw = torch.zeros(G, N, K, dtype=acc, device=dy.device)
    db = torch.zeros(G, N, dtype=acc, device=dy.device) if compute_dbias else None
    for g in range(G):
        idx = rows[bounds[g] : bounds[g + 1]] if rows is not None else slice(bounds[g], bounds[g + 1])
        dy_g, x_g = dy[idx].to(acc), x[idx].to(acc)
        dw[g] = dy_g.t() @ x_g
        if db is not None:
            db[g] = dy_g.sum(0)
    return dw.to(dy.dtype), (db.to(dy.dtype) if db is not None else None)
