"""Lossless self-speculative CALM (calm_utils.lossless): token-for-token equal to full greedy decoding
(ours and HF generate), and every layer's KV cache left as full decoding leaves it, including after
rejected drafts; on the tiny Llama, the tiny T5, and (slow) SmolLM2."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from calm_utils.decoding import EarlyExitDecoder, ExitConfig, generate_with_session
from calm_utils.heads import HeadMeasure, make_head
from calm_utils.layerwise import LayerwiseLM
from calm_utils.lossless import LosslessDecoder, lossless_generate, run_layers
from calm_utils.t5_layerwise import LayerwiseT5
from calm_utils.t5_model import build_t5, make_t5_config

torch.set_num_threads(1)

DRAFT_LENS = (1, 2, 4, 8)
THRESHOLDS = (0.0, 0.5, 0.9, 1.0)
N_NEW = 16


def _prompts(n, lo, hi, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(lo, hi, (1, length + j % 5), generator=g) for j in range(n)]


LLAMA_PROMPTS = _prompts(5, 3, 97, 3, 0)
T5_SOURCES = [p[0].tolist() + [1] for p in _prompts(5, 2, 50, 2, 1)]  # EOS-terminated encoder inputs

# measures for drafts: (name, ExitConfig kwargs); thresholds are applied to the confidence ones
MEASURES = {
    "softmax_diff": dict(policy="confidence", measure="softmax_diff"),
    "topk_diff": dict(policy="confidence", measure="topk_diff", measure_kwargs={"k": 8}),
    "state": dict(policy="confidence", measure="state"),
}


@pytest.fixture(scope="module")
def t5_tiny():
    torch.manual_seed(0)
    cfg = make_t5_config(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=4,
                         vocab_size=50)
    model = build_t5(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def t5_view(t5_tiny):
    return LayerwiseT5(t5_tiny)


def _hf_llama(model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=0, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def _hf_t5(model, src, n):
    with torch.inference_mode():
        out = model.generate(torch.as_tensor([src]), do_sample=False, num_beams=1, max_new_tokens=n,
                             min_new_tokens=0, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    out = out[0, 1:].tolist()
    return out[:out.index(1) + 1] if 1 in out else out


def _full_with_cache(view, prompt, n):
    """Our full greedy decoding, and the session it leaves (captured from ``view.start``)."""
    return generate_with_session(view, EarlyExitDecoder(view, ExitConfig(policy="full", max_new_tokens=n)), prompt)


def _assert_same_cache(a, b):
    assert a.lengths == b.lengths
    for i, n in enumerate(a.lengths):
        torch.testing.assert_close(a.k[i, :, :, :n], b.k[i, :, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.v[i, :, :, :n], b.v[i, :, :, :n], atol=1e-5, rtol=1e-4)


def _sweep(view, prompts, ref, measure_kwargs, check_cache=None, **extra):
    """Every (prompt, draft length, threshold): tokens == ref; returns summed stats."""
    tot = dict(drafted=0, accepted=0, passes=0, exact=0)
    for j, p in enumerate(prompts):
        for n in DRAFT_LENS:
            for th in THRESHOLDS:
                dec = LosslessDecoder(view, ExitConfig(threshold=th, max_new_tokens=N_NEW, **measure_kwargs), n,
                                      **extra)
                res = dec.generate(p)
                assert res.tokens == ref[j], (j, n, th)
                assert len(res.exit_layers) == len(res.tokens) == len(res.confidences) == len(res.token_ms)
                assert res.accepted <= res.drafted and sum(res.accepted_per_pass) == res.accepted
                assert len(res.draft_exit_layers) == res.drafted
                if (th == 1.0 and measure_kwargs.get("policy") == "confidence" and extra.get("max_draft_layer") is None
                        and "state" != measure_kwargs.get("measure")):
                    assert res.verify_passes == 0  # never confident: plain full decoding
                if check_cache is not None:
                    _assert_same_cache(dec.session.cache, check_cache[j].cache)
                tot["drafted"] += res.drafted
                tot["accepted"] += res.accepted
                tot["passes"] += res.verify_passes
                tot["exact"] += res.exact_steps
    return tot


# ---- decoder-only (tiny Llama) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_ref(tiny_model, tiny_view):
    refs = [_full_with_cache(tiny_view, p, N_NEW) for p in LLAMA_PROMPTS]
    for p, (res, _) in zip(LLAMA_PROMPTS, refs):
        assert res.tokens == _hf_llama(tiny_model, p, N_NEW)  # our full == HF generate
    return [r.tokens for r, _ in refs], [s for _, s in refs]


@pytest.mark.parametrize("measure", list(MEASURES))
def test_llama_identical_and_cache(tiny_view, llama_ref, measure):
    ref, sessions = llama_ref
    tot = _sweep(tiny_view, LLAMA_PROMPTS, ref, MEASURES[measure], check_cache=sessions)
    assert tot["passes"] > 0 and tot["drafted"] > tot["accepted"]  # drafts were verified and some rejected
    if measure != "state":
        assert tot["exact"] > 0


@pytest.mark.parametrize("reuse,adaptive,max_layer", [(False, True, None), (True, False, None), (False, False, None),
                                                      (True, True, 2), (True, False, 3)])
def test_llama_variants(tiny_view, llama_ref, reuse, adaptive, max_layer):
    ref, sessions = llama_ref
    tot = _sweep(tiny_view, LLAMA_PROMPTS[:3], ref[:3], MEASURES["softmax_diff"], check_cache=sessions[:3],
                 reuse_draft_layers=reuse, adaptive=adaptive, max_draft_layer=max_layer)
    assert tot["drafted"] > tot["accepted"]


@pytest.mark.parametrize("layer", [1, 3, 6])
def test_llama_static_drafts(tiny_view, llama_ref, layer):
    """LayerSkip-style fixed exit layer; layer L = plain full decoding (no verification at all)."""
    ref, sessions = llama_ref
    for j, p in enumerate(LLAMA_PROMPTS[:3]):
        for n in DRAFT_LENS:
            dec = LosslessDecoder(tiny_view, ExitConfig(policy="static", static_layer=layer, max_new_tokens=N_NEW), n)
            res = dec.generate(p)
            assert res.tokens == ref[j]
            _assert_same_cache(dec.session.cache, sessions[j].cache)
            if layer == tiny_view.num_layers:
                assert res.verify_passes == 0 and res.exact_steps == len(res.tokens) - 1
            else:
                assert all(e == layer for e in res.draft_exit_layers)


@pytest.mark.parametrize("vocab", [list(range(3, 40)), list(range(20, 97, 2))])
def test_draft_vocab(tiny_view, llama_ref, t5_view, t5_ref, vocab):
    """A restricted draft vocabulary (even one missing most of the right tokens) keeps the output exact."""
    for view, prompts, (ref, sessions) in ((tiny_view, LLAMA_PROMPTS[:3], llama_ref), (t5_view, T5_SOURCES[:3], t5_ref)):
        v = [t for t in vocab if t < view.vocab_size]
        for j, p in enumerate(prompts):
            for n, cfg in ((4, dict(policy="static", static_layer=1)), (8, dict(measure="topk_diff", threshold=0.3,
                                                                                 measure_kwargs={"k": 4}))):
                dec = LosslessDecoder(view, ExitConfig(max_new_tokens=N_NEW, **cfg), n, draft_vocab=v)
                res = dec.generate(p)
                assert res.tokens == ref[j]
                _assert_same_cache(dec.session.cache, sessions[j].cache)
                allowed = set(v) | set(view.eos_ids) | set(torch.as_tensor(p).reshape(-1).tolist())
                drafted = [t for t, e in zip(res.tokens, res.exit_layers) if e < view.num_layers]
                assert set(drafted) <= allowed and res.config["draft_vocab"] == len(set(v))


def test_draft_vocab_too_small(t5_view):
    dec = LosslessDecoder(t5_view, ExitConfig(measure="topk_diff", threshold=0.3, measure_kwargs={"k": 8}),
                          draft_vocab=[3])
    with pytest.raises(ValueError, match="draft vocabulary"):
        dec.generate([4, 1])


def test_frequent_tokens():
    from calm_utils.lossless import frequent_tokens

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}
    assert frequent_tokens(Tok(), ["1 2 2 3 3 3", "3 2"], 2) == [3, 2]


def test_llama_learned_head(tiny_view, llama_ref):
    ref, sessions = llama_ref
    for kind in ("linear", "attention"):
        torch.manual_seed(0)
        head = make_head(kind, tiny_view.hidden_size, tiny_view.num_layers)
        for j, p in enumerate(LLAMA_PROMPTS[:3]):
            for n in (2, 8):
                for th in (0.3, 0.5, 0.7):
                    dec = LosslessDecoder(tiny_view, ExitConfig(threshold=th, max_new_tokens=N_NEW), n,
                                          measure=HeadMeasure(head))
                    res = dec.generate(p)
                    assert res.tokens == ref[j]
                    _assert_same_cache(dec.session.cache, sessions[j].cache)
                    assert res.config["measure"]["name"] == kind and res.config["mode"] == "lossless"


def test_llama_stats_and_eos(tiny_view):
    """Drafting at layer 1 always: every verified token is counted; the first token comes from the prompt."""
    p = LLAMA_PROMPTS[0]
    res = lossless_generate(tiny_view, p, draft_len=4, policy="confidence", measure="softmax_diff", threshold=0.0,
                            max_new_tokens=N_NEW)
    assert res.exit_layers[0] == tiny_view.num_layers and res.exact_steps == 0
    assert all(e == 1 for e in res.draft_exit_layers) and res.avg_draft_exit_layer == 1.0
    assert res.verify_passes == len(res.accepted_per_pass) >= math.ceil((len(res.tokens) - 1) / 5)
    assert 0 <= res.acceptance_rate <= 1 and res.stats()["tokens"] == len(res.tokens)
    # max_new_tokens = 1 and 2: no drafting beyond the budget
    for n in (1, 2):
        full = EarlyExitDecoder(tiny_view, ExitConfig(policy="full", max_new_tokens=n)).generate(p)
        assert lossless_generate(tiny_view, p, draft_len=8, threshold=0.0, max_new_tokens=n).tokens == full.tokens


@pytest.mark.parametrize("lean", [True, False])
def test_multi_position_pass_matches_teacher_forcing(tiny_model, lean):
    """run_layers on positions appended to a filled cache (bottom-right causal mask) equals the teacher-forced
    states, on the lean layer path and on the HF layer modules."""
    view = LayerwiseLM(tiny_model, lean=lean)
    ids = LLAMA_PROMPTS[1]
    T = ids.shape[1]
    hs = view.hidden_states(ids)
    with torch.inference_mode():
        session, _ = view.start(ids[:, :2], T)
        h = run_layers(view, session, view.embed(ids[:, 2:]), 2, 0, view.num_layers)
    torch.testing.assert_close(h[0], hs[-1, 2:], atol=1e-5, rtol=1e-4)


def test_rejects_bad_arguments(tiny_view):
    with pytest.raises(ValueError, match="policy"):
        LosslessDecoder(tiny_view, ExitConfig(policy="oracle"))
    with pytest.raises(ValueError, match="draft_len"):
        LosslessDecoder(tiny_view, ExitConfig(), draft_len=0)
    with pytest.raises(ValueError, match="max_draft_layer"):
        LosslessDecoder(tiny_view, ExitConfig(), max_draft_layer=tiny_view.num_layers + 1)


# ---- encoder-decoder (tiny T5) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_ref(t5_tiny, t5_view):
    refs = [_full_with_cache(t5_view, s, N_NEW) for s in T5_SOURCES]
    for s, (res, _) in zip(T5_SOURCES, refs):
        assert res.tokens == _hf_t5(t5_tiny, s, N_NEW)
    return [r.tokens for r, _ in refs], [s for _, s in refs]


@pytest.mark.parametrize("measure", list(MEASURES))
def test_t5_identical_and_cache(t5_view, t5_ref, measure):
    ref, sessions = t5_ref
    tot = _sweep(t5_view, T5_SOURCES, ref, MEASURES[measure], check_cache=sessions)
    assert tot["passes"] > 0 and tot["drafted"] > tot["accepted"]


def test_t5_static_and_no_reuse(t5_view, t5_ref):
    ref, sessions = t5_ref
    for j, s in enumerate(T5_SOURCES[:3]):
        for n in DRAFT_LENS:
            for layer in (1, 2):
                for reuse in (True, False):
                    dec = LosslessDecoder(t5_view, ExitConfig(policy="static", static_layer=layer,
                                                              max_new_tokens=N_NEW), n, reuse_draft_layers=reuse)
                    assert dec.generate(s).tokens == ref[j]
                    _assert_same_cache(dec.session.cache, sessions[j].cache)


def test_t5_max_draft_layer(t5_view, t5_ref):
    ref, sessions = t5_ref
    tot = _sweep(t5_view, T5_SOURCES[:3], ref[:3], MEASURES["topk_diff"], check_cache=sessions[:3], max_draft_layer=2)
    assert tot["passes"] > 0 and tot["exact"] == 0  # never past layer 2: every token is drafted and verified


def test_t5_first_token_is_drafted(t5_view):
    """Encoder-decoder: no prompt pass predicts a token; the first target token is drafted too."""
    res = lossless_generate(t5_view, T5_SOURCES[0], draft_len=4, threshold=0.0, max_new_tokens=N_NEW)
    assert res.verify_passes >= 1 and res.draft_exit_layers[0] == 1


def test_hf_assistant_early_exit_llama(tiny_model):
    """HF's LayerSkip-style self-speculation (the baseline) runs on Llama in transformers 5.x, lossless."""
    for p in LLAMA_PROMPTS[:2]:
        with torch.inference_mode():
            out = tiny_model.generate(p, max_new_tokens=N_NEW, do_sample=False, assistant_early_exit=2,
                                      pad_token_id=0, attention_mask=torch.ones_like(p))
        assert out[0, p.shape[1]:].tolist() == _hf_llama(tiny_model, p, N_NEW)


