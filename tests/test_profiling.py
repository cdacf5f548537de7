"""The profiling harness (``python -m profiling``): end-to-end on the tiny CPU preset, FLOP formulas per registered
configuration, NVML-less telemetry, device and configuration errors, and the pieces in between.

Nothing here needs a GPU or NVML; no timing is asserted (speed is shown by the report, not tested).
"""

import json
import math
import re
import sys
import types

import pytest
import torch

from profiling import nvml
from profiling import run as run_mod
from profiling.__main__ import main
from profiling.breakdown import (
    ATTENTION,
    EMBED_HEAD_LOSS,
    FFN,
    GEMM_UNSPLIT,
    HOST,
    MASKS,
    NORMS,
    PROJ,
    categorize,
)
from profiling.flops import flop_count, param_count
from profiling.models import ReferenceMoTTransformer, build_transformer, modality_ids
from profiling.registry import (
    FAMILIES,
    PRESETS,
    REGISTRY,
    Family,
    ModelConfig,
    UnknownConfigError,
    default_preset,
    get_config,
    preset_reason,
    register,
    register_family,
    resolve,
    swiglu_hidden,
    with_mix,
)
from profiling.report import OVERHEAD_BOUND, PLOTS, SECTIONS, host_share
from profiling.run import Settings, largest_fitting, resolve_batches, resolve_device

