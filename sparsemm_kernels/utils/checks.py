"""Input validation shared by every public op.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, device or
value) with a message that names the offending argument. Checks that would need the *values* of a device
tensor (ids in range, offsets sorted) read them only for CPU tensors, where reading is free; for CUDA tensors
they are enqueued as asynchronous device assertions (``torch._assert_async``) so that the forward pass never
waits on the host, unless the caller asks for an eager check with ``validate=True``.
"""

from __future__ import annotations

import operator
import os

import torch

INT_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_int_tensor(t, name: str) -> torch.Tensor:
    check_tensor(t, name)
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"`{name}` must be an int32 or int64 tensor, got {t.dtype}")
    return t


def check_float_tensor(t, name: str) -> torch.Tensor:
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    return t


def check_dim(t: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"`{name_b}` is on {b.device} but `{name_a}` is on {a.device}; they must share a device")


def check_same_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"`{name_b}` has dtype {b.dtype} but `{name_a}` has dtype {a.dtype}; they must match")


def check_positive_int(v, name: str) -> int:
    """``v`` as a Python int (NumPy and other integer types accepted via ``operator.index``), ``>= 1``."""
    if isinstance(v, bool):
        raise TypeError(f"`{name}` must be an int, got bool")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {type(v).__name__}") from None
    if v < 1:
        raise ValueError(f"`{name}` must be >= 1, got {v}")
    return v


# More groups than this is a mistake, not a model: offsets alone would be 8 * 2^24 bytes per plan.
MAX_GROUPS = 1 << 24


def check_num_groups(v, name: str = "num_groups") -> int:
    """A group count: a positive int no larger than :data:`MAX_GROUPS` (checked before anything is allocated)."""
    v = check_positive_int(v, name)
    if v > MAX_GROUPS:
        raise ValueError(f"`{name}` must be <= {MAX_GROUPS} (2**24), got {v}")
    return v


# How an op treats the values of its index tensors (ids, offsets, a plan's rows). Every kernel bounds every
# index whatever the mode, so a wrong value never reaches memory outside its tensor.
TRUSTED = "trusted"  # built by this package (group_plan): not checked
EAGER = "eager"  # read on the host, ValueError if wrong (always on CPU; validate=True on CUDA)
ASYNC = "async"  # an asynchronous device assertion (CUDA default): no host sync
OFF = "off"  # validate=False: not checked; outputs are still fully written and read only in-range rows
MODES = (TRUSTED, EAGER, ASYNC, OFF)


def validation_mode(validate: bool | None, device: torch.device) -> str:
    """How value checks run: ``"eager"``, ``"async"`` or ``"off"``.

    CPU tensors are checked eagerly (no device to wait for). CUDA tensors are checked with
    asynchronous device assertions unless ``validate=True`` or ``SPARSEMM_VALIDATE=1``; ``validate=False``
    (or ``SPARSEMM_VALIDATE=0``) skips the checks (for CUDA-graph capture of trusted inputs).
    """
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"`validate` must be True, False or None, got {type(validate).__name__}")
    if validate is None:
        env = os.environ.get("SPARSEMM_VALIDATE", "")
        validate = True if env == "1" else (False if env == "0" else None)
    if device.type != "cuda":
        return EAGER if validate is not False else OFF
    if validate is None:
        return ASYNC
    return EAGER if validate else OFF


def check_ids_values(ids: torch.Tensor, num_groups: int, name: str, mode: str) -> None:
    """Every id must lie in ``[0, num_groups)`` (``mode``: see :data:`MODES`; only eager/async check)."""
    if mode not in (EAGER, ASYNC) or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= num_groups)
    if mode == ASYNC:
        torch._assert_async(~bad.any(), f"`{name}` has ids outside [0, {num_groups})")
        return
    if bool(bad.any()):  # sync-ok: eager mode reads on purpose
        first = int(bad.flatten().to(torch.uint8).argmax())  # sync-ok: eager mode
        raise ValueError(
            f"`{name}` must hold ids in [0, {num_groups}); found {int(ids.flatten()[first])} "  # sync-ok
            f"at flat index {first}"
        )


