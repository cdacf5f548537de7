"""Every public name has documentation: the package's functions and classes, and the public methods and
properties of its classes and modules (what ``help()`` and the API docs show a user)."""

import inspect

import pytest

import sparsemm_kernels as smk
import sparsemm_kernels.nn as snn

_NOT_CALLABLE = {"__version__", "BACKENDS", "nn"}


def _members(cls):
    """``(name, function)`` for the public methods and properties ``cls`` itself defines."""
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (classmethod, staticmethod)):
            yield name, attr.__func__
        elif isinstance(attr, property):
            yield name, attr.fget
        elif inspect.isfunction(attr):
            yield name, attr


def _public():
    for module, prefix in ((smk, "smk"), (snn, "smk.nn")):
        for name in module.__all__:
            if name in _NOT_CALLABLE:
                continue
            obj = getattr(module, name)
            yield f"{prefix}.{name}", obj
            if inspect.isclass(obj):
                for member, fn in _members(obj):
                    yield f"{prefix}.{name}.{member}", fn


PUBLIC = list(_public())


def test_the_public_api_is_found():
    names = {name for name, _ in PUBLIC}
    assert {"smk.grouped_linear", "smk.nn.MoTBlock", "smk.nn.MoTBlock.forward_sorted", "smk.GroupPlan"} <= names


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_name_has_a_docstring(name, obj):
    assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"
