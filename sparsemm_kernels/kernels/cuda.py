"""Launchers for the extension's CUDA ops: check -> allocate (outputs and scratch, with torch) -> enqueue.

Nothing here synchronises with the host or queries a device at import time. Calls run on torch's current
stream of the tensors' device, so they order correctly with the surrounding torch work and can be captured
in a CUDA graph.
"""

from __future__ import annotations

import torch

from sparsemm_kernels import _ext
from sparsemm_kernels.utils.checks import check_int_tensor, check_positive_int


def _cuda_ext():
    c = _ext.require()
    if not c.has_cuda():
        raise RuntimeError("sparsemm_kernels._C was built without CUDA ops (nvcc was not found at build time)")
    return c


def group_plan_cuda(
    ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of group ids on the GPU (histogram -> scan -> radix sort), without a host sync.

    Args:
        ids: ``(n,)`` int32 | int64 CUDA tensor (any shape is flattened).
        num_groups: ``G`` with ``1 <= G < 2**31``.

    Returns:
        ``sorted_to_orig (n,) int64``, ``counts (G,) int64``, ``offsets (G+1,) int64`` and
        ``invalid_count () int64``, all on ``ids.device``. Rows of group ``g`` are
        ``sorted_to_orig[offsets[g]:offsets[g+1]]`` in increasing original order. An id outside ``[0, G)``
        is sorted and counted as the nearest valid id (``0`` or ``G - 1``), so the plan is always a full
        permutation with ``offsets[G] = n``; ``invalid_count`` says how many there were. Nothing is read back to
        the host: check ``invalid_count`` if the ids are untrusted.
    """
    c = _cuda_ext()
    check_int_tensor(ids, "ids")
    if ids.device.type != "cuda":
        raise ValueError(f"`ids` must be a CUDA tensor for the cuda group_plan, got device {ids.device}")
    check_positive_int(num_groups, "num_groups")
    if num_groups >= 2**31:
        raise ValueError(f"`num_groups` must be < 2**31, got {num_groups}")
    ids = ids.reshape(-1).contiguous()
    n = ids.numel()
    code = _ext.dtype_code(ids.dtype)
    device = ids.device
    # The extension has its own (static) CUDA runtime; making the device current here is what points it at
    # the right GPU, and the cub size query below must run with that device current too.
    with torch.cuda.device(device):
        workspace_bytes = c.group_plan_cuda_workspace_bytes(n, num_groups, code)
        sorted_to_orig = torch.empty(n, dtype=torch.int64, device=device)
        counts = torch.empty(num_groups, dtype=torch.int64, device=device)
        offsets = torch.empty(num_groups + 1, dtype=torch.int64, device=device)
        invalid_count = torch.empty((), dtype=torch.int64, device=device)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        c.group_plan_cuda(
            ids.data_ptr(), code, n, num_groups,
            sorted_to_orig.data_ptr(), counts.data_ptr(), offsets.data_ptr(), invalid_count.data_ptr(),
            workspace.data_ptr(), workspace_bytes, stream,
        )  # fmt: skip
    return sorted_to_orig, counts, offsets, invalid_count