# ----------------------------------------------------------------------------------------------------------------
# End to end: the CPU default run (what `make report` does without a GPU), quick
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One quick run of the default CLI with torch seeing no GPU: the tiny preset, on the CPU."""
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        rc = main(["--quick", "--no-progress", "--out", str(out)])
    return rc, out


def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^(## .*)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]


def test_tiny_preset_runs_end_to_end(cpu_report):
    rc, out = cpu_report
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert data["complete"] and data["environment"]["device_type"] == "cpu"
    assert [r["name"] for r in data["results"]] == PRESETS["tiny"]
    assert data["settings"]["preset"] == "tiny" and "no GPU found" in data["settings"]["selection"]
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["timing"]["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] > 0
        assert r["peak_mem_gib"] > 0
        assert r["breakdown"]["categories"] and r["breakdown"]["attributed_ms"] > 0
        if r["family"] != "mot_reference":  # module ranges reached (the sorted stream calls modules, not methods)
            cats = r["breakdown"]["categories"]
            assert all(cats.get(c, {}).get("ms", 0) > 0 for c in (ATTENTION, PROJ, FFN, NORMS)), cats
            assert GEMM_UNSPLIT not in cats, cats
        assert r["telemetry"]["energy_j_per_step"] == "n/a"
        # one group, timed together
        assert r["timing_order"] == f"alternating with {len(PRESETS['tiny']) - 1} other configuration(s)"
    tables = data["tables"]
    assert {t["name"] for t in tables["relative_to_dense"]} == set(PRESETS["tiny"]) - {"dense-tiny"}
    assert {t["name"] for t in tables["mot_projection"]} == {"mot2-tiny", "mot2-tiny-ref"}
    assert [(t["name"], t["reference"]) for t in tables["kernels_vs_reference"]] == [("mot2-tiny", "mot2-tiny-ref")]
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_reports_host_share_and_marks_overhead_bound_ratios(cpu_report):
    _, out = cpu_report
    data = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in data["results"]}
    for t in data["tables"]["relative_to_dense"]:
        for key, name in (("host_share", t["name"]), ("baseline_host_share", t["baseline"])):
            bd = rows[name]["breakdown"]
            assert t[key] == pytest.approx(bd["categories"][HOST]["ms"] / bd["attributed_ms"])
            assert 0 < t[key] < 1
    md = _sections((out / "report.md").read_text())[SECTIONS["relative"]]
    assert "host share (config / dense)" in md and "Host share:" in md
    # the tiny models are overhead-bound on a CPU, and the table says so wherever a side passes the bound
    for t in data["tables"]["relative_to_dense"]:
        bound = max(t["host_share"], t["baseline_host_share"]) > OVERHEAD_BOUND
        line = next(r for r in _table_rows(md) if r.startswith(f"| {t['name']} |"))
        assert ("overhead-bound" in line) == bound


def test_host_share_formula_on_cpu_and_gpu_rows():
    cpu = {"timing": {"median_ms": 10.0},
           "breakdown": {"categories": {HOST: {"ms": 3.0}, FFN: {"ms": 9.0}}, "attributed_ms": 12.0,
                         "device_total_ms": None}}
    gpu = {"timing": {"median_ms": 10.0},
           "breakdown": {"categories": {FFN: {"ms": 6.0}}, "attributed_ms": 6.0, "device_total_ms": 6.0,
                         "idle_ms": 4.0}}
    assert host_share(cpu) == pytest.approx(0.25) and host_share(gpu) == pytest.approx(0.4)
    assert host_share({"timing": {"median_ms": 1.0}, "breakdown": {"error": "x"}}) is None
    assert host_share({"timing": {"median_ms": 1.0}}) is None


def test_report_has_every_section_with_numbers(cpu_report):
    _, out = cpu_report
    md = (out / "report.md").read_text()
    sections = _sections(md)
    for key, heading in SECTIONS.items():
        assert heading in sections, f"missing section {heading!r}"
        body = sections[heading]
        if key in ("method", "plots", "notes"):
            assert body.strip()
            continue
        rows = _table_rows(body)
        assert rows, f"{heading}: no table rows"
        if key == "telemetry":  # no NVML on a CPU machine: every field n/a, never missing
            assert all("n/a" in row for row in rows) and "n/a:" in body
        elif key == "environment":  # names and versions
            assert any(re.search(r"\d", row) for row in rows)
        else:
            assert all(re.search(r"\d", row) for row in rows), f"{heading}: a row without numbers"
    assert "Measured here: " in sections[SECTIONS["relative"]] and "paper" in sections[SECTIONS["relative"]]
    assert "Projected" in sections[SECTIONS["projection"]]
    for name in PLOTS.values():
        assert f"]({name})" in sections[SECTIONS["plots"]]


def test_compare_two_reports(cpu_report, tmp_path, capsys):
    _, out = cpu_report
    assert main(["--compare", str(out), str(out / "report.json"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "compare.md").read_text()
    assert "| mot2-tiny |" in text and "B/A time" in text and "1.000" in text
    assert "mot2-tiny-ref" in capsys.readouterr().out


def test_default_output_directory_never_overwrites(monkeypatch, tmp_path):
    import argparse

    import profiling.__main__ as cli

    monkeypatch.setattr(cli, "REPO", tmp_path)
    args = argparse.Namespace(out=None)
    first = cli._out_dir(args, "NVIDIA H100 80GB HBM3")
    assert first.parent == tmp_path / "reports" and first.name.endswith("-nvidia-h100-80gb-hbm3")
    first.mkdir(parents=True)
    (first / "report.json").write_text("{}")
    assert cli._out_dir(args, "NVIDIA H100 80GB HBM3").name == first.name + "-2"


def test_compare_missing_report(tmp_path, capsys):
    assert main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no report.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and parameters: one test per registered configuration, against the formula written out by hand
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_flops_match_hand_formula(name):
    cfg = get_config(name)
    d, L, f, S, V = cfg.dim, cfg.n_layers, cfg.hidden, cfg.seq, cfg.vocab
    # weights one token multiplies: Q, K, V, O (d x d each, MHA), W1, W3, W2 (d x f each) per layer; the LM head
    n_matmul = L * (4 * d * d + 3 * d * f) + d * V
    if cfg.family == "moma":  # + every router scores every token: d x E_total per layer (capacity factor 1)
        assert cfg.options["capacity_factor"] == 1.0
        n_matmul += L * d * sum(cfg.options["experts"])
    if cfg.family == "token_choice":  # each token through k experts of width f (dropless), + the router d x E
        k, E = cfg.options["top_k"], cfg.options["experts"]
        n_matmul = L * (4 * d * d + k * 3 * d * f + d * E) + d * V
    if cfg.family == "avgk":  # f = the active cells (SwiGLU), + scoring every block's mean key: d x n_blocks
        n_matmul += L * d * (cfg.options["cells"] // cfg.options["block_size"])
    per_token = 6 * n_matmul + 6 * L * d * (S + 1)  # + exact causal attention, forward + backward
    fl = flop_count(cfg)
    if cfg.options.get("mod_capacity") is not None:
        # MoD on layers 0, 2, 4, ...: a quarter of the tokens runs them, attending to a quarter of the keys; the MoD
        # router (d x 1) scores every token of those layers
        c, every = cfg.options["mod_capacity"], cfg.options["mod_every"]
        L_mod = (L + every - 1) // every
        layer = 4 * d * d + 3 * d * f + d * sum(cfg.options["experts"])
        n_matmul = (L - L_mod + c * L_mod) * layer + d * V + L_mod * d
        per_token = 6 * n_matmul + 6 * d * (S + 1) * (L - L_mod + c * c * L_mod)
        assert fl.train_per_token == pytest.approx(per_token, rel=1e-6)
        return
    assert fl.train_per_token == per_token
    assert fl.train_per_step(3, S) == 3 * S * per_token
    if cfg.baseline and cfg.family in ("mot", "mot_reference"):  # MoT does the dense model's FLOPs
        assert fl.train_per_token == flop_count(get_config(cfg.baseline)).train_per_token


def test_flops_literal_tiny():
    # dense-tiny: d 64, 2 layers, f 192, S 128, V 256 -> N = 2*(4*64^2 + 3*64*192) + 64*256 = 122880
    assert flop_count(get_config("dense-tiny")).train_per_token == 6 * 122880 + 6 * 2 * 64 * 129


def test_paper_sizes_and_parameter_counts():
    assert swiglu_hidden(1024) == 2816 and swiglu_hidden(2048) == 5632
    assert round(param_count(get_config("dense-443m")).total / 1e6) == 443
    assert round(param_count(get_config("dense-1.5b")).total / 1e9, 1) == 1.5
    mot2, dense = param_count(get_config("mot2-443m")), param_count(get_config("dense-443m"))
    assert mot2.active == dense.total
    assert mot2.total - dense.total == dense.total - 2 * 65536 * 1024  # one more copy of the non-embedding weights
    # MoMa 4t4i at 435M: 7 more SwiGLU FFNs (3 x 1024 x 4096) and 8 router rows (1024) per layer, 24 layers
    moma, base = param_count(get_config("moma-4t4i-435m")), param_count(get_config("dense-435m-moma"))
    assert moma.total - base.total == 24 * (7 * 3 * 1024 * 4096 + 8 * 1024)


@pytest.mark.parametrize("name", PRESETS["tiny"])
def test_parameter_count_matches_the_built_model(name):
    cfg = get_config(name)
    model = cfg.build("cpu", torch.float32).model
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg).total


# ----------------------------------------------------------------------------------------------------------------
# NVML absent -> "n/a"; no GPU -> the CPU preset; unknown configuration -> the list of valid ones
# ----------------------------------------------------------------------------------------------------------------


class _RaisingNvml(types.ModuleType):
    def __init__(self):
        super().__init__("pynvml")

    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


@pytest.mark.parametrize("module", [None, _RaisingNvml()], ids=["not-installed", "init-raises"])
def test_nvml_absent_gives_na(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "pynvml", module)
    ok, why = nvml.status()
    assert not ok and why
    with nvml.Sampler(0, interval_s=0.001) as sampler:
        pass
    summary = sampler.summary(steps=5)
    assert all(summary[k] == "n/a" for k in nvml.FIELDS) and summary["reason"]
    facts = nvml.device_facts(0)
    assert facts["gpu_name"] == "n/a" and facts["reason"]


def test_nvml_summary_from_a_fake_gpu(monkeypatch):
    """The sampler's arithmetic (the GPU-only path) on a fake NVML: energy counter 10 J per window, 300 W."""
    fake = types.ModuleType("pynvml")
    energy = iter([1_000_000, 1_010_000])  # mJ, read at entry and exit
    fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM, fake.NVML_TEMPERATURE_GPU = 0, 1, 0
    fake.nvmlClocksEventReasonSwPowerCap = 4
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByUUID = fake.nvmlDeviceGetHandleByIndex = lambda key: "h"
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: next(energy)
    fake.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == 0 else 2619
    fake.nvmlDeviceGetPowerUsage = lambda h: 300_000
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97, memory=40)
    fake.nvmlDeviceGetTemperature = lambda h, sensor: 61
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 4
    fake.nvmlDeviceGetName = lambda h: "Fake H100"
    fake.nvmlSystemGetDriverVersion = lambda: "999.1"
    fake.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    fake.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with nvml.Sampler(0, interval_s=0.001) as sampler:
        pass
    s = sampler.summary(steps=4)
    assert s["energy_j"] == 10.0 and s["energy_j_per_step"] == 2.5 and s["energy_source"] == "energy counter"
    assert s["power_w_mean"] == 300.0 and s["sm_clock_mhz_mean"] == 1980 and s["util_gpu_pct_mean"] == 97
    assert s["gpu_name"] == "Fake H100" and s["power_limit_w"] == 700.0 and s["clock_limits_seen"] == "sw power cap"
    assert s["samples"] >= 1


