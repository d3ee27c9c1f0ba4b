"""A layer-by-layer view of a Hugging Face decoder-only model (Llama, Qwen2, Mistral, SmolLM2).

Everything the early-exit decoder needs, and nothing of HF's ``generate``:

- ``embed(ids)``                    token ids -> layer-0 hidden states
- ``layer(i, h, cache, pos)``       run decoder layer ``i`` (0-based) on new positions, writing its K/V
- ``norm(h)`` / ``head(hn, rows)``  the final norm and the shared LM head (optionally only ``rows``)
- ``logits(h, rows)``               ``head(norm(h))``: any layer's prediction (CALM Sec. 3)
- ``propagate(i, h, cache, pos)``   CALM's state propagation: write layer ``i``'s K/V computed from
                                    an exited hidden state ``h`` (``only_propagate_state`` in flaxformer)
- ``new_cache(max_len)``            a pre-allocated KV cache (no per-token re-allocation)

Notebooks and the decoder use this module only; it is the one place that knows HF internals.
Layers are 0-based here (``i`` in ``0..L-1``); the study reports 1-based layer numbers
(layer ``i+1`` is the output of ``layers[i]``; layer 0 is the embedding).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(h: Tensor, norm) -> Tensor:
    """An HF RMSNorm module's formula (``w * h * rsqrt(mean(h^2) + eps)``, fp32 variance) as one fused kernel
    when everything is fp32; otherwise the module itself."""
    if h.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(h)


class KVCache:
    """Pre-allocated per-layer key/value buffers, duck-typed to HF's ``Cache.update``.

    Shapes: ``k[i]``/``v[i]`` are ``(1, n_kv_heads, max_len, head_dim)``; ``lengths[i]`` is how
    many positions layer ``i`` holds. HF attention calls ``update`` and attends over the returned
    prefix, so a layer sees exactly the positions written to it (computed or propagated).
    """

    def __init__(self, num_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, 1, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.max_len = max_len

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``key``/``value`` ``(1, H, n, D)`` to layer ``layer_idx``; return its full K/V."""
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer_idx, :, :, start:end] = key
        self.v[layer_idx, :, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def truncate(self, length: int) -> None:
        """Forget every position >= ``length`` in every layer (used by self-speculative decoding)."""
        self.lengths = [min(n, length) for n in self.lengths]


@dataclass
class Positions:
    """Rotary tables for positions ``start .. start+n-1`` (computed once per cache, sliced per step)."""
    cos: Tensor  # (1, n, head_dim)
    sin: Tensor  # (1, n, head_dim)


class LayerwiseLM:
    """Layer-wise view of a HF causal LM whose body is ``model.model`` with ``embed_tokens``,
    ``layers`` (each with ``input_layernorm`` and ``self_attn.{k,v}_proj``), ``norm`` and
    ``rotary_emb``, and whose head is ``model.lm_head``: the Llama family layout."""

    def __init__(self, model, tokenizer=None, lean: bool = True):
        body = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if body is None or not all(hasattr(body, a) for a in needed) or not hasattr(model, "lm_head"):
            raise TypeError(
                f"{type(model).__name__} does not have the Llama-family layout (model.model.embed_tokens/layers/"
                "norm/rotary_emb + lm_head) that LayerwiseLM needs; use a Llama, Qwen2, Mistral or SmolLM model."
            )
        self.model, self.tokenizer = model, tokenizer
        self.body, self.layers = body, body.layers
        cfg = model.config
        self.num_layers = len(self.layers)
        self.hidden_size = cfg.hidden_size
        self.vocab_size = model.lm_head.weight.shape[0]
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 2048
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_kv_heads = cfg.num_key_value_heads
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.head_weight = model.lm_head.weight  # (V, d)
        self.head_bias = getattr(model.lm_head, "bias", None)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self._rope_table: tuple[Tensor, Tensor] | None = None
        # Lean per-layer path (same weights, no copies): skips the HF modules' __call__/decorator/kwargs
        # overhead, which is a sizeable share of a 135M model's ~0.6 ms layer at batch 1. Used for the
        # Llama layout without QK-norm; anything else (or lean=False) calls the HF layer itself.
        self.lean = bool(lean) and not hasattr(attn, "q_norm") and not hasattr(attn, "k_norm") and all(
            hasattr(l, "mlp") and all(hasattr(l.mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            for l in self.layers)
        self._lean = [self._lean_weights(l) for l in self.layers] if self.lean else None

    @staticmethod
    def _lean_weights(layer) -> tuple:
        a, mlp = layer.self_attn, layer.mlp
        lin = lambda m: (m.weight, m.bias)
        return (layer.input_layernorm, a.q_proj.weight, a.q_proj.bias, lin(a.k_proj), lin(a.v_proj), lin(a.o_proj),
                layer.post_attention_layernorm, lin(mlp.gate_proj), lin(mlp.up_proj), lin(mlp.down_proj),
                mlp.act_fn, a.scaling)

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    # ---- caches and positions -------------------------------------------------------------
    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.num_layers, self.n_kv_heads, self.head_dim, max_len, self.dtype, self.device)

    def positions(self, start: int, n: int = 1) -> Positions:
        """Rotary cos/sin for positions ``start..start+n-1``, sliced from a table built once."""
        if self._rope_table is None or self._rope_table[0].shape[1] < start + n:
            size = max(start + n, 4096 if self.max_positions >= 4096 else self.max_positions)
            pos = torch.arange(size, device=self.device)[None]
            dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
            self._rope_table = self.body.rotary_emb(dummy, position_ids=pos)
        cos, sin = self._rope_table
        return Positions(cos[:, start:start + n], sin[:, start:start + n])

    # ---- the pieces of a forward pass -----------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """``ids`` (1, n) -> hidden (1, n, d)."""
        return self.body.embed_tokens(ids)

    def layer(self, i: int, h: Tensor, cache: KVCache, pos: Positions, mask: Tensor | None = None) -> Tensor:
        """Run decoder layer ``i`` (0-based) on ``h`` (1, n, d) at positions ``pos``; appends its K/V.

        Without ``mask``, several new positions (n > 1) are causal only from an *empty* cache (the prompt
        pass): attention uses SDPA's ``is_causal``, which aligns the mask top-left. Multi-position steps
        after a filled cache pass an explicit boolean ``mask`` (n, keys), True = attend
        (``calm_utils.lossless`` builds one).
        """
        if self._lean is None:
            am = None if mask is None else torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~mask, torch.finfo(h.dtype).min)[None, None]
            return self.layers[i](h, attention_mask=am, cache=cache, use_cache=True,
                                  position_embeddings=(pos.cos, pos.sin))
        ln1, wq, bq, (wk, bk), (wv, bv), (wo, bo), ln2, (wg, bg), (wu, bu), (wd, bd), act, scale = self._lean[i]
        n, hd = h.shape[1], self.head_dim
        x = _rms(h, ln1)
        q = F.linear(x, wq, bq).view(1, n, -1, hd).transpose(1, 2)
        k = F.linear(x, wk, bk).view(1, n, -1, hd).transpose(1, 2)
        v = F.linear(x, wv, bv).view(1, n, -1, hd).transpose(1, 2)
        q, k = self._rope(q, k, pos.cos, pos.sin)
        k, v = cache.update(k, v, i)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and n > 1, scale=scale,
                                           enable_gqa=True)
        h = h + F.linear(o.transpose(1, 2).reshape(1, n, -1), wo, bo)
        x = _rms(h, ln2)
        return h + F.linear(act(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)

    def norm(self, h: Tensor) -> Tensor:
        return self.body.norm(h)

    def head(self, hn: Tensor, rows: Tensor | None = None) -> Tensor:
        """Shared LM head on a normed state ``hn`` (..., d); ``rows`` (k,) restricts it to k tokens."""
        if rows is None:
            return F.linear(hn, self.head_weight, self.head_bias)
        bias = None if self.head_bias is None else self.head_bias[rows]
        return F.linear(hn, self.head_weight[rows], bias)

    def logits(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Prediction of any layer: final norm + shared head (CALM's shared-head early exit)."""
        return self.head(self.norm(h), rows)

    def propagate(self, i: int, h: Tensor, cache: KVCache, pos: Positions) -> None:
        """State propagation: layer ``i`` stores K/V computed from the exited state ``h`` (1, n, d)."""
        layer = self.layers[i]
        attn = layer.self_attn
        x = _rms(h, layer.input_layernorm) if self._lean is not None else layer.input_layernorm(h)
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):  # Qwen3-style QK-norm
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        _, k = self._rope(k, k, pos.cos, pos.sin)
        cache.update(k, v, i)

    # ---- a decoding session (the interface early-exit decoding uses) ------------------------
    def start(self, ids: Tensor, max_new_tokens: int) -> tuple["Session", Tensor]:
        """Prefill the prompt at full depth; return a session and the last prompt state (1, 1, d)."""
        cache = self.new_cache(ids.shape[1] + max_new_tokens)
        h = self.prefill(ids, cache)
        return Session(self, cache, ids.shape[1]), h

    # ---- whole passes -----------------------------------------------------------------------
    def prefill(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Run the prompt ``ids`` (1, T) through every layer; return the last position's state (1, 1, d)."""
        pos = self.positions(0, ids.shape[1])
        h = self.embed(ids)
        for i in range(self.num_layers):
            h = self.layer(i, h, cache, pos)
        return h[:, -1:]

    @torch.inference_mode()
    def hidden_states(self, ids: Tensor) -> Tensor:
        """Teacher-forced states of every layer: ``ids`` (1, T) -> (L+1, T, d), pre-norm, layer 0 = embedding."""
        cache = self.new_cache(ids.shape[1])
        pos = self.positions(0, ids.shape[1])
        h = self.embed(ids)
        out = [h[0]]
        for i in range(self.num_layers):
            h = self.layer(i, h, cache, pos)
            out.append(h[0])
        return torch.stack(out)


class Session:
    """One sequence being decoded: the cache and the position of the next input token.

    The decoder calls ``embed(token)`` (which also fixes this step's position), ``layer(i, h)``,
    ``propagate(i, h)`` for skipped layers, and ``rewind(i)`` to drop layer ``i``'s newest position.
    """

    def __init__(self, view: LayerwiseLM, cache: KVCache, pos: int):
        self.view, self.cache, self.pos = view, cache, pos
        self._p: Positions | None = None
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=view.device)  # reused: no per-token tensor

    def embed(self, token: int) -> Tensor:
        self._p = self.view.positions(self.pos)
        self.pos += 1
        self._ids.fill_(int(token))
        return self.view.embed(self._ids)

    def layer(self, i: int, h: Tensor) -> Tensor:
        return self.view.layer(i, h, self.cache, self._p)

    def propagate(self, i: int, h: Tensor) -> None:
        self.view.propagate(i, h, self.cache, self._p)

    def rewind(self, i: int) -> None:
        self.cache.lengths[i] -= 1