# ---- real model (slow) ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_two_prompts(smollm):
    from calm_utils.model import encode_chat
    model, tok, view = smollm
    texts = ["What is the capital of France? Answer in one sentence.",
             "Summarize: The mitochondria is the organelle that produces most of the cell's energy."]
    for text in texts:
        ids = encode_chat(tok, text)
        full, session = _full_with_cache(view, ids, 24)
        with torch.inference_mode():
            hf = model.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
        hf = hf[0, ids.shape[1]:].tolist()
        assert full.tokens == hf[:len(full.tokens)]
        for cfg, n in ((dict(measure="softmax_diff", threshold=0.9, min_exit_layer=20), 4),
                       (dict(policy="static", static_layer=24), 8)):
            dec = LosslessDecoder(view, ExitConfig(max_new_tokens=24, **cfg), n)
            res = dec.generate(ids)
            assert res.tokens == full.tokens
            _assert_same_cache(dec.session.cache, session.cache)


def test_hf_assistant_early_exit_t5_unsupported(t5_tiny):
    """transformers 5.25: EarlyExitCandidateGenerator looks up ``model.<base_model_prefix>`` ('transformer'),
    which T5ForConditionalGeneration does not have: HF's early-exit self-speculation does not run on T5."""
    with pytest.raises(AttributeError, match="transformer"), torch.inference_mode():
        t5_tiny.generate(torch.tensor([T5_SOURCES[0]]), max_new_tokens=4, do_sample=False, assistant_early_exit=2,
                         cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))


def test_compare_lossless_tiny(tiny_model, tiny_view):
    from calm_utils.lossless import Method, compare_lossless
    methods = [Method("hf_generate", "greedy", "hf"), Method("ours_full", "full", "full", ExitConfig(policy="full")),
               Method("calm_lossy", "sd@0", "lossy", ExitConfig(threshold=0.0)),
               Method("lossless", "sd@0,n=4", "lossless", ExitConfig(threshold=0.0), draft_len=4),
               Method("hf_assistant_early_exit", "E=2", "hf_early_exit", layer=2)]
    runs, summ = compare_lossless(tiny_model, tiny_view, LLAMA_PROMPTS[:2], methods, 8, repeats=1, log=lambda s: None)
    assert len(runs) == 2 * len(methods)
    s = summ.set_index("method")
    assert s.loc[["hf_generate", "ours_full", "lossless", "hf_assistant_early_exit"], "identical"].all()
    assert 0 <= s.loc["lossless", "acceptance"] <= 1 and s.loc["hf_generate", "speedup"] == 1.0
    assert {"model", "method", "setting", "speedup", "acceptance", "identical"} <= set(summ.columns)