def test_no_gpu_selects_the_cpu_preset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device.type == "cpu"
    # the default: every family at a size where matmuls dominate a CPU step; --quick: the tiny models
    names = PRESETS[default_preset(device.type, False)]
    assert names == ["dense-cpu", "mot2-cpu", "mot3-cpu", "mot2-cpu-ref", "moe-8x-cpu", "moma-1t1i-cpu",
                     "moma-4t4i-cpu", "mod-moma-1t1i-cpu", "mod-moma-4t4i-cpu", "tc-8x-top2-cpu",
                     "tc-64x-top8-cpu", "avgk-cpu"]
    assert all(get_config(n).dim >= 512 and get_config(n).seq >= 1024 for n in names)
    assert "no GPU found" in preset_reason(device.type, False)
    quick = PRESETS[default_preset(device.type, True)]
    assert quick == ["dense-tiny", "mot2-tiny", "mot3-tiny", "mot2-tiny-ref", "moe-8x-tiny", "moma-1t1i-tiny",
                     "moma-4t4i-tiny", "mod-moma-1t1i-tiny", "mod-moma-4t4i-tiny", "tc-8x-top2-tiny",
                     "tc-64x-top8-tiny", "avgk-tiny"]
    assert all(get_config(n).dim <= 64 for n in quick)
    assert default_preset("cuda", False) == "gpu" and default_preset("cuda", True) == "gpu-quick"
    # the cpu preset carries the same kinds of rows as the GPU presets: a dense baseline, MoT 2 and 3 and the
    # reference of MoT 2, one group
    assert {get_config(n).family for n in names} == {get_config(n).family for n in PRESETS["gpu"]}
    assert {get_config(n).baseline for n in names[1:]} == {"dense-cpu"}
    assert get_config("mot2-cpu-ref").reference_of == "mot2-cpu"


