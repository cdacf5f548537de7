"""The README's Python examples run (on CPU, scaled down): documentation that cannot rot silently."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# GPU-sized example -> CPU-sized: device, dtype and the large sizes.
SUBSTITUTIONS = [
    ('device="cuda"', 'device="cpu"'),
    (".cuda()", ""),
    (".bfloat16()", ""),
    ("torch.bfloat16", "torch.float32"),
    ("4096", "24"),
    ("2816", "48"),
    ("1024", "32"),
    ("65536", "50"),
    ("n_layers=24", "n_layers=2"),
    ("n_heads=16", "n_heads=4"),
    ("n_kv_heads=4", "n_kv_heads=2"),
]


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run_on_cpu():
    blocks = _examples()
    assert len(blocks) >= 2, "the README should show the functional ops and the MoT modules"
    namespace: dict = {}
    for code in blocks:
        for old, new in SUBSTITUTIONS:
            code = code.replace(old, new)
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["logits"].shape == (4, 24, 50)
    assert namespace["y"].shape == (4, 24, 32)
    assert torch.isfinite(namespace["logits"]).all()


@pytest.mark.parametrize("name", ["make test", "make report"])
def test_readme_names_the_commands(name):
    assert name in README.read_text()
