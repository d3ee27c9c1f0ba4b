"""Shared fixtures: a tiny random Llama (fast tests) and the real SmolLM2 (slow tests, still in CI)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calm_utils.layerwise import LayerwiseLM

torch.set_num_threads(1)  # CI machine has 2 cores; keep tests predictable


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    # Sharpen the random head so greedy paths are not dominated by near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = 2
    return model


@pytest.fixture(scope="session")
def tiny_view(tiny_model):
    return LayerwiseLM(tiny_model)


@pytest.fixture(scope="session")
def smollm():
    from calm_utils.model import load_model
    model, tok = load_model("smollm2-135m", device="cpu")
    return model, tok, LayerwiseLM(model, tok)


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=0)
    return out[0, ids.shape[1]:].tolist()