def test_cuda_requested_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda", "--no-progress"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_unknown_config_lists_valid_names(capsys):
    with pytest.raises(UnknownConfigError) as err:
        resolve(["dense-tiny", "mot9-huge"])
    msg = str(err.value)
    assert "'mot9-huge'" in msg
    assert all(name in msg for name in REGISTRY) and all(p in msg for p in PRESETS)
    assert main(["--configs", "mot9-huge", "--device", "cpu", "--no-progress"]) == 2
    err_text = capsys.readouterr().err
    assert "mot9-huge" in err_text and "dense-443m" in err_text and "mot2-tiny-ref" in err_text


def test_unknown_config_in_set(capsys):
    assert main(["--configs", "cpu", "--set", "nope:batch=2", "--device", "cpu", "--no-progress"]) == 2
    assert "valid configurations" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Registry: overrides, mixes, extension by later layers
# ----------------------------------------------------------------------------------------------------------------


def test_overrides_parse_to_field_types():
    cfg = get_config("mot2-443m").override(batch="4", image_fraction="0.2", seq="2048", baseline="none")
    assert (cfg.batch, cfg.image_fraction, cfg.seq, cfg.baseline) == (4, 0.2, 2048, None)
    assert cfg.override(batch="auto").batch == "auto"
    with pytest.raises(ValueError, match="unknown configuration field 'width'"):
        cfg.override(width="3")
    with pytest.raises(ValueError, match="divisible"):
        cfg.override(n_heads="7")


