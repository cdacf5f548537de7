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
