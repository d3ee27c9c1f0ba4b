"""A small T5 v1.1-style EN->FR backbone trained with CALM's per-layer loss.

Every decoder layer i predicts through the *same* final RMSNorm + LM head as the last layer
(CALM, Schuster et al. 2022, sec. 3 / "Training"): logits_i = lm_head(final_layer_norm(h_i)).

transformers 5.25 quirks handled here (see tests/test_train.py):
- ``T5Config(tie_word_embeddings=False)`` is silently turned into ``tie_word_embeddings=True``
  (plus ``scale_decoder_outputs=False``), i.e. the LM head would be tied to the input
  embeddings. We set ``tie_word_embeddings=False`` *after* construction to get T5 v1.1's untied
  head, and load checkpoints with :func:`load_t5` (``from_pretrained`` would re-tie them).
- With ``scale_decoder_outputs=False`` the model's logits are ``lm_head(final_norm(h_L))``, no
  ``d_model**-0.5`` rescale, and no dropout (dropout_rate=0), so intermediate layers use exactly
  the same path.
- ``decoder_hidden_states`` has L+1 entries: [0] the embeddings, [i] the output of block i for
  i < L, and [L] the output of block L *after* ``final_layer_norm`` (HF overwrites the last entry
  with ``last_hidden_state``). So layers 1..L-1 get the final norm here and layer L does not.
- The untied ``lm_head`` is initialised with std 1.0, giving an initial CE near 30; we re-init
  it with std d_model**-0.5 (initial CE ~ ln V).
- ``generate`` with num_layers != num_decoder_layers needs an explicit EncoderDecoderCache.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

PAD, EOS = 0, 1


def make_t5_config(d_model: int = 256, d_ff: int = 1024, num_heads: int = 4, d_kv: int = 64,
                   num_layers: int = 3, num_decoder_layers: int = 8, vocab_size: int = 8000,
                   dropout_rate: float = 0.0) -> T5Config:
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
                   num_layers=num_layers, num_decoder_layers=num_decoder_layers,
                   feed_forward_proj="gated-gelu", dropout_rate=dropout_rate,
                   pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    cfg.tie_word_embeddings = False  # T5 v1.1: untied head (must be set after __post_init__)
    cfg.scale_decoder_outputs = False  # v1.1: no d_model**-0.5 rescale before the head
    return cfg


def build_t5(cfg: T5Config) -> T5ForConditionalGeneration:
    """A freshly initialised model (seed beforehand) with the LM head at std d_model**-0.5."""
    assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
    model = T5ForConditionalGeneration(cfg)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr(), "lm_head is tied"
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, cfg.d_model ** -0.5)
    return model


def layer_state(model: T5ForConditionalGeneration, hidden_states: tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
    """Decoder layer i's (1-based) state as the LM head sees it: (B, T, d) -> (B, T, d)."""
    L = model.config.num_decoder_layers
    assert 1 <= i <= L and len(hidden_states) == L + 1
    h = hidden_states[i]
    if i < L:  # entry L already went through final_layer_norm (and dropout, which is 0 / eval)
        h = model.decoder.final_layer_norm(h)
    if model.config.scale_decoder_outputs:  # never for our configs; kept to mirror HF's forward
        h = h * model.config.d_model ** -0.5
    return h


def layer_logits(model: T5ForConditionalGeneration, hidden_states: tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
    """Logits of decoder layer i (1-based) from ``decoder_hidden_states``: (B, T, d) -> (B, T, V)."""
    return model.lm_head(layer_state(model, hidden_states, i))


def layer_weights(L: int, weighting: str) -> torch.Tensor:
    """CALM's weights w_i proportional to i ('linear'), or only the last layer ('last')."""
    if weighting == "linear":
        w = torch.arange(1, L + 1, dtype=torch.float32)
    elif weighting == "last":
        w = torch.zeros(L)
        w[-1] = 1.0
    else:
        raise ValueError(weighting)
    return w / w.sum()


def calm_loss(model: T5ForConditionalGeneration, batch: dict[str, torch.Tensor],
              weighting: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, per-layer CE (L,) detached). ``batch``: input_ids, attention_mask (B, S),
    labels (B, T) with -100 at padding. Layers with zero weight are not computed (CE = nan).

    Runs encoder and decoder directly (same computation as ``model(...)``, tested) so that the
    LM head, the dominant cost with V=8k, is applied only to the N non-padding target positions."""
    L = model.config.num_decoder_layers
    w = layer_weights(L, weighting)
    labels = batch["labels"]  # (B, T)
    enc = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    dec = model.decoder(input_ids=model._shift_right(labels), encoder_hidden_states=enc,
                        encoder_attention_mask=batch["attention_mask"], use_cache=False,
                        output_hidden_states=True)
    keep = labels != -100  # (B, T)
    target = labels[keep]  # (N,)
    losses = []
    for i in range(1, L + 1):
        if w[i - 1] == 0:
            losses.append(torch.tensor(float("nan")))
            continue
        logits = model.lm_head(layer_state(model, dec.hidden_states, i)[keep])  # (N, V)
        losses.append(F.cross_entropy(logits, target))
    per_layer = torch.stack(losses)  # (L,)
    loss = sum(w[i] * per_layer[i] for i in range(L) if w[i] > 0)
    return loss, per_layer.detach()


@torch.no_grad()
def greedy_translate(model: T5ForConditionalGeneration, tok, sources: list[str], batch_size: int = 64,
                     max_new_tokens: int = 64) -> list[str]:
    """Greedy full-model decoding (HF generate), detokenised."""
    outs = []
    for s in range(0, len(sources), batch_size):
        enc = tok(sources[s:s + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128)
        gen = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
        outs += tok.batch_decode(gen, skip_special_tokens=True)
    return outs


def load_t5(path: str | Path) -> tuple[T5ForConditionalGeneration, "PreTrainedTokenizerFast"]:
    """(model in eval mode, tokenizer) from a training output dir (config.json + model.safetensors)."""
    from .tokenizer import TOKENIZER_DIR, load_tokenizer
    path = Path(path)
    cfg_dict = json.loads((path / "config.json").read_text())
    cfg = make_t5_config(**{k: cfg_dict[k] for k in ("d_model", "d_ff", "num_heads", "d_kv", "num_layers",
                                                     "num_decoder_layers", "vocab_size", "dropout_rate")})
    model = T5ForConditionalGeneration(cfg)
    load_model(model, str(path / "model.safetensors"))  # strict; handles the shared embeddings
    tok = load_tokenizer(path if (path / "tokenizer.json").exists() else TOKENIZER_DIR)
    return model.eval(), tok


def export_half(path: str | Path) -> Path:
    """Rewrite ``path/model.safetensors`` with fp16 storage (halves the committed checkpoint's size).

    ``load_t5`` casts the weights back to the fp32 model on load; every number in the study is
    computed from the committed (fp16-stored) weights. Writes atomically; idempotent.
    """
    from .utils import atomic_write
    path = Path(path)
    model, _ = load_t5(path)
    model.half()
    atomic_write(path / "model.safetensors", lambda p: save_model(model, str(p)))
    return path / "model.safetensors"
