"""The Avg-K sparse FFN as a module: :func:`~sparsemm_kernels.avgk_ffn` on its own parameters."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.ops.avgk import ACTIVATIONS, STRATEGIES, _blocks, avgk_ffn
from sparsemm_kernels.utils.checks import check_positive_int


class AvgKFeedForward(nn.Module):
    """An FFN whose every token computes only its ``top_k`` blocks of ``block_size`` cells, chosen by the mean key.

    Parameters: ``w_in [hidden, dim]`` (keys), ``w_out [dim, hidden]`` (values), ``w_up [hidden, dim]`` with ``glu``,
    ``b_in [hidden]`` and ``b_out [dim]`` with ``bias``. ``forward(x [..., dim]) -> [..., dim]``. With
    ``top_k = hidden / block_size`` it is the dense FFN ``w_out act(w_in x + b_in) (+ b_out)`` exactly.
    ``strategy``: ``"auto"`` (by shape), ``"grouped"`` or ``"gathered"`` (see :func:`~sparsemm_kernels.avgk_ffn`).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        block_size: int,
        top_k: int,
        activation: str = "gelu",
        glu: bool = False,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(hidden_dim, "hidden_dim")
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden_dim % check_positive_int(block_size, "block_size"):
            raise ValueError(f"`block_size` {block_size} must divide `hidden_dim` {hidden_dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.block_size, self.activation = dim, hidden_dim, block_size, activation
        self.w_in = nn.Parameter(torch.empty(hidden_dim, dim, **factory))
        _, n_blocks, self.top_k = _blocks(self.w_in, block_size, top_k)
        self.n_blocks = n_blocks
        self.w_out = nn.Parameter(torch.empty(dim, hidden_dim, **factory))
        self.w_up = nn.Parameter(torch.empty(hidden_dim, dim, **factory)) if glu else None
        self.b_in = nn.Parameter(torch.empty(hidden_dim, **factory)) if bias else None
        self.b_out = nn.Parameter(torch.empty(dim, **factory)) if bias else None
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
        self.backend, self.strategy = check_backend_name(backend), strategy
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``w_in`` / ``w_up`` like ``nn.Linear(dim, hidden)``, ``w_out`` like ``nn.Linear(hidden, dim)``; biases the
        same way."""
        for w in (self.w_in, self.w_up, self.w_out):
            if w is not None:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for b, fan_in in ((self.b_in, self.dim), (self.b_out, self.hidden_dim)):
            if b is not None:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, modality_ids=None, plan=None, *, sorted_rows: bool = False) -> torch.Tensor:
        """x: ``[..., dim]`` -> ``[..., dim]``. ``modality_ids``, ``plan`` and ``sorted_rows`` are accepted and ignored
        (so the module stands where a :class:`~sparsemm_kernels.nn.MoTFeedForward` stands, e.g. in a ``MoTBlock``)."""
        return avgk_ffn(x, self.w_in, self.w_out, self.block_size, self.top_k, self.activation, self.b_in, self.b_out,
                        self.w_up, strategy=self.strategy, backend=prefer(self.backend))

    def forward_sorted(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        """A block's FFN slot in the sorted stream: ``x (T, dim)`` in any order -> the same order (a module call)."""
        return self(x, None, plan, sorted_rows=True)

    @classmethod
    def from_dense(cls, w_in: torch.Tensor, w_out: torch.Tensor, block_size: int, top_k: int,
                   activation: str = "gelu", b_in=None, b_out=None, w_up=None, *,
                   backend: str | None = None, strategy: str = "auto") -> AvgKFeedForward:
        """An Avg-K FFN holding a dense FFN's weights (``w_in [hidden, dim]``, ``w_out [dim, hidden]``, optional
        ``b_in``, ``b_out``, ``w_up``: e.g. ``fc1.weight``, ``fc2.weight``, ``fc1.bias``, ``fc2.bias``), copied."""
        hidden, dim = w_in.shape
        m = cls(dim, hidden, block_size, top_k, activation, glu=w_up is not None,
                bias=b_in is not None or b_out is not None, device=w_in.device, dtype=w_in.dtype, backend=backend,
                strategy=strategy)
        with torch.no_grad():
            m.w_in.copy_(w_in)
            m.w_out.copy_(w_out)
            if w_up is not None:
                m.w_up.copy_(w_up)
            if m.b_in is not None:
                m.b_in.copy_(b_in if b_in is not None else torch.zeros_like(m.b_in))
                m.b_out.copy_(b_out if b_out is not None else torch.zeros_like(m.b_out))
        return m

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, block_size={self.block_size}, top_k={self.top_k}, "
                f"activation={self.activation!r}, glu={self.w_up is not None}, bias={self.b_in is not None}, "
                f"strategy={self.strategy!r}")
