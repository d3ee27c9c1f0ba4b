"""LayerwiseT5: layer-by-layer encoder-decoder decoding equals HF T5 generate; exits keep caches whole."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from calm_utils.decoding import EarlyExitDecoder, ExitConfig, early_exit_generate, generate_with_session
from calm_utils.t5_layerwise import LayerwiseT5
from calm_utils.t5_model import build_t5, make_t5_config

torch.set_num_threads(1)

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "t5_calm"
SOURCES = [[5, 9, 33, 4, 1], [7, 1], [12, 12, 12, 49, 3, 8, 11, 2, 30, 1], [44, 21, 17, 6, 1]]


def _sharpen(model):
    # Sharpen the random head so greedy paths are not dominated by near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def t5_tiny():
    """T5 v1.1-style: gated-gelu, untied head, 2 encoder / 4 decoder layers (unequal depths)."""
    torch.manual_seed(0)
    cfg = make_t5_config(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=4,
                         vocab_size=50)
    return _sharpen(build_t5(cfg))


@pytest.fixture(scope="module")
def t5_v10_tiny():
    """Original-T5-style: relu FF, tied head with the d_model**-0.5 output rescale, 3/3 layers."""
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=50, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=3, dropout_rate=0.0,
                   feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def t5_view(t5_tiny):
    return LayerwiseT5(t5_tiny)


def hf_generate(model, src, n):
    ids = torch.as_tensor([src]) if not torch.is_tensor(src) else src
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                             cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    out = out[0, 1:].tolist()  # drop decoder_start
    eos = model.generation_config.eos_token_id
    if eos in out:  # generate pads a finished sequence only in batches; cut after the first EOS anyway
        out = out[:out.index(eos) + 1]
    return out


def test_attributes(t5_tiny, t5_view):
    v = t5_view
    assert v.num_layers == 4 and v.num_layers != t5_tiny.config.num_layers
    assert v.vocab_size == 50 and v.eos_ids == {1} and v.decoder_start_token_id == 0
    assert v.max_positions is None and v.device.type == "cpu" and v.dtype == torch.float32
    assert v.output_scale is None  # v1.1: no rescale


@pytest.mark.parametrize("src", SOURCES)
def test_full_equals_hf_generate(t5_tiny, t5_view, src):
    res = early_exit_generate(t5_view, src, policy="full", max_new_tokens=20)
    assert res.tokens == hf_generate(t5_tiny, src, 20)
    assert res.exit_layers == [t5_view.num_layers] * len(res.tokens)
    assert res.prompt_len == len(src)


@pytest.mark.parametrize("which", ["t5_tiny", "t5_v10_tiny"])
def test_logits_and_hidden_states_equal_model(request, which):
    model = request.getfixturevalue(which)
    view = LayerwiseT5(model)
    assert (view.output_scale is not None) == (which == "t5_v10_tiny")
    src = torch.tensor([SOURCES[2]])
    tgt = torch.tensor([[3, 17, 17, 40, 8, 22, 1]])
    hs = view.hidden_states(src, tgt)  # (L+1, T, d)
    assert hs.shape == (view.num_layers + 1, tgt.shape[1], model.config.d_model)
    with torch.inference_mode():
        out = model(input_ids=src, labels=tgt, output_hidden_states=True)
    ref = out.decoder_hidden_states
    for i in range(view.num_layers):  # HF's entries 0..L-1 are pre-norm; entry L is after the final norm
        torch.testing.assert_close(hs[i], ref[i][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view.logits(hs[-1]), out.logits[0], atol=1e-4, rtol=1e-4)
    rows = torch.tensor([4, 1, 30])
    torch.testing.assert_close(view.logits(hs[-1], rows), out.logits[0][:, rows], atol=1e-4, rtol=1e-4)
    # unshifted decoder inputs give the same states
    dec_in = torch.cat([torch.tensor([[view.decoder_start_token_id]]), tgt[:, :-1]], 1)
    torch.testing.assert_close(view.hidden_states(src, dec_in, shift=False), hs)


def test_v10_full_equals_hf_generate(t5_v10_tiny):
    view = LayerwiseT5(t5_v10_tiny)
    for src in SOURCES[:2]:
        assert early_exit_generate(view, src, policy="full", max_new_tokens=12).tokens == \
            hf_generate(t5_v10_tiny, src, 12)


def test_session_steps_match_teacher_forcing(t5_view):
    """The incremental per-position states equal the teacher-forced ones at every layer."""
    src = SOURCES[0]
    res = early_exit_generate(t5_view, src, policy="full", max_new_tokens=8)
    hs = t5_view.hidden_states(torch.tensor([src]), torch.tensor([res.tokens]))
    with torch.inference_mode():
        session, first = t5_view.start(torch.tensor([src]), 8)
        assert first is None
        prev = t5_view.decoder_start_token_id
        for t, tok in enumerate(res.tokens):
            h = session.embed(prev)
            torch.testing.assert_close(h[0, 0], hs[0, t])
            for i in range(t5_view.num_layers):
                h = session.layer(i, h)
                torch.testing.assert_close(h[0, 0], hs[i + 1, t], atol=1e-5, rtol=1e-5)
            prev = tok


@pytest.mark.parametrize("src", SOURCES)
def test_static_last_layer_equals_full(t5_view, src):
    full = early_exit_generate(t5_view, src, policy="full", max_new_tokens=15)
    static = early_exit_generate(t5_view, src, policy="static", static_layer=t5_view.num_layers,
                                 max_new_tokens=15)
    assert static.tokens == full.tokens


@pytest.mark.parametrize("src", SOURCES)
def test_oracle_with_oracle_cache_never_changes_output(t5_view, src):
    full = early_exit_generate(t5_view, src, policy="full", max_new_tokens=15)
    oracle = early_exit_generate(t5_view, src, policy="oracle", oracle_cache=True, max_new_tokens=15)
    assert oracle.tokens == full.tokens
    assert 1 <= min(oracle.exit_layers) and max(oracle.exit_layers) <= t5_view.num_layers


def _session_after(view, config, src):
    return generate_with_session(view, EarlyExitDecoder(view, config), src)


@pytest.mark.parametrize("config", [
    ExitConfig(policy="static", static_layer=1, max_new_tokens=12),
    ExitConfig(policy="static", static_layer=2, max_new_tokens=12),
    ExitConfig(policy="oracle", max_new_tokens=12),
    ExitConfig(policy="confidence", measure="softmax_max", threshold=0.3, max_new_tokens=12),
    ExitConfig(policy="confidence", measure="softmax_diff", threshold=0.2, max_new_tokens=12),
    ExitConfig(policy="confidence", measure="state", threshold=0.5, max_new_tokens=12),
    ExitConfig(policy="confidence", measure="topk_diff", threshold=0.2, max_new_tokens=12, measure_kwargs={"k": 4}),
])
def test_every_layer_cache_holds_every_position(t5_view, config):
    res, session = _session_after(t5_view, config, SOURCES[2])
    # decoder inputs: decoder_start + every generated token but the last
    expected = len(res.tokens)
    assert session.cache.lengths == [expected] * t5_view.num_layers
    assert session.pos == expected


def test_propagated_cache_is_the_exited_states_kv(t5_view):
    """After a static exit at layer 1, layer j's cached K/V are its projections of the layer-1 state."""
    src = torch.tensor([SOURCES[0]])
    res, session = _session_after(t5_view, ExitConfig(policy="static", static_layer=1, max_new_tokens=6), src)
    v = t5_view
    with torch.inference_mode():
        fresh, _ = v.start(src, 6)
        prev = v.decoder_start_token_id
        for t, tok in enumerate(res.tokens[:-1]):
            h = v.layer(0, fresh.embed(prev), fresh.cache, fresh._bias, fresh.cross_kT[0], fresh.cross_v[0])
            for j in range(1, v.num_layers):
                sa = v.decoder.block[j].layer[0]  # the HF modules: layer norm, then k / v projections
                x = sa.layer_norm(h)
                k, val = sa.SelfAttention.k(x)[0, 0], sa.SelfAttention.v(x)[0, 0]
                torch.testing.assert_close(session.cache.k[j, 0, :, t].reshape(-1), k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(session.cache.v[j, 0, :, t].reshape(-1), val, atol=1e-5, rtol=1e-5)
                fresh.propagate(j, h)
            prev = tok


def test_confidence_exits_are_recorded(t5_view):
    res = early_exit_generate(t5_view, SOURCES[0], policy="confidence", measure="softmax_max",
                              threshold=0.0, max_new_tokens=10)
    # encoder-decoder: every token, including the first, is decoded with exits
    assert all(layer == 1 for layer in res.exit_layers)
    assert all(not math.isnan(c) for c in res.confidences)
    assert res.config["measure"]["name"] == "softmax_max"
    assert len(res.token_ms) == len(res.tokens) and res.prompt_ms > 0
    never = early_exit_generate(t5_view, SOURCES[0], policy="confidence", measure="softmax_diff",
                                threshold=1.0, max_new_tokens=10)
    full = early_exit_generate(t5_view, SOURCES[0], policy="full", max_new_tokens=10)
    assert never.tokens == full.tokens and set(never.exit_layers) == {t5_view.num_layers}


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="trained T5 checkpoint not there yet")
def test_trained_checkpoint_multi30k():
    from calm_utils.data import load_multi30k
    from calm_utils.t5_model import load_t5

    model, tok = load_t5(CKPT)
    view = LayerwiseT5(model, tok)
    data = load_multi30k("test_2016_flickr")
    for en in data["en"][:3]:
        src = tok(en, return_tensors="pt").input_ids
        full = early_exit_generate(view, src, policy="full", max_new_tokens=40)
        assert full.tokens == hf_generate(model, src, 40)
        assert full.text == tok.decode(full.tokens, skip_special_tokens=True)
        static = early_exit_generate(view, src, policy="static", static_layer=view.num_layers, max_new_tokens=40)
        assert static.tokens == full.tokens
        oracle = early_exit_generate(view, src, policy="oracle", oracle_cache=True, max_new_tokens=40)
        assert oracle.tokens == full.tokens
        conf = early_exit_generate(view, src, policy="confidence", measure="softmax_diff", threshold=0.5,
                                   max_new_tokens=40)
        assert len(conf.tokens) > 0 and all(1 <= x <= view.num_layers for x in conf.exit_layers)
