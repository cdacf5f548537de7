"""Input validation shared by every public op.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, device or
value) with a message that names the offending argument. Checks that would need the *values* of a device
tensor (ids in range, offsets sorted) read them only for CPU tensors, where reading is free; for CUDA tensors
they are enqueued as asynchronous device assertions (``torch._assert_async``) so that the forward pass never
waits on the host, unless the caller asks for an eager check with ``validate=True``.
"""

from __future__ import annotations

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
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"`{name}` must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"`{name}` must be >= 1, got {v}")
    return v


def validation_mode(validate: bool | None, device: torch.device) -> str:
    """How value checks run: ``"eager"`` (read values on the host, raise ValueError) or ``"async"``.

    CPU tensors are always checked eagerly (no device to wait for). CUDA tensors are checked with
    asynchronous device assertions unless ``validate=True`` or ``SPARSEMM_VALIDATE=1``; ``validate=False``
    skips the checks entirely (for CUDA-graph capture of trusted inputs).
    """
    if validate is None:
        env = os.environ.get("SPARSEMM_VALIDATE", "")
        validate = True if env == "1" else (False if env == "0" else None)
    if device.type != "cuda":
        return "eager" if validate is not False else "off"
    if validate is None:
        return "async"
    return "eager" if validate else "off"


def check_ids_in_range(ids: torch.Tensor, num_groups: int, name: str, mode: str) -> None:
    """Every id must lie in ``[0, num_groups)``."""
    if mode == "off" or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= num_groups)
    if mode == "async":
        torch._assert_async(~bad.any(), f"`{name}` has ids outside [0, {num_groups})")
        return
    if bool(bad.any()):
        first = int(bad.flatten().to(torch.uint8).argmax())
        raise ValueError(
            f"`{name}` must hold ids in [0, {num_groups}); found {int(ids.flatten()[first])} at flat index {first}"
        )


def check_offsets_values(offsets: torch.Tensor, num_rows: int, name: str, mode: str) -> None:
    """``offsets`` must start at 0, be non-decreasing and end at ``num_rows``."""
    if mode == "off":
        return
    first, last = offsets[0], offsets[-1]
    steps_ok = (offsets[1:] >= offsets[:-1]).all()
    if mode == "async":
        ok = steps_ok & (first == 0) & (last == num_rows)
        torch._assert_async(ok, f"`{name}` must start at 0, be non-decreasing and end at {num_rows}")
        return
    if int(first) != 0:
        raise ValueError(f"`{name}` must start at 0, got offsets[0]={int(first)}")
    if not bool(steps_ok):
        raise ValueError(f"`{name}` must be non-decreasing, got {offsets.tolist()}")
    if int(last) != num_rows:
        raise ValueError(f"`{name}` must end at the number of rows ({num_rows}), got offsets[-1]={int(last)}")
