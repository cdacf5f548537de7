"""Smoke benchmarks on tiny CPU shapes, so the benchmark scripts cannot rot.

Each CPU provider of ``bench_grouped_gemm`` is validated against the reference and timed once by pytest-benchmark;
then the script itself runs end to end on its quick CPU set. Runs on CPU only (no Triton interpreter).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_smoke.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import bench_grouped_gemm as bench
from benchmarks import harness
from benchmarks.shapes import CPU_QUICK, Shape

CPU = torch.device("cpu")
SHAPE = Shape(96, 32, 48, 3, "80/20")  # tiny: K and N off any tile, unequal groups
CPU_PROVIDERS = [p for p in bench.PROVIDERS if "cpu" in p.devices]


@pytest.mark.parametrize("mode", list(harness.MODES))
@pytest.mark.parametrize("provider", CPU_PROVIDERS, ids=lambda p: p.name)
def test_provider(benchmark, provider, mode):
    """The provider's output (and grads) match the reference, then pytest-benchmark times it."""
    case = bench.Case(SHAPE, CPU, torch.float32, seed=0)
    try:
        fn = provider.make(case)
        errors = bench._validate(fn, case, provider.layout, mode)
    except bench.Skip as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if provider.unsupported_raises:
            pytest.skip(f"{provider.name} raises here: {type(exc).__name__}: {exc}")
        raise
    assert harness.within_tolerance(errors, torch.float32), errors
    x, w = case.leaves[provider.layout]
    if mode == "forward":
        with torch.no_grad():
            benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    else:

        def reset():
            x.grad = w.grad = None

        benchmark.pedantic(lambda: fn().backward(case.dy), setup=reset, rounds=10, warmup_rounds=1)


@pytest.fixture
def _restore_threads(monkeypatch):
    """``main`` sets the CPU thread count; put it back for the tests that follow."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    prev = torch.get_num_threads()
    yield
    harness.set_cpu_threads(prev)


@pytest.mark.usefixtures("_restore_threads")
def test_script_end_to_end(tmp_path):
    """``main`` on the quick CPU set writes a .md and a .json holding a row for every shape, mode and provider."""
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("grouped_gemm-*-fp32-*.md")
    (js,) = tmp_path.glob("grouped_gemm-*-fp32-*.json")
    text = md.read_text()
    assert "measured in this run" in text and "status: complete" in text
    data = json.loads(js.read_text())
    got = {(r["T"], r["G"], r["split"], r["mode"], r["provider"]) for r in data["rows"]}
    want = {(s.T, s.G, s.split, m, p.name) for s in CPU_QUICK for m in harness.MODES for p in CPU_PROVIDERS}
    assert got == want
    for row in data["rows"]:
        assert row["status"] in ("ok", "SKIPPED"), row
        assert row["device"] and row["torch"] and row["timestamp"]
        if row["status"] == "ok":
            assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"] and row["tflops"] > 0
        assert row["provider"] in text


def test_wrong_provider_is_failed_not_timed():
    """A provider whose result is off by 1% is FAILED and never reaches the timer."""
    case = bench.Case(SHAPE, CPU, torch.float32, seed=0)
    good = bench._smk_grouped_mm(None)
    wrong = bench.Provider("wrong", "grouped", lambda c: lambda: good(c)() * 1.01)

    def no_timing(*args, **kwargs):
        raise AssertionError("a FAILED provider must not be timed")

    for mode in harness.MODES:
        row = bench._measure(wrong, case, mode, no_timing)
        assert row["status"] == "FAILED" and "ms_p50" not in row and "not timed" in row["note"], row