def test_mixes():
    cfg = get_config("mot2-tiny-ref")
    assert with_mix(cfg, "80/20", rename=False).image_fraction == 0.2
    renamed = with_mix(cfg, "80/20", rename=True)
    assert renamed.name == "mot2-tiny-ref[80/20]" and renamed.reference_of == "mot2-tiny[80/20]"
    assert renamed.mix == "80/20"
    assert with_mix(get_config("dense-tiny"), "80/20", rename=True) is get_config("dense-tiny")
    with pytest.raises(ValueError, match="sum to 100"):
        with_mix(cfg, "80/30", rename=False)


def test_a_later_layer_registers_its_family_config_and_preset(monkeypatch):
    monkeypatch.setattr("profiling.registry.FAMILIES", dict(FAMILIES))
    monkeypatch.setattr("profiling.registry.REGISTRY", dict(REGISTRY))
    monkeypatch.setattr("profiling.registry.PRESETS", {k: list(v) for k, v in PRESETS.items()})
    from profiling import registry

    base = FAMILIES["mot"]
    registry.register_family(Family("toy", base.build, base.flops, base.params, "a stand-in layer"))
    registry.register(ModelConfig("toy-tiny", "toy", dim=64, n_layers=2, n_heads=4, hidden=192, num_modalities=2,
                                  seq=128, batch=2, vocab=256, image_span=32, group="tiny", baseline="dense-tiny",
                                  paper_ratio="moma-1t1i"))
    registry.add_to_preset("cpu", "toy-tiny")
    assert registry.resolve(["cpu"])[-1].name == "toy-tiny"
    assert flop_count(registry.get_config("toy-tiny")).train_per_token == flop_count(
        get_config("mot2-tiny")).train_per_token
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(Family("toy", base.build, base.flops, base.params))
    with pytest.raises(ValueError, match="unknown `paper_ratio`"):
        ModelConfig("x", "toy", dim=64, n_layers=1, n_heads=4, hidden=64, paper_ratio="nope")
    assert "toy" not in FAMILIES  # the module's own dicts are untouched (patched copies above)


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register(get_config("dense-tiny"))
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAMILIES["dense"])


# ----------------------------------------------------------------------------------------------------------------
# Pieces: modality layout, reference-style model, auto-batch search, breakdown categories
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq, m, frac, span",
    [
        (4096, 2, 0.5, 1024),  # two image spans of 1024
        (4096, 2, 0.2, 1024),  # one span of 819
        (128, 3, 0.5, 32),  # spans alternate image / speech
        (128, 2, 0.0, 32),  # text only
        (100, 2, 0.37, 7),  # spans of uneven length
    ],
)
def test_modality_layout(seq, m, frac, span):
    ids = modality_ids(4, seq, m, frac, span, seed=3)
    assert ids.shape == (4, seq) and ids.dtype == torch.int64
    assert torch.equal(ids, modality_ids(4, seq, m, frac, span, seed=3))  # seeded
    assert ((ids > 0).sum(1) == round(frac * seq)).all()
    assert int(ids.max()) <= m - 1
    if frac > 0:
        assert (ids[:, 0] == 0).all()  # a text run starts every sequence
        assert not torch.equal(ids[0], ids[1])  # each sequence draws its own cut points
    if m == 3:
        assert set(ids.unique().tolist()) == {0, 1, 2}


