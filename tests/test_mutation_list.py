"""Every mutation of `make mutate` can still be planted: its text occurs exactly once in its file (a refactor that
moves the code must move the mutation too, or the mutation run stops before testing anything)."""

import pathlib

import pytest

from tests.mutation import MUTATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_mutation_is_plantable(m):
    assert (ROOT / m.file).read_text().count(m.old) == 1, f"{m.name}: its text must occur exactly once in {m.file}"
    for t in m.tests:
        assert (ROOT / t.split("::")[0]).exists(), f"{m.name}: no test file {t}"
