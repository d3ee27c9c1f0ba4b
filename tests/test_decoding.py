"""The key correctness tests: layer-by-layer decoding equals HF generate; exits keep caches whole."""
from __future__ import annotations

import math

import pytest
import torch

from calm_utils.confidence import ExitContext, make_measure
from calm_utils.decoding import EarlyExitDecoder, ExitConfig, early_exit_generate, generate_with_session
from conftest import hf_greedy

PROMPTS = [[1, 5, 9, 33, 4], [1, 70], [1, 12, 12, 12, 50, 51, 52, 3, 8, 90, 11]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_full_equals_hf_generate_tiny(tiny_model, tiny_view, prompt):
    ids = torch.tensor([prompt])
    res = early_exit_generate(tiny_view, ids, policy="full", max_new_tokens=20)
    assert res.tokens == hf_greedy(tiny_model, ids, 20)
    assert res.exit_layers == [tiny_view.num_layers] * len(res.tokens)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_static_last_layer_equals_full(tiny_view, prompt):
    full = early_exit_generate(tiny_view, prompt, policy="full", max_new_tokens=15)
    static = early_exit_generate(tiny_view, prompt, policy="static", static_layer=tiny_view.num_layers,
                                 max_new_tokens=15)
    assert static.tokens == full.tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_oracle_with_oracle_cache_never_changes_output(tiny_view, prompt):
    full = early_exit_generate(tiny_view, prompt, policy="full", max_new_tokens=15)
    oracle = early_exit_generate(tiny_view, prompt, policy="oracle", oracle_cache=True, max_new_tokens=15)
    assert oracle.tokens == full.tokens
    assert min(oracle.exit_layers) >= 1 and max(oracle.exit_layers) <= tiny_view.num_layers


def _cache_lengths_after(view, config, prompt, measure=None):
    res, session = generate_with_session(view, EarlyExitDecoder(view, config, measure), prompt)
    return res, session.cache.lengths


@pytest.mark.parametrize("config", [
    ExitConfig(policy="static", static_layer=2, max_new_tokens=12),
    ExitConfig(policy="oracle", max_new_tokens=12),
    ExitConfig(policy="confidence", measure="softmax_max", threshold=0.3, max_new_tokens=12),
    ExitConfig(policy="confidence", measure="state", threshold=0.5, max_new_tokens=12),
    ExitConfig(policy="confidence", measure="topk_diff", threshold=0.2, max_new_tokens=12, measure_kwargs={"k": 4}),
])
def test_every_layer_cache_holds_every_position(tiny_view, config):
    prompt = PROMPTS[0]
    res, lengths = _cache_lengths_after(tiny_view, config, prompt)
    # the last generated token is never fed back, so the cache holds prompt + (n - 1) positions
    expected = len(prompt) + len(res.tokens) - 1
    assert lengths == [expected] * tiny_view.num_layers


def test_exits_happen_and_are_recorded(tiny_view):
    res = early_exit_generate(tiny_view, PROMPTS[0], policy="confidence", measure="softmax_max",
                              threshold=0.0, max_new_tokens=10)
    assert res.exit_layers[0] == tiny_view.num_layers  # first token comes from the full-depth prompt pass
    assert all(layer == 1 for layer in res.exit_layers[1:])
    assert all(not math.isnan(c) for c in res.confidences[1:])
    assert res.config["measure"]["name"] == "softmax_max"
    assert len(res.token_ms) == len(res.tokens) and res.prompt_ms > 0


def test_state_propagation_differs_from_oracle_cache(tiny_view):
    """Propagated K/V are not the true K/V: with exits, oracle without oracle_cache may diverge."""
    a = early_exit_generate(tiny_view, PROMPTS[2], policy="oracle", oracle_cache=False, max_new_tokens=20)
    b = early_exit_generate(tiny_view, PROMPTS[2], policy="oracle", oracle_cache=True, max_new_tokens=20)
    assert a.tokens[:2] == b.tokens[:2]  # the first two tokens cannot be affected yet


def test_threshold_decay_forms():
    paper = ExitConfig(threshold=0.8, decay="paper", decay_temperature=4.0, max_new_tokens=10)
    code = ExitConfig(threshold=0.8, decay="code", decay_temperature=4.0, max_new_tokens=10)
    t = 5
    assert paper.threshold_at(t) == pytest.approx(min(1, max(0, 0.9 * 0.8 + 0.1 * math.exp(-4 * t / 10))))
    assert code.threshold_at(t) == pytest.approx(0.8 * (0.9 + 0.1 * math.exp(-4 * t / 10)))
    assert ExitConfig(threshold=0.8).threshold_at(t) == 0.8
    assert paper.threshold_at(0) == pytest.approx(0.9 * 0.8 + 0.1)


def test_min_exit_layer_and_interval(tiny_view):
    cfg = ExitConfig(min_exit_layer=2, exit_interval=2)
    assert [i for i, c in enumerate(cfg.checked_layers(6)) if c] == [2, 4]
    res = early_exit_generate(tiny_view, PROMPTS[0], policy="confidence", measure="softmax_max",
                              threshold=0.0, min_exit_layer=3, max_new_tokens=8)
    assert all(layer == 3 for layer in res.exit_layers[1:])


# ---- confidence measures equal a direct computation --------------------------------------
def _ctx(view, h, layer=2, history=None):
    ctx = ExitContext(lambda i, x, rows: view.logits(x, rows))
    ctx.history = history or []
    return ctx.at(layer, h)


def test_measures_match_reference(tiny_view):
    torch.manual_seed(1)
    h_prev, h = torch.randn(64), torch.randn(64)
    probs = torch.softmax(tiny_view.head(tiny_view.norm(h)), -1)
    top = probs.topk(2)
    conf, tok = make_measure("softmax_max")(_ctx(tiny_view, h))
    assert conf == pytest.approx(float(top.values[0]), rel=1e-5) and tok == int(top.indices[0])
    conf, tok = make_measure("softmax_diff")(_ctx(tiny_view, h))
    assert conf == pytest.approx(float(top.values[0] - top.values[1]), rel=1e-5) and tok == int(top.indices[0])
    conf, tok = make_measure("state")(_ctx(tiny_view, h, 2, [torch.zeros(64), h_prev, h]))
    ref = float(h_prev @ h / (h_prev.norm() * h.norm()))
    assert conf == pytest.approx(ref, rel=1e-5) and tok is None
    assert make_measure("state")(_ctx(tiny_view, h, 1, [h_prev, h]))[0] == 0.0


def test_topk_with_k_equal_vocab_equals_full_measure(tiny_view):
    torch.manual_seed(2)
    V = tiny_view.vocab_size
    for kind, full_name in (("diff", "softmax_diff"), ("max", "softmax_max")):
        topk, full = make_measure(f"topk_{kind}", k=V, vocab_size=V), make_measure(full_name)
        topk.start_token()
        for layer in (1, 2, 3):  # first call: full logits; later calls: the k rows only
            h = torch.randn(64)
            c1, t1 = topk(_ctx(tiny_view, h, layer))
            c2, t2 = full(_ctx(tiny_view, h, layer))
            assert c1 == pytest.approx(c2, rel=1e-5, abs=1e-6) and t1 == t2
    a = early_exit_generate(tiny_view, PROMPTS[0], policy="confidence", measure="topk_diff",
                            measure_kwargs={"k": V}, threshold=0.5, max_new_tokens=12)
    b = early_exit_generate(tiny_view, PROMPTS[0], policy="confidence", measure="softmax_diff",
                            threshold=0.5, max_new_tokens=12)
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers


def test_topk_later_layers_use_only_candidates(tiny_view):
    m = make_measure("topk_max", k=3, vocab_size=tiny_view.vocab_size)
    m.start_token()
    _, t1 = m(_ctx(tiny_view, torch.randn(64), 1))
    for _ in range(5):
        _, t = m(_ctx(tiny_view, torch.randn(64), 2))
        assert t in m.candidates.tolist()


# ---- bad input gets a clear error ---------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "sometimes"}, "unknown exit policy"),
    ({"measure": "vibes"}, "unknown confidence measure"),
    ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\]"),
    ({"threshold": -0.1}, r"threshold must be a number in \[0, 1\]"),
    ({"threshold": float("nan")}, r"threshold must be a number in \[0, 1\]"),
    ({"min_exit_layer": 0}, "min_exit_layer must be"),
    ({"min_exit_layer": 7}, "min_exit_layer must be"),
    ({"exit_interval": 0}, "exit_interval must be"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"policy": "static"}, "static_layer"),
    ({"policy": "static", "static_layer": 9}, "static_layer"),
    ({"decay": "fast"}, "unknown threshold decay"),
    ({"measure": "topk_diff", "measure_kwargs": {"k": 1}}, "2 <= k <= V"),
    ({"measure": "topk_diff", "measure_kwargs": {"k": 98}}, "2 <= k <= V"),
    ({"measure": "topk_diff"}, "needs more arguments"),
])
def test_bad_config_raises(tiny_view, kwargs, match):
    with pytest.raises(ValueError, match=match):
        early_exit_generate(tiny_view, PROMPTS[0], **kwargs)


def test_bad_prompts_raise(tiny_view):
    with pytest.raises(ValueError, match="prompt is empty"):
        early_exit_generate(tiny_view, [], policy="full")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        early_exit_generate(tiny_view, [1] * 250, policy="full", max_new_tokens=10)


# ---- the real model (slow, still in CI) ----------------------------------------------------
@pytest.mark.slow
def test_full_equals_hf_generate_smollm2(smollm):
    from calm_utils.data import load_squad, squad_prompt
    from calm_utils.model import encode_chat

    model, tok, view = smollm
    ds = load_squad()
    for row in (0, 100):
        ex = ds[row]
        ids = encode_chat(tok, squad_prompt(ex["context"], ex["question"]))
        res = early_exit_generate(view, ids, policy="full", max_new_tokens=16)
        assert res.tokens == hf_greedy(model, ids, 16)
        oracle = early_exit_generate(view, ids, policy="oracle", oracle_cache=True, max_new_tokens=16)
        assert oracle.tokens == res.tokens
