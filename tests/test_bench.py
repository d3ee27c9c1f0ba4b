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
