"""Top-k sweep helpers (calm_utils.topk) on the tiny random Llama."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from calm_utils.confidence import ExitContext, make_measure
from calm_utils.decoding import early_exit_generate
from calm_utils.experiments import Prompt, compare_settings
from calm_utils.topk import (candidate_miss_rate, candidate_ranks, choose_thresholds, confidence_cost_us,
                             parse_setting, setting_name, sweep_ks, sweep_summary, threshold_losses,
                             topk_settings)

PROMPT = [1, 5, 9, 33, 4, 17, 60]


def test_sweep_ks_ends_with_vocab():
    assert sweep_ks(97) == [2, 8, 32, 97]
    assert sweep_ks(49152) == [2, 8, 32, 128, 512, 2048, 49152]
    assert sweep_ks(8000)[-1] == 8000


def test_setting_names_round_trip():
    for k, lam in [(2, 0.9), (2048, 0.99), (49152, 0.5)]:
        assert parse_setting(setting_name(k, lam)) == (k, lam)
    assert parse_setting("full") is None


def test_confidence_cost_fields(tiny_view):
    r = confidence_cost_us(tiny_view, 4, repeats=3, inner=2, prompt_ids=PROMPT, first_layer=2, later_layer=3)
    d, V = tiny_view.hidden_size, tiny_view.vocab_size
    assert r["flops"] == 2 * 4 * d and r["full_flops"] == 2 * V * d
    for key in ("conf_us", "first_us", "full_conf_us", "layer_us"):
        assert r[key] > 0
    with pytest.raises(ValueError):
        confidence_cost_us(tiny_view, 4, repeats=1, first_layer=4, later_layer=3)


def test_candidate_ranks_match_bruteforce(tiny_view):
    ids = torch.tensor([PROMPT])
    states = tiny_view.hidden_states(ids)
    ranks = candidate_ranks(tiny_view, states, 2)
    final = tiny_view.logits(states[-1]).argmax(-1)
    early = tiny_view.logits(states[2])
    for t in range(ids.shape[1]):
        order = early[t].argsort(descending=True).tolist()
        assert ranks[t].item() == order.index(final[t].item())
    # the last layer's own top-1 contains its argmax: rank 0 everywhere
    assert (candidate_ranks(tiny_view, states, tiny_view.num_layers) == 0).all()


def test_miss_rate_monotone_and_bounds(tiny_view):
    full = early_exit_generate(tiny_view, PROMPT, policy="full", max_new_tokens=8)
    seq = torch.tensor([PROMPT + full.tokens])
    ks = [2, 8, 32, tiny_view.vocab_size]
    df = candidate_miss_rate(tiny_view, [seq], ks, first_layer=2, starts=[len(PROMPT)], model_name="tiny")
    assert list(df.k) == ks and (df.n_tokens == len(full.tokens)).all()
    rates = df.miss_rate.to_numpy()
    assert np.all(np.diff(rates) <= 1e-12) and rates[-1] == 0.0 and 0 <= rates[0] <= 1
    # the miss rate agrees with the measure's own candidates at the first checked layer
    states = tiny_view.hidden_states(seq)[:, len(PROMPT) - 1:-1]
    m = make_measure("topk_diff", k=8, vocab_size=tiny_view.vocab_size)
    ctx = ExitContext(lambda i, x, rows: tiny_view.logits(x, rows))
    with torch.inference_mode():
        misses = _misses(tiny_view, m, ctx, states)
    assert misses / states.shape[1] == pytest.approx(rates[1])


def _misses(view, m, ctx, states):
    misses = 0
    for t in range(states.shape[1]):
        m.start_token()
        m(ctx.at(2, states[2, t]))
        misses += int(view.logits(states[-1, t]).argmax()) not in set(m.candidates.tolist())
    return misses


def test_topk_k_equal_v_no_gather_same_result(tiny_view):
    V = tiny_view.vocab_size
    torch.manual_seed(3)
    h1, h2 = torch.randn(64), torch.randn(64)
    a, b = make_measure("topk_diff", k=V, vocab_size=V), make_measure("softmax_diff")
    ctx = ExitContext(lambda i, x, rows: tiny_view.logits(x, rows))
    a.start_token()
    a(ctx.at(2, h1))
    ca, ta = a(ctx.at(3, h2))
    cb, tb = b(ctx.at(3, h2))
    assert ta == tb and ca == pytest.approx(cb, abs=1e-6)


def test_sweep_and_threshold_choice(tiny_view):
    prompts = [Prompt("scitldr", str(i), torch.tensor([p]), ["x"]) for i, p in enumerate([PROMPT, [1, 70, 3]])]
    settings = topk_settings([2, tiny_view.vocab_size], [0.0, 1.0], min_exit_layer=2)
    runs = compare_settings(tiny_view, prompts, settings, max_new_tokens=6)
    s = sweep_summary(runs, tiny_view.num_layers)
    assert set(s.setting) == {"full"} | {x.name for x in settings}
    assert np.isnan(s.set_index("setting").loc["full", "k"])
    # threshold 1.0 never exits: identical to the full model
    never = s.set_index("setting").loc[setting_name(2, 1.0)]
    assert never.consistency == 1.0 and never.avg_exit_layer == tiny_view.num_layers
    t, losses = threshold_losses(runs, 2)
    assert list(t) == [0.0, 1.0] and losses.shape == (2, 2) and (losses[1] == 0).all()
    choice = choose_thresholds(runs, [2, tiny_view.vocab_size], delta=0.05)
    assert list(choice.k) == [2, tiny_view.vocab_size]
    assert set(choice.rule) <= {"ltt", "naive", "highest"}
    assert (choice.threshold.isin([0.0, 1.0])).all()
