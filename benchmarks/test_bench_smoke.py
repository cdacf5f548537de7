"""Smoke benchmarks on tiny CPU shapes, so the benchmark scripts cannot rot.

Each CPU provider of ``bench_grouped_gemm`` and of ``bench_mot_block`` is validated against the reference and timed
once by pytest-benchmark; then each script runs end to end on its CPU set. Runs on CPU only (the MoT modules pick
the torch backend on CPU tensors, with or without ``TRITON_INTERPRET=1``).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_smoke.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import bench_grouped_gemm as bench
from benchmarks import bench_mot_block as mot_bench
from benchmarks import harness
from benchmarks.shapes import (
    CPU_QUICK,
    MOT_BLOCK_CONFIGS,
    MOT_SPLITS,
    Shape,
    interleaved_modality_ids,
    modality_layout_ids,
    mot_block_set,
    swiglu_hidden,
)

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


# ---------------------------------------------------------------------------------------------------------------
# bench_mot_block

TINY = MOT_BLOCK_CONFIGS["tiny"]


def test_mot_block_configs_and_layout():
    """The published hidden widths, and interleaved ids with the exact image fraction per sequence, alternating
    text runs and image spans, starting with text, the same for the same seed."""
    assert (MOT_BLOCK_CONFIGS["443M"].hidden, MOT_BLOCK_CONFIGS["1.5B"].hidden) == (2816, 5632)
    assert swiglu_hidden(1024) == 2816 and swiglu_hidden(2048) == 5632
    assert mot_block_set("cuda", True) == [(MOT_BLOCK_CONFIGS["443M"], "80/20")]
    assert len(mot_block_set("cuda", False)) == 4 and mot_block_set("cpu", False)[0] == (TINY, "80/20")
    for split, frac in MOT_SPLITS.items():
        for seq, span, spans in ((4096, 1024, {0.5: 2, 0.2: 1}[frac]), (TINY.seq, TINY.image_span, None)):
            ids = interleaved_modality_ids(3, seq, frac, span, seed=1)
            assert ids.shape == (3, seq) and ids.dtype == torch.int64, split
            assert torch.equal(ids, interleaved_modality_ids(3, seq, frac, span, seed=1))
            assert (ids.sum(1) == round(frac * seq)).all()
            assert (ids[:, 0] == 0).all()
            starts = ((ids[:, 1:] == 1) & (ids[:, :-1] == 0)).sum(1)  # image spans per sequence
            assert (starts >= 1).all() and (spans is None or (starts == spans).all())
            assert not torch.equal(ids[0], ids[1])  # each sequence has its own cuts
    assert interleaved_modality_ids(1, 8, 0.0, 4, 0).sum() == 0 and interleaved_modality_ids(1, 8, 1.0, 4, 0).all()


@pytest.mark.parametrize("mode", list(harness.MODES))
@pytest.mark.parametrize("provider", mot_bench.PROVIDERS, ids=lambda p: p.name)
def test_mot_provider(benchmark, provider, mode):
    """The provider's output (and dx, parameter grads) match the fp64 mask-loop reference; pytest-benchmark times it."""
    case = mot_bench.Case(TINY, "80/20", 1, CPU, torch.float32, seed=0)
    fn = provider.make(case)
    errors, extra = mot_bench._validate(fn, case, provider, mode)
    assert harness.within_tolerance(errors, torch.float32), errors
    if mode == "forward":
        with torch.no_grad():
            benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    else:
        assert extra["dparam_worst"]["rel_err"] <= harness.TOLERANCE[torch.float32], extra
        leaves = case.leaves(provider.block)

        def reset():
            for t in leaves:
                t.grad = None

        benchmark.pedantic(lambda: fn().backward(case.dy), setup=reset, rounds=5, warmup_rounds=1)


