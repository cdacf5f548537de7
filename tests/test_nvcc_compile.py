"""Every CUDA source compiles with nvcc for sm_80 and sm_90a, so a broken .cu fails CI without a GPU.

The flags come from setup.py (``nvcc_flags``), the same list the build uses.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_helpers():
    # setup.py only calls setup() under __main__, so importing it just defines the flag helpers.
    spec = importlib.util.spec_from_file_location("_sparsemm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_setup_helpers()
NVCC = SETUP.find_nvcc()
CU_FILES = SETUP.cuda_sources()


def test_cuda_arch_parsing():
    assert SETUP.cuda_archs("80;90a") == ["80", "90a"]
    assert SETUP.cuda_archs("8.0, 9.0a 100") == ["80", "90a", "100"]
    assert SETUP.gencode_flags(["80", "90+PTX"]) == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="SPARSEMM_CUDA_ARCHS"):
        SETUP.cuda_archs("sm_80")


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/**/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90a(source, tmp_path):
    flags = SETUP.nvcc_flags(SETUP.cuda_archs("80;90a"))
    cmd = [NVCC, *flags, "-c", str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0
