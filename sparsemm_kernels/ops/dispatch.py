"""How the package's ops are defined and called: a ``torch.library`` custom op, plus a lean eager path.

Every op is registered with ``torch.library.custom_op`` (``sparsemm::<name>``) with a fake implementation and,
where it has one, its autograd formula: that is what ``torch.compile``, ``opcheck``, fake tensors and dispatch
modes see. Calling a custom op eagerly, though, goes through the dispatcher and ``torch.library``'s generic
autograd wrapper (argument binding, default filling), tens of microseconds per call, which a layer with a
dozen ops pays every step. So :class:`Op` calls the same implementation, with the same setup and backward
functions, through one plain ``torch.autograd.Function`` when nothing needs the dispatcher: outside
``torch.compile``, on plain tensors, with no dispatch mode active. Both paths run the same code, and the tests
exercise both (the op tests eagerly, ``opcheck`` and the compile tests through the dispatcher).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_TENSOR_LIST = ("list[torch.Tensor]", "List[torch.Tensor]", "list[Tensor]", "List[Tensor]")
_ONE_TENSOR = ("torch.Tensor", "torch.Tensor|None", "Optional[torch.Tensor]", "Tensor")

# Tensor types the eager path takes: plain tensors and parameters (a Parameter is a plain tensor to autograd).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _EagerAutograd(torch.autograd.Function):
    """Runs ``op.impl`` with ``op.setup`` / ``op.backward`` as its autograd formula (first argument: the Op, then
    the layout of any tensor-list arguments, then the op's arguments with those lists spread out: autograd sees
    only tensors passed directly)."""

    @staticmethod
    def forward(ctx, op, layout, *flat):
        args = flat if layout is None else _regroup(flat, layout)
        out = op.impl(*args)
        op.setup(ctx, args, out)
        ctx.op, ctx.layout, ctx.list_out = op, layout, isinstance(out, list)
        return tuple(out) if ctx.list_out else out

    @staticmethod
    def backward(ctx, *grads):
        # The formula sees the op's own inputs, as under the dispatcher: no Op and layout arguments, a list
        # argument's flags (and gradient) as a list, a list output's gradients as one list.
        full = ctx.needs_input_grad
        ctx.needs_input_grad = full[2:] if ctx.layout is None else tuple(_regroup(full[2:], ctx.layout))
        try:
            result = ctx.op.backward(ctx, list(grads)) if ctx.list_out else ctx.op.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = full
        result = result if isinstance(result, tuple) else (result,)
        return (None, None, *(result if ctx.layout is None else _spread(result, ctx.layout)))


def _spread(args, layout) -> list:
    """``args`` with the tensor-list arguments (``layout[i]`` = their length, else None) spread out in place."""
    flat = []
    for a, n in zip(args, layout):
        if n is None:
            flat.append(a)
        else:
            flat.extend(a if a is not None else [None] * n)
    return flat


def _regroup(flat, layout) -> list:
    """The inverse of :func:`_spread`."""
    args, i = [], 0
    for n in layout:
        if n is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + n]))
            i += n
    return args


_AUTOCAST_DEVICES = ("cuda", "cpu")


def _without_autocast(impl: Callable) -> Callable:
    """``impl`` run with autocast off. A custom op's implementation sees the caller's autocast state (the
    dispatcher has an autocast fallthrough for it, and the eager path is an autograd Function), so a matmul inside
    it would silently drop to 16 bits; the ops cast their inputs to the autocast dtype themselves, before the op."""

    @functools.wraps(impl)
    def run(*args):
        active = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not active:
            return impl(*args)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return impl(*args)

    return run


def _hint_text(hint) -> str:
    """A parameter annotation as text, whether written as a string (``from __future__ import annotations``) or not."""
    text = "torch.Tensor" if hint is torch.Tensor else str(hint)
    return text.replace(" ", "").replace("typing.", "")


class Op:
    """A ``sparsemm::`` custom op (``self.custom_op``) that is called like a function.

    Args:
        name: ``"sparsemm::<name>"``.
        impl: the implementation, with the type annotations ``torch.library.custom_op`` reads.
        fake: the fake (meta) implementation.
        setup, backward: the autograd formula (``register_autograd``'s ``setup_context`` and ``backward``), or
            None for an op without gradients.
    """

    def __init__(
        self,
        name: str,
        impl: Callable,
        fake: Callable,
        setup: Callable | None = None,
        backward: Callable | None = None,
    ) -> None:
        impl = _without_autocast(impl)
        self.impl, self.setup, self.backward = impl, setup, backward
        # Tensor-list parameters (spread out for autograd on the eager path) and a tensor-list output.
        hints = {k: _hint_text(v) for k, v in impl.__annotations__.items()}
        names = list(inspect.signature(impl).parameters)
        self._tensor_lists = frozenset(i for i, n in enumerate(names) if hints.get(n, "") in _TENSOR_LIST)
        for n, h in hints.items():  # a tensor container the eager path would not spread: autograd would miss it
            if n != "return" and "Tensor" in h and h not in _TENSOR_LIST + _ONE_TENSOR:
                raise TypeError(f"{name}: annotate `{n}` as a tensor or list[torch.Tensor], got {h}")
        self._list_out = hints.get("return", "") in _TENSOR_LIST
        self.custom_op = torch.library.custom_op(name, impl, mutates_args=())
        self.custom_op.register_fake(fake)
        if backward is not None:
            self.custom_op.register_autograd(backward, setup_context=setup)
        self.__doc__ = impl.__doc__

    def __call__(self, *args):
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return self.custom_op(*args)
        layout, flat = None, args
        if self._tensor_lists:
            layout = tuple(len(a) if i in self._tensor_lists else None for i, a in enumerate(args))
            flat = _spread(args, layout)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(type(t) not in _PLAIN for t in tensors):  # fake, functional or another subclass: the dispatcher
            return self.custom_op(*args)
        if not torch.is_grad_enabled():  # a backward formula's inner ops land here: no context to enter
            return self.impl(*args)
        if self.backward is not None and any(t.requires_grad for t in tensors):
            out = _EagerAutograd.apply(self, layout, *flat)
            return list(out) if self._list_out else out
        with torch.no_grad():  # as under the dispatcher: an op's implementation is never recorded by autograd
            return self.impl(*args)