def test_reference_style_model_is_the_same_function():
    cfg = get_config("mot2-tiny").override(n_layers="1", seq="16", image_span="4")
    torch.manual_seed(0)
    work = build_transformer(cfg, torch.device("cpu"), torch.float64)
    ref = ReferenceMoTTransformer(work.model)
    inputs = work.make_batch(2, 0)
    out = work.model(inputs["tokens"], inputs["modality_ids"])
    out_ref = ref(inputs["tokens"], inputs["modality_ids"])
    # not bitwise: the package computes rotary angles in float32, the reference in float64
    torch.testing.assert_close(out_ref, out, rtol=1e-5, atol=1e-6)
    assert {id(p) for p in ref.parameters()} == {id(p) for p in work.model.parameters()}


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 12, 63, 64, 1000])
def test_largest_fitting(limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    assert largest_fitting(fits, cap=64) == min(limit, 64)
    assert len(calls) <= 2 * math.ceil(math.log2(64)) + 1
    for first in (8, min(max(limit, 1), 64)):
        assert largest_fitting(fits, cap=64, first=first) == min(limit, 64)


def test_auto_batch_is_shared_by_a_group(monkeypatch):
    """The GPU search's bookkeeping, with the per-member search faked: the group gets the smallest answer, later
    members are tried from the running answer, and a member that cannot run fails alone."""
    limits = {"dense-443m": 14, "mot2-443m": 12, "mot3-443m": 11}
    firsts = []

    def fake_search(cfg, settings, cap, first, log):
        firsts.append((cfg.name, cap, first))
        if cfg.name == "mot2-443m-ref":
            raise RuntimeError("kernel exploded")
        return largest_fitting(lambda b: b <= limits[cfg.name], cap, first)

    monkeypatch.setattr(run_mod, "_search_batch", fake_search)
    monkeypatch.setattr(run_mod, "_release", lambda device: None)
    cfgs = resolve(["gpu-quick", "dense-tiny"])
    out = resolve_batches(cfgs, Settings(torch.device("cuda"), torch.bfloat16, progress=False, max_batch=64))
    assert {n: b for n, (b, _) in out.items()} == {"dense-443m": 11, "mot2-443m": 11, "mot3-443m": 11,
                                                   "mot2-443m-ref": 0, "dense-tiny": 2}
    assert out["mot2-443m-ref"][1].startswith("failed") and "kernel exploded" in out["mot2-443m-ref"][1]
    assert out["dense-tiny"][1] == "fixed"
    assert firsts == [("dense-443m", 64, 8), ("mot2-443m", 14, 14), ("mot3-443m", 12, 12), ("mot2-443m-ref", 11, 11)]


@pytest.mark.parametrize(
    "role, path, category",
    [
        ("attn", ["aten::_scaled_dot_product_flash_attention", "aten::scaled_dot_product_attention"], ATTENTION),
        ("attn", ["aten::_flash_attention_backward", "ScaledDotProductFlashAttentionBackward0"], ATTENTION),
        ("attn", ["aten::mm", "GroupedLinearFunctionBackward"], PROJ),
        ("ffn", ["aten::mm"], FFN),
        ("ref_block", ["aten::mm", "aten::matmul"], GEMM_UNSPLIT),
        ("ref_block", ["aten::mm", "MmBackward0", "autograd::engine::evaluate_function: MmBackward0"], GEMM_UNSPLIT),
        ("ref_block", ["aten::index_put_", "aten::index_put"], MASKS),
        ("ref_block", ["aten::nonzero", "aten::index"], MASKS),
        (None, ["aten::nll_loss_backward", "autograd::engine::evaluate_function: NllLossBackward0"], EMBED_HEAD_LOSS),
        (None, ["aten::embedding_dense_backward", "EmbeddingBackward0"], EMBED_HEAD_LOSS),
    ],
)
def test_breakdown_categories(role, path, category):
    assert categorize(role, path) == category


# ----------------------------------------------------------------------------------------------------------------
# Untrustworthy measurements are flagged, not reported as if they were clean
# ----------------------------------------------------------------------------------------------------------------


def test_trust_warnings_for_spread_and_load():
    timing = {"median_ms": 10.0, "p20_ms": 9.8, "p80_ms": 10.3}
    assert run_mod.trust_warnings(timing, 1.5, 2) == []
    assert run_mod.trust_warnings(timing, None, 2) == []
    wide = {"median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.5}
    assert "spread 25%" in run_mod.trust_warnings(wide, 0.5, 2)[0]
    assert "load average 6.2 > 2 cores" in run_mod.trust_warnings(timing, 6.2, 2)[0]


def test_a_busy_machine_marks_the_report_and_the_summary(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run_mod, "machine_load", lambda: 64.0)
    assert main(["--quick", "--no-progress", "--no-breakdown", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "load average 64.0" in out and "do not trust this ratio" in out
    md = next(tmp_path.rglob("report.md")).read_text()
    results = _table_rows(_sections(md)[SECTIONS["results"]])
    assert results and all("do not trust" in row for row in results)
    data = json.loads(next(tmp_path.rglob("report.json")).read_text())
    assert all(r["trust_warnings"] for r in data["results"] if r["status"] == "ok")


def test_cpu_groups_are_timed_in_alternating_steps(monkeypatch):
    # On the CPU the members of a group are built together and timed one step each per round: the order of the
    # timed steps interleaves the configurations, and every member gets `steps` steps.
    order = []
    real = run_mod.time_steps

    def spy(step, zero, device, n, desc="", progress=False):
        order.append((desc, n))
        return real(step, zero, device, n, desc, progress)

    monkeypatch.setattr(run_mod, "time_steps", spy)
    members = [(get_config("dense-tiny"), 1), (get_config("mot2-tiny"), 1)]
    settings = Settings(device=torch.device("cpu"), dtype=torch.float32, warmup=1, steps=3, breakdown=False,
                        progress=False)
    rows = run_mod.measure_interleaved(members, settings, ceiling_tflops=1.0)
    assert [r["name"] for r in rows] == ["dense-tiny", "mot2-tiny"]
    assert all(r["status"] == "ok" and r["timing"]["n"] == 3 for r in rows)
    assert all(r["timing_order"].startswith("alternating") for r in rows)
    timed = [d for d, n in order if not d.endswith("warm-up")]
    assert timed == [""] * 6 and [n for d, n in order if not d.endswith("warm-up")] == [1] * 6
    assert [d for d, _ in order][:2] == ["dense-tiny warm-up", "mot2-tiny warm-up"]  # warm both, then alternate


def test_a_failing_member_of_an_interleaved_group_keeps_the_others(monkeypatch):
    members = [(get_config("dense-tiny"), 1), (get_config("mot2-tiny"), 1)]
    real = run_mod._prepare

    def broken(cfg, batch, settings):
        live = real(cfg, batch, settings)
        if cfg.name == "mot2-tiny":
            def boom():
                raise RuntimeError("kernel exploded")
            live.step = boom
        return live

    monkeypatch.setattr(run_mod, "_prepare", broken)
    settings = Settings(device=torch.device("cpu"), dtype=torch.float32, warmup=0, steps=2, breakdown=False,
                        progress=False)
    rows = run_mod.measure_interleaved(members, settings, ceiling_tflops=1.0)
    assert rows[0]["status"] == "ok" and rows[0]["timing"]["n"] == 2
    assert rows[1]["status"] == "failed: RuntimeError: kernel exploded"