def check_offsets_values(offsets: torch.Tensor, num_rows: int, name: str, mode: str) -> None:
    """``offsets`` must start at 0, be non-decreasing and end at ``num_rows``."""
    if mode not in (EAGER, ASYNC):
        return
    first, last = offsets[0], offsets[-1]
    steps_ok = (offsets[1:] >= offsets[:-1]).all()
    if mode == ASYNC:
        ok = steps_ok & (first == 0) & (last == num_rows)
        torch._assert_async(ok, f"`{name}` must start at 0, be non-decreasing and end at {num_rows}")
        return
    if int(first) != 0:  # sync-ok: eager mode
        raise ValueError(f"`{name}` must start at 0, got offsets[0]={int(first)}")  # sync-ok
    if not bool(steps_ok):  # sync-ok: eager mode
        raise ValueError(f"`{name}` must be non-decreasing, got {offsets.tolist()}")  # sync-ok
    if int(last) != num_rows:  # sync-ok: eager mode
        raise ValueError(
            f"`{name}` must end at the number of rows ({num_rows}), got offsets[-1]={int(last)}"  # sync-ok
        )


def check_offsets_tensor(offsets, num_groups: int, x: torch.Tensor) -> None:
    """``offsets`` is a 1-D integer tensor of ``num_groups + 1`` entries on ``x``'s device (values: see
    :func:`check_offsets_values`)."""
    check_int_tensor(offsets, "offsets")
    check_same_device("x", x, "offsets", offsets)
    if offsets.dim() != 1 or offsets.shape[0] != num_groups + 1:
        raise ValueError(
            f"`offsets` must be 1-D of length G+1 = {num_groups + 1} (G from `weight`), "
            f"got shape {tuple(offsets.shape)}"
        )


def check_permutation_values(rows: torch.Tensor, name: str, mode: str) -> None:
    """``rows (T,)`` must be a permutation of ``0..T-1`` (every row read and written exactly once)."""
    if mode not in (EAGER, ASYNC) or rows.numel() == 0:
        return
    n = rows.numel()
    ok = (rows.sort().values == torch.arange(n, device=rows.device, dtype=rows.dtype)).all()
    if mode == ASYNC:
        torch._assert_async(ok, f"`{name}` must be a permutation of 0..{n - 1}")
        return
    if not bool(ok):  # sync-ok: eager mode
        bad = rows[(rows < 0) | (rows >= n)]  # sync-ok: eager mode
        detail = f"value {int(bad[0])} out of range" if bad.numel() else "a repeated row"  # sync-ok
        raise ValueError(f"`{name}` must be a permutation of 0..{n - 1}: {detail}")


def sanitized_offsets(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Offsets made a valid partition of ``[0, num_rows)`` without reading them on the host.

    ``b[0] = 0``, ``b[G] = num_rows``, ``b[g] = clamp(offsets[g], 0, num_rows)`` made non-decreasing by a
    running maximum: valid offsets come back unchanged, and any others still give groups that cover every
    row exactly once. This is what the kernels do in registers for ``validate=False``.
    """
    b = offsets.to(torch.int64).clamp(0, num_rows)
    b = torch.cat([b.new_zeros(1), b[1:-1], b.new_full((1,), num_rows)]) if b.numel() > 1 else b.new_zeros(1)
    return torch.cummax(b, 0).values


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums, statistics and softmaxes of ``dtype`` values run in: float32, or float64 for float64 (so a float64
    reference run stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# What torch.autocast casts: floating tensors other than float64 (as its own cast policy does).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device: torch.device, policy: str = "lower") -> torch.dtype | None:
    """The dtype ops on ``device`` should compute in under an enabled ``torch.autocast``, else None.

    ``policy="lower"`` (matmuls, as ``nn.Linear``): the autocast dtype; ``"fp32"`` (norms): float32.
    """
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type) if policy == "lower" else torch.float32


def autocast_to(*tensors, policy: str = "lower"):
    """``tensors`` cast (differentiably) to the autocast dtype of their device when autocast is on; the
    tensors unchanged otherwise. ``None`` entries and non-eligible tensors (float64, ints) pass through."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = autocast_dtype(first.device, policy) if first is not None else None
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors
    )