@pytest.mark.usefixtures("_restore_threads")
def test_mot_script_end_to_end(tmp_path):
    """``main`` on the CPU preset writes a .md and a .json with a row per split, mode and provider, all ok."""
    assert mot_bench.main(["--device", "cpu", "--batch", "1", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("mot_block-*-fp32-*.md")
    (js,) = tmp_path.glob("mot_block-*-fp32-*.json")
    text = md.read_text()
    assert "measured in this run" in text and "status: complete" in text and "8*dim^2 + 6*dim*hidden" in text
    data = json.loads(js.read_text())
    got = {(r["config"], r["split"], r["mode"], r["provider"]) for r in data["rows"]}
    want = {("tiny", s, m, p.name) for s in MOT_SPLITS for m in harness.MODES for p in mot_bench.PROVIDERS}
    assert got == want
    assert {r["layout"] for r in data["rows"]} == {"spans"}
    for row in data["rows"]:
        assert row["status"] == "ok", row
        assert row["device"] and row["torch"] and row["timestamp"] and row["batch"] == 1
        assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"] and row["tflops"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_mem_gib"] is None  # CPU: n/a
        assert (row["mask_loop_over_mot"] is not None) == (row["provider"] == "mot")
        if row["provider"] == "plain":  # the baseline of every ratio
            assert row["time_vs_dense"] == 1.0 and row["baseline"] == "plain"
        assert row["provider"] in text


@pytest.mark.usefixtures("_restore_threads")
def test_mot_script_layouts_and_side_by_side_timing(tmp_path):
    """--layouts runs each layout; on the CPU the providers are timed in alternating runs."""
    args = ["--device", "cpu", "--batch", "1", "--quick", "--modes", "forward", "--providers", "plain,mot",
            "--layouts", "spans,random", "--out", str(tmp_path)]
    assert mot_bench.main(args) == 0
    (js,) = tmp_path.glob("mot_block-*-fp32-*.json")
    rows = json.loads(js.read_text())["rows"]
    want = {(t, p) for t in ("spans", "random") for p in ("plain", "mot")}
    assert {(r["layout"], r["provider"]) for r in rows} == want
    assert all(r["timing"] == "perf_counter, alternating" and r["status"] == "ok" for r in rows)
    for r in rows:  # per-round samples, and the ratio to plain paired by round
        base = next(b for b in rows if b["provider"] == "plain" and b["layout"] == r["layout"])
        assert len(r["samples_ms"]) == len(base["samples_ms"]) >= 7
        ratios = sorted(a / b for a, b in zip(r["samples_ms"], base["samples_ms"]))
        assert r["paired_p20"] <= r["paired_vs_dense"] <= r["paired_p80"]
        assert ratios[0] <= r["paired_vs_dense"] <= ratios[-1]
        if r["provider"] == "plain":
            assert r["paired_vs_dense"] == 1.0
    assert mot_bench.main(["--device", "cpu", "--layouts", "diagonal", "--out", str(tmp_path)]) == 2


def test_goal_table_judges_the_cpu_goals_on_the_paired_ratio():
    row = dict(config="cpu256", split="50/50", layout="random", mode="forward+backward", provider="mot",
               time_vs_dense=1.12, paired_vs_dense=1.08, mask_loop_over_mot=1.5)
    dense = dict(row, provider="dense", time_vs_dense=1.0, paired_vs_dense=1.03, mask_loop_over_mot=None)
    other = dict(row, config="tiny")
    lines = mot_bench.goal_table([row, dense, other], "cpu", "fp32").splitlines()[2:]
    assert lines[0].endswith("| <= 1.1 | yes |") and "1.120 (1.080)" in lines[0]  # paired 1.08 <= 1.10
    assert lines[1].endswith("| <= 1.02 | no |")
    assert "n/a (CPU goals are set for" in lines[2]
    gpu = mot_bench.goal_table([row], "cuda", "bf16").splitlines()[2]
    assert gpu.endswith("| no |")  # the GPU goal: 1.12 > 1.05
    assert len(mot_bench.goal_table([dense], "cuda", "bf16").splitlines()) == 2  # GPU: mot rows only


def test_random_layout_keeps_the_image_fraction():
    ids = modality_layout_ids("random", 3, 64, 0.25, 16, seed=2)
    assert ids.shape == (3, 64) and (ids.sum(1) == 16).all()
    assert torch.equal(ids, modality_layout_ids("random", 3, 64, 0.25, 16, seed=2))
    assert torch.equal(modality_layout_ids("spans", 2, 64, 0.5, 16, 1), interleaved_modality_ids(2, 64, 0.5, 16, 1))
    with pytest.raises(ValueError, match="layout"):
        modality_layout_ids("diagonal", 1, 8, 0.5, 4, 0)


def test_mot_wrong_provider_is_failed_not_timed():
    """A provider whose result is off by 1% is FAILED and never reaches the timer."""
    case = mot_bench.Case(TINY, "50/50", 1, CPU, torch.float32, seed=0)
    wrong = mot_bench.Provider("wrong", "mot", lambda c: lambda: mot_bench._mot(c)() * 1.01)

    def no_timing(*args, **kwargs):
        raise AssertionError("a FAILED provider must not be timed")

    for mode in harness.MODES:
        row = mot_bench._measure(wrong, case, mode, no_timing)
        assert row["status"] == "FAILED" and "ms_p50" not in row and "not timed" in row["note"], row


def test_trust_note_flags_spread_and_load():
    row = {"ms_p20": 9.8, "ms_p50": 10.0, "ms_p80": 10.4, "load_avg": 1.0, "cores": 2}
    assert harness.trust_note(row) == ""
    assert "spread 30%" in harness.trust_note({**row, "ms_p80": 12.8})
    assert "load average 5.0 > 2 cores" in harness.trust_note({**row, "load_avg": 5.0})
    assert harness.make_row({}, op="x")["cores"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# bench_moma_ffn
# ---------------------------------------------------------------------------------------------------------------


def test_moma_ffn_loop_matches_the_layers_in_float64():
    from benchmarks.bench_moma_ffn import _ids, loop_forward
    from sparsemm_kernels.nn import ExpertChoiceMoE, MoMaFeedForward

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    ids = _ids(2, 16, 4, "cpu")
    for m in (ExpertChoiceMoE(8, 12, 4, dtype=torch.float64), MoMaFeedForward(8, 12, (2, 3), dtype=torch.float64)):
        got = m(x) if isinstance(m, ExpertChoiceMoE) else m(x, ids)
        torch.testing.assert_close(got, loop_forward(m, x, ids), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# bench_mod
# ---------------------------------------------------------------------------------------------------------------


def test_plain_mod_matches_the_layer_in_float64():
    from benchmarks.bench_mod import plain_mod
    from sparsemm_kernels.nn import MixtureOfDepths, MoTBlock

    torch.manual_seed(0)
    m = MixtureOfDepths(MoTBlock(16, 2, 24, 2), 16, capacity=0.25).double()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    ids = torch.randint(0, 2, (2, 16))
    torch.testing.assert_close(m(x, ids), plain_mod(m, x, ids), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# bench_token_choice
# ---------------------------------------------------------------------------------------------------------------


def test_token_choice_baselines_match_the_layer_in_float64():
    from benchmarks.bench_token_choice import grouped_mm_forward, loop_forward
    from sparsemm_kernels.nn import TokenChoiceMoE

    torch.manual_seed(0)
    m = TokenChoiceMoE(16, 24, 6, top_k=3).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(loop_forward(m, x), m(x), rtol=1e-12, atol=1e-12)
    if hasattr(torch, "_grouped_mm"):  # float64 is not a _grouped_mm dtype: check it in float32
        m32, x32 = m.float(), x.float()
        torch.testing.assert_close(grouped_mm_forward(m32, x32), m32(x32), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bench_avgk
# ---------------------------------------------------------------------------------------------------------------


def test_avgk_gather_matches_the_op_in_float64():
    from benchmarks.bench_avgk import gather_ffn
    from sparsemm_kernels.ops.avgk import avgk_ffn

    torch.manual_seed(0)
    x, w_in, w_out = (torch.randn(9, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64),
                      torch.randn(8, 32, dtype=torch.float64))
    torch.testing.assert_close(gather_ffn(x, w_in, w_out, 4, 3), avgk_ffn(x, w_in, w_out, 4, 3), rtol=1e-12,
                               atol=1e-12)


def test_avgk_without_the_gather_implementation_validates_the_strategies_against_each_other(monkeypatch):
    """Past GATHER_MAX_ELEMENTS (a config the gather implementation would not fit) it is left out, and each strategy
    is checked against the other (a wrong one would show there)."""
    import argparse

    import benchmarks.bench_avgk as bench

    monkeypatch.setattr(bench, "GATHER_MAX_ELEMENTS", 0)
    case = bench._build("cpu-xover-t4", torch.device("cpu"), torch.float32, argparse.Namespace(quick=True))
    assert not any(p.startswith("gather_") for p in case.providers)
    assert set(case.checked) == {"grouped_g16", "gathered_g16"} and 0 < case.checked["grouped_g16"] < 1e-4
    real = bench.avgk_ffn

    def doubled_when_gathered(*args, strategy, **kwargs):  # a wrong "gathered" strategy
        return real(*args, strategy=strategy, **kwargs) * (2.0 if strategy == "gathered" else 1.0)

    monkeypatch.setattr(bench, "avgk_ffn", doubled_when_gathered)
    broken = bench._build("cpu-xover-t4", torch.device("cpu"), torch.float32, argparse.Namespace(quick=True))
    assert broken.checked["gathered_g16"] > 0.1


# ---------------------------------------------------------------------------------------------------------------
# The layer benchmarks (benchmarks/layer_bench.py): each script validates, times and writes every provider
# ---------------------------------------------------------------------------------------------------------------

LAYER_SCRIPTS = {  # script -> (providers of its CPU --quick run, the baseline: the one provider not validated)
    "bench_moma_ffn": ({"dense", "moe8x", "moma1t1i", "moma4t4i", "moe8x_loop", "moma1t1i_loop", "moma4t4i_loop"},
                       "dense"),
    "bench_mod": ({"full", "mod12", "mod25", "mod12_plain", "mod25_plain"}, "full"),
    "bench_token_choice": ({"ours", "routing", "grouped_mm", "loop"}, None),
    "bench_avgk": ({"dense", "grouped_g16", "gathered_g16", "gather_g16"}, "dense"),
}


@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("script", list(LAYER_SCRIPTS))
def test_layer_script_validates_and_times_every_provider(script, tmp_path):
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    providers, baseline = LAYER_SCRIPTS[script]
    if script == "bench_token_choice" and not hasattr(torch, "_grouped_mm"):
        providers = providers - {"grouped_mm"}
    args = ["--device", "cpu", "--quick", "--modes", "full", "--cpu-budget", "0.2", "--out", str(tmp_path)]
    assert module.main(args) == 0
    (js,) = tmp_path.glob(f"{module.OP}-*-fp32-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert {r["provider"] for r in rows} == providers
    (md,) = tmp_path.glob(f"{module.OP}-*-fp32-*.md")
    assert md.read_text().count("| ok |") == len(rows)
    for r in rows:
        assert r["status"] == "ok" and r["ms_p50"] > 0 and r["x_base"] > 0, r
        if r["provider"] not in (baseline, "routing", "loop"):  # validated (float32) before it is timed
            assert r["validation_rel_err"] <= 1e-4, r
    assert module.main(["--device", "cpu", "--configs", "9B", "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Failures, exit status, time budget, git commit (what a one-shot GPU run relies on)
# ---------------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for the kill of a run's ``timeout``: nothing in the benchmarks may catch it."""


def _token_choice_args(tmp_path, configs="cpu-E8-top2,cpu-E64-top8"):
    return ["--device", "cpu", "--quick", "--configs", configs, "--cpu-budget", "0.05", "--out", str(tmp_path)]


@pytest.mark.usefixtures("_restore_threads")
def test_layer_failures_are_failed_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    """A config whose build raises (out of memory) is one FAILED row per mode, a provider that raises while timed
    is FAILED, the others are timed, the files are written and complete, and the exit status is 3."""
    import benchmarks.bench_token_choice as tc

    real_build = tc._build
    freed = []

    def build(name, device, dtype, args):
        if name == "cpu-E8-top2":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore detail")
        case = real_build(name, device, dtype, args)
        case.providers["loop"] = lambda t: (_ for _ in ()).throw(RuntimeError("triton compile error\nline 2"))
        return case

    monkeypatch.setattr(tc, "_build", build)
    monkeypatch.setattr(harness, "free_device_memory", lambda device, real=harness.free_device_memory:
                        (freed.append(device), real(device)))
    assert tc.main(_token_choice_args(tmp_path)) == harness.EXIT_FAILED == 3
    (js,) = tmp_path.glob("token_choice-*-fp32-*.json")
    data = json.loads(js.read_text())
    assert data["complete"] is True
    rows = {(r["config"], r["mode"], r["provider"]): r for r in data["rows"]}
    for mode in harness.MODES:
        setup = rows[("cpu-E8-top2", mode, "(setup)")]
        assert setup["status"] == "FAILED"
        assert setup["note"] == "setup raised OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"
        loop = rows[("cpu-E64-top8", mode, "loop")]
        assert loop["status"] == "FAILED" and loop["note"] == "raised RuntimeError: triton compile error: not timed"
        assert "ms_p50" not in loop
        assert rows[("cpu-E64-top8", mode, "ours")]["status"] == "ok"
    assert freed  # the memory a failure held is handed back before the run goes on
    (md,) = tmp_path.glob("token_choice-*-fp32-*.md")
    text = md.read_text()
    assert "status: complete" in text and "| FAILED | setup raised OutOfMemoryError" in text


@pytest.mark.usefixtures("_restore_threads")
def test_layer_results_are_written_after_every_config(tmp_path, monkeypatch):
    """Killed during its second config, a run leaves the first config's rows, marked PARTIAL."""
    import benchmarks.bench_token_choice as tc

    real_build = tc._build

    def build(name, *args):
        if name == "cpu-E64-top8":
            raise Killed
        return real_build(name, *args)

    monkeypatch.setattr(tc, "_build", build)
    with pytest.raises(Killed):
        tc.main(_token_choice_args(tmp_path) + ["--modes", "forward"])
    (js,) = tmp_path.glob("token_choice-*-fp32-*.json")
    data = json.loads(js.read_text())
    assert data["complete"] is False
    assert {r["config"] for r in data["rows"]} == {"cpu-E8-top2"} and all(r["status"] == "ok" for r in data["rows"])
    (md,) = tmp_path.glob("token_choice-*-fp32-*.md")
    assert "status: PARTIAL" in md.read_text()


@pytest.mark.usefixtures("_restore_threads")
def test_token_choice_leaves_out_a_grouped_mm_that_raises(tmp_path, monkeypatch):
    """torch._grouped_mm raising in the float32 validation drops that provider with a SKIPPED row, not the run."""
    import benchmarks.bench_token_choice as tc

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")

    def raising(m, x):
        raise RuntimeError("grouped gemm is not supported for float32")

    monkeypatch.setattr(tc, "grouped_mm_forward", raising)
    assert tc.main(_token_choice_args(tmp_path, "cpu-E8-top2") + ["--modes", "forward"]) == 0
    (js,) = tmp_path.glob("token_choice-*-fp32-*.json")
    rows = {r["provider"]: r for r in json.loads(js.read_text())["rows"]}
    assert rows["grouped_mm"]["status"] == "SKIPPED"
    assert "RuntimeError: grouped gemm is not supported for float32" in rows["grouped_mm"]["note"]
    assert {p: r["status"] for p, r in rows.items() if p != "grouped_mm"} == {"ours": "ok", "routing": "ok",
                                                                              "loop": "ok"}


def test_moma_loop_scores_every_token_like_the_layer(monkeypatch):
    """The loop's routers see all tokens at once through the layer's ``router_logits``, as the layer's do (the same
    GEMM, so the same scores bit for bit); in bf16 too, where the scores are float32 and the gates cast back."""
    import benchmarks.bench_moma_ffn as moma
    from sparsemm_kernels.nn import MoMaFeedForward

    real, seen = moma.router_logits, []

    def recording(router, x):
        seen.append(x.shape[0])
        return real(router, x)

    monkeypatch.setattr(moma, "router_logits", recording)
    ids = moma._ids(2, 16, 4, "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        m = MoMaFeedForward(8, 12, (2, 3), dtype=dtype)
        x = torch.randn(2, 16, 8, dtype=dtype)
        assert moma.loop_forward(m, x, ids).dtype == dtype
        assert seen == [32, 32]


def test_grouped_gemm_timing_that_raises_is_a_failed_row():
    """Out of memory while timing (after validation passed) is a FAILED row, not the end of the run."""
    case = bench.Case(SHAPE, CPU, torch.float32, seed=0)
    provider = next(p for p in bench.PROVIDERS if p.name == "smk_grouped_mm")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for mode in harness.MODES:
        row = bench._measure(provider, case, mode, oom)
        assert row["status"] == "FAILED" and "ms_p50" not in row, row
        assert row["note"] == "raised OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert row["rel_err"]["out"] < 1e-4  # it was validated first
        x, w = case.leaves["grouped"]
        assert x.grad is None and w.grad is None


@pytest.mark.usefixtures("_restore_threads")
def test_grouped_gemm_exit_status_3_when_a_provider_failed(tmp_path, monkeypatch):
    """A wrong provider: the run completes, its files are written, and the exit status is 3 (1 is left to
    crashes)."""
    good = bench._smk_grouped_mm(None)
    wrong = bench.Provider("wrong", "grouped", lambda c: lambda: good(c)() * 1.01)
    monkeypatch.setattr(bench, "PROVIDERS", [*bench.PROVIDERS, wrong])
    args = ["--device", "cpu", "--quick", "--modes", "forward", "--providers", "dense_mm,wrong", "--out",
            str(tmp_path)]
    assert bench.main(args) == 3
    (js,) = tmp_path.glob("grouped_gemm-*-fp32-*.json")
    data = json.loads(js.read_text())
    assert data["complete"] and {r["status"] for r in data["rows"] if r["provider"] == "wrong"} == {"FAILED"}
    assert bench.main(["--device", "cpu", "--providers", "nope", "--out", str(tmp_path)]) == 2


@pytest.mark.usefixtures("_restore_threads")
def test_mot_block_exit_status_3_when_a_provider_failed(tmp_path, monkeypatch):
    wrong = mot_bench.Provider("wrong", "mot", lambda c: lambda: mot_bench._mot(c)() * 1.01)
    monkeypatch.setattr(mot_bench, "PROVIDERS", [*mot_bench.PROVIDERS, wrong])
    args = ["--device", "cpu", "--batch", "1", "--quick", "--modes", "forward", "--providers", "plain,wrong",
            "--cpu-budget", "0.05", "--out", str(tmp_path)]
    assert mot_bench.main(args) == 3
    (js,) = tmp_path.glob("mot_block-*-fp32-*.json")
    assert {r["provider"]: r["status"] for r in json.loads(js.read_text())["rows"]} == {"plain": "ok",
                                                                                        "wrong": "FAILED"}


def test_budget_rule_counts_the_longest_case_so_far(monkeypatch, capsys):
    """A case starts only if, were it as long as the longest so far, it would end within the budget."""
    assert harness.case_fits(None, 1e9, 1e9)
    assert harness.case_fits(100, 99, 0)  # nothing ran yet: the first case starts while time is left
    assert not harness.case_fits(100, 101, 0)
    assert harness.case_fits(100, 70, 30) and not harness.case_fits(100, 71, 30)
    now = [0.0]
    monkeypatch.setattr(harness.time, "monotonic", lambda: now[0])
    budget = harness.CaseBudget(100, start=-5.0)  # 5 s of start-up (imports, CUDA) already spent
    now[0] = 0.0
    assert budget.try_start("a")
    now[0] = 40.0  # case a took 40 s
    budget.done()
    assert budget.longest == 40.0 and budget.elapsed() == 45.0
    assert budget.try_start("b")  # 45 + 40 <= 100
    now[0] = 50.0  # case b took 10 s: the longest stays 40
    budget.done()
    now[0] = 56.0
    assert not budget.try_start("c")  # 61 + 40 > 100: c would run past the kill
    assert "stopping before c" in capsys.readouterr().out


def test_budget_counts_from_the_process_start():
    assert harness.CaseBudget(1.0).start == harness.PROCESS_START <= __import__("time").monotonic()
    assert harness._process_age() >= 0.0


def test_git_commit_from_the_environment_first(monkeypatch):
    """A copied tree has no .git: SPARSEMM_GIT_COMMIT / SPARSEMM_GIT_DIRTY name the commit measured."""
    monkeypatch.setattr(harness, "_git", lambda *args: None)  # as on the GPU machine
    monkeypatch.delenv("SPARSEMM_GIT_COMMIT", raising=False)
    monkeypatch.delenv("SPARSEMM_GIT_DIRTY", raising=False)
    assert harness.git_state() == (None, None)
    monkeypatch.setenv("SPARSEMM_GIT_COMMIT", "0123abc")
    assert harness.git_state() == ("0123abc", None)
    for text, dirty in (("1", True), ("true", True), ("0", False), ("no", False)):
        monkeypatch.setenv("SPARSEMM_GIT_DIRTY", text)
        assert harness.git_state() == ("0123abc", dirty)
    harness._collect_env.cache_clear()
    try:
        row = harness.make_row(harness.collect_env(CPU), op="x")
        assert row["git_commit"] == "0123abc" and row["git_dirty"] is False
    finally:
        harness._collect_env.cache_clear()
    monkeypatch.setattr(harness, "_git", lambda *args: "fedcba9" if args[0] == "rev-parse" else " M file.py")
    monkeypatch.delenv("SPARSEMM_GIT_COMMIT")
    monkeypatch.delenv("SPARSEMM_GIT_DIRTY")
    assert harness.git_state() == ("fedcba9", True)  # no variables: git says
