"""The speed benchmark runs end to end on the tiny model and writes consistent tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from calm_utils.bench import (COMPONENTS, BenchPrompt, Profiler, ProfiledView, default_configs, profile_pass,
                              run_bench, subject_from_causal_lm)

REQUIRED = ["model", "config", "ms_per_token", "speedup", "ideal_speedup", "quality", "realized_over_ideal",
            "avg_exit_layer", "consistency", "ms_iqr", "t_layers", "t_head", "t_conf", "t_prop", "t_other"]


@pytest.fixture(scope="module")
def subject(tiny_model):
    g = torch.Generator().manual_seed(0)
    prompts = [BenchPrompt(torch.randint(3, 97, (1, n), generator=g), ["5 6 7"], "scitldr") for n in (5, 9)]
    return subject_from_causal_lm(tiny_model, None, prompts, name="tiny")


@pytest.fixture(scope="module")
def bench(subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "speed_tiny"
    configs = default_configs("tiny", subject.view.num_layers, smoke=True)
    df, side = run_bench(subject, configs, max_new=6, repeats=2, out=out, log=lambda s: None)
    return df, side, out


def test_writes_valid_csv_and_sidecar(bench):
    df, side, out = bench
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert all(c in csv.columns for c in REQUIRED)
    assert list(csv.config)[:2] == ["hf_generate", "full"] and len(csv) == 1 + 6
    assert np.isfinite(csv.ms_per_token).all() and (csv.ms_per_token > 0).all()
    assert csv.quality.between(0, 1).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    for k in ("torch_threads", "device", "loadavg_before", "loadavg_after", "unit_costs_ms"):
        assert k in meta
    assert out.with_suffix(".png").exists() and out.with_suffix(".pdf").exists()
    runs = pd.read_csv(out.parent / "speed_tiny_runs.csv")
    assert len(runs) == 2 * 2 * 7  # repeats x prompts x (HF + 6 configs): interleaved, all timed


def test_full_equals_hf_and_ideal_is_one(bench):
    df, _, _ = bench
    full = df.set_index("config").loc["full"]
    assert full.ideal_speedup == pytest.approx(1.0)
    assert full.consistency == pytest.approx(1.0)
    assert full.same_tokens_as_hf == 1.0  # exits off: our decoder equals HF generate token for token
    assert full.avg_exit_layer == 6


def test_breakdown_sums_to_profiled_total(subject):
    prof = profile_pass(subject, {"full": dict(policy="full"),
                                  "sd": dict(policy="confidence", measure="softmax_diff", threshold=0.3)}, 6)
    parts = prof[[f"t_{c}" for c in COMPONENTS]].sum(axis=1)
    assert np.allclose(parts, prof.profiled_ms, rtol=1e-6)
    assert (prof[[f"t_{c}" for c in COMPONENTS if c != "other"]] >= 0).all().all()
    assert (prof.t_other > -1e-3).all()  # the remainder is not negative: no double counting
    full = prof[prof.config == "full"]
    L = subject.view.num_layers
    # full depth: L layer calls per generated token after the first (predicted by the prompt pass)
    assert (full.n_layers == L * (full.tokens - 1)).all() and (full.n_prop == 0).all()
    sd = prof[prof.config == "sd"]
    assert (sd.n_conf > 0).all()


def test_profiler_exclusive_time():
    p = Profiler(torch.device("cpu"))
    import time
    p.call("conf", lambda: (time.sleep(0.01), p.call("head", time.sleep, 0.02)))
    assert p.times["head"] >= 0.02 and p.times["conf"] < 0.02 and p.counts == {"conf": 1, "head": 1}


def test_profiled_view_delegates(tiny_view):
    pv = ProfiledView(tiny_view, Profiler(torch.device("cpu")))
    assert pv.num_layers == tiny_view.num_layers and pv.eos_ids == tiny_view.eos_ids


def test_oracle_batched_head_call_is_costed_on_its_own(subject):
    from calm_utils.bench import unit_costs
    prof = profile_pass(subject, {"full": dict(policy="full"), "oracle": dict(policy="oracle")}, 6)
    orc = prof[prof.config == "oracle"]
    # one (L-1)-vector check per decoded token, counted apart from the single-vector calls
    assert (orc.n_head_batch == orc.tokens - 1).all() and (prof[prof.config == "full"].n_head_batch == 0).all()
    u = unit_costs(prof)
    assert u["head"] > 0 and u["head_batch"] >= 0


def test_learned_head_and_linear_maps_configs(subject, tiny_view):
    from calm_utils.heads import make_head
    from calm_utils.linear_maps import LinearMaps
    L, d = tiny_view.num_layers, tiny_view.hidden_size
    torch.manual_seed(0)
    extras = {"heads": {"linear": make_head("linear", d, L)}, "maps": LinearMaps.identity(L, d, tiny_view)}
    subject.extra["study"] = extras
    try:
        configs = {"full": dict(policy="full"),
                   "lin": dict(policy="confidence", threshold=0.0, head="linear"),          # exits at layer 1
                   "lin_maps": dict(policy="confidence", threshold=0.0, head="linear", maps=True)}
        df, side = run_bench(subject, configs, max_new=5, repeats=1, log=lambda s: None)
    finally:
        subject.extra.pop("study")
    r = df.set_index("config")
    assert r.loc["lin", "avg_exit_layer"] == 1 and r.loc["lin_maps", "avg_exit_layer"] == 1
    # identity maps change nothing: same tokens with and without them
    assert r.loc["lin", "consistency"] == pytest.approx(r.loc["lin_maps", "consistency"])
    assert "study" not in side


def test_head_config_without_extras_is_a_clear_error(tiny_view):
    from calm_utils.bench import _decoder
    with pytest.raises(ValueError, match="study_extras"):
        _decoder(tiny_view, dict(policy="confidence", threshold=0.5, head="linear"), 4)


def test_study_configs_read_the_notebook_tables(tmp_path):
    from calm_utils.bench import study_configs
    pd.DataFrame([dict(model="t5-calm", maps=False, measure="linear", level=0.8, threshold=0.85, reached=True),
                  dict(model="t5-calm", maps=True, measure="attention", level=0.9, threshold=None, reached=False),
                  dict(model="smollm2-135m", maps=False, measure="linear", level=0.8, threshold=0.9, reached=True)]
                 ).to_csv(tmp_path / "exit_matched.csv", index=False)
    pd.DataFrame([dict(measure="topk_diff(k=32)", constraint="textual", method="ltt", delta=0.3, threshold=0.96),
                  dict(measure="softmax_diff", constraint="textual", method="ltt", delta=0.1, threshold=1.0),
                  dict(measure="softmax_diff", constraint="textual", method="naive", delta=0.3, threshold=0.5)]
                 ).to_csv(tmp_path / "calibration_t5.csv", index=False)
    c = study_configs("t5_calm", tmp_path, log=lambda s: None)
    assert set(c) == {"linear_0.85(c>=0.8)", "ltt_topk_diff(k=32)_d0.3"}
    assert c["ltt_topk_diff(k=32)_d0.3"] == dict(policy="confidence", measure="topk_diff", threshold=0.96,
                                                  measure_kwargs={"k": 32})
    s = study_configs("smollm2-135m", tmp_path, log=lambda s: None)
    assert list(s) == ["linear_0.9(c>=0.8)"] and s["linear_0.9(c>=0.8)"]["min_exit_layer"] == 14
    assert study_configs("tiny", tmp_path) == {}
