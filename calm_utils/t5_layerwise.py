"""A layer-by-layer view of a Hugging Face T5 encoder-decoder (T5 / T5 v1.1 layout), for CALM.

The encoder-decoder counterpart of :class:`calm_utils.layerwise.LayerwiseLM`, with the same
interface, so that ``EarlyExitDecoder(LayerwiseT5(model, tok), ExitConfig(...)).generate(src_ids)``
works unchanged with every policy and confidence measure:

- ``start(src_ids, max_new_tokens)``  runs the encoder once at full depth (CALM never exits in the
  encoder), precomputes every decoder layer's cross-attention K/V and pre-allocates the decoder's
  self-attention K/V; returns ``(session, None)``: the first target token is decoded layer by layer
  (with exits) from ``decoder_start_token_id`` like every other token.
- ``Session.embed / layer / propagate / rewind``  one decoder position at a time (see :class:`T5Session`).
- ``norm(h)`` / ``head(hn, rows)`` / ``logits(h, rows)``  the decoder's final RMSNorm (+ the
  ``d_model**-0.5`` rescale where the model applies one) and the shared LM head.
- ``hidden_states(src_ids, tgt_ids)``  teacher-forced pre-norm decoder states of every layer.

The decoder blocks are computed here from the HF modules' weights (a few matmuls per block) rather
than through ``T5Block.forward``: batch size 1, one query position, no masks, no dropout (eval), no
per-call cache objects. The computation is the same as HF's eager T5 (no ``1/sqrt(d_kv)`` scaling,
relative position bias from decoder layer 0 shared by all layers, none in cross-attention); the
tests check it token for token against ``model.generate``. fp16 overflow clamping (HF clamps
activations in float16 only) is not reproduced. The fused self-attention Q/K/V and cross-attention K/V
matrices are copies made at construction: build a new view after changing the model's weights.

Layers are 0-based in code (``i`` in ``0..L-1``), 1-based in the study's reports (layer 0 = embedding).
Shapes: ``d`` = d_model, ``H`` = num_heads, ``dk`` = d_kv, ``S`` = source length, ``V`` = vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layerwise import KVCache


def _rms(h: Tensor, w: Tensor, eps: float) -> Tensor:
    """T5LayerNorm: ``w * h / sqrt(mean(h^2) + eps)``, variance in float32, no mean, no bias."""
    if h.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), w, eps)  # the same formula, one fused kernel
    var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        h = h.to(w.dtype)
    return w * h


class _Block:
    """Weights of one decoder block (T5Block: self-attention, cross-attention, feed-forward)."""

    __slots__ = ("ln_sa", "w_qkv", "w_kv", "w_o", "ln_ca", "wq_c", "wk_c", "wv_c", "wo_c",
                 "ln_ff", "wi0", "wi1", "wi", "wo", "act", "sa_norm_eps", "ca_norm_eps", "ff_norm_eps")

    def __init__(self, block):
        sa, ca, ff = block.layer[0], block.layer[1], block.layer[-1]
        att = sa.SelfAttention
        self.ln_sa, self.sa_norm_eps = sa.layer_norm.weight, sa.layer_norm.variance_epsilon
        # fused Q/K/V (3*H*dk, d); K/V rows are a view of it (used by state propagation)
        self.w_qkv = torch.cat([att.q.weight, att.k.weight, att.v.weight], 0).detach()
        self.w_kv = self.w_qkv[att.q.weight.shape[0]:]
        self.w_o = att.o.weight
        cross = ca.EncDecAttention
        self.ln_ca, self.ca_norm_eps = ca.layer_norm.weight, ca.layer_norm.variance_epsilon
        self.wq_c, self.wk_c, self.wv_c, self.wo_c = cross.q.weight, cross.k.weight, cross.v.weight, cross.o.weight
        dense = ff.DenseReluDense
        self.ln_ff, self.ff_norm_eps = ff.layer_norm.weight, ff.layer_norm.variance_epsilon
        self.act = dense.act
        self.wo = dense.wo.weight
        if hasattr(dense, "wi_0"):  # gated (T5 v1.1): wo(act(wi_0 x) * wi_1 x)
            self.wi0, self.wi1, self.wi = dense.wi_0.weight, dense.wi_1.weight, None
        else:  # original T5: wo(act(wi x))
            self.wi0 = self.wi1 = None
            self.wi = dense.wi.weight


class LayerwiseT5:
    """Layer-wise view of a ``T5ForConditionalGeneration`` (``encoder``, ``decoder.block[i].layer =
    [T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF]``, ``decoder.final_layer_norm``, ``lm_head``).

    Attributes:
        num_layers: decoder layers ``L`` (the exits are in the decoder; the encoder always runs whole).
        vocab_size, hidden_size (= d_model), num_heads, d_kv.
        eos_ids: set of ids that end a sequence; decoder_start_token_id: the first decoder input.
        max_positions: ``None`` (relative positions: no length limit).
        head_weight / head_bias: the LM head (V, d) / None.
    """

    max_positions = None

    def __init__(self, model, tokenizer=None):
        dec = getattr(model, "decoder", None)
        if (dec is None or not hasattr(model, "encoder") or not hasattr(model, "lm_head")
                or not hasattr(dec, "block") or not hasattr(dec, "final_layer_norm")):
            raise TypeError(f"{type(model).__name__} does not have the T5 layout (encoder, decoder.block, "
                            "decoder.final_layer_norm, lm_head) that LayerwiseT5 needs")
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()): the layer-wise view has no dropout")
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.config = cfg
        self.num_layers = len(dec.block)
        self.hidden_size = cfg.d_model
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.inner = self.num_heads * self.d_kv
        self.head_weight = model.lm_head.weight  # (V, d)
        self.head_bias = getattr(model.lm_head, "bias", None)
        self.vocab_size = self.head_weight.shape[0]
        # T5 (v1.0) rescales the decoder output by d_model**-0.5 before a tied head; v1.1 does not.
        # transformers 5.x records this as `scale_decoder_outputs` (it forces tie_word_embeddings=True
        # in the config); older versions use tie_word_embeddings itself.
        scale = getattr(cfg, "scale_decoder_outputs", None)
        if scale is None:
            scale = bool(cfg.tie_word_embeddings)
        self.output_scale = cfg.d_model ** -0.5 if scale else None
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = cfg.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        start = getattr(gen, "decoder_start_token_id", None)
        self.decoder_start_token_id = int(start if start is not None else
                                          (cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None
                                           else cfg.pad_token_id))
        self.encoder, self.decoder = model.encoder, dec
        self.embed_weight = dec.embed_tokens.weight  # (V, d)
        self.final_norm_weight = dec.final_layer_norm.weight
        self.final_norm_eps = dec.final_layer_norm.variance_epsilon
        self.blocks = [_Block(b) for b in dec.block]
        # all layers' cross-attention K and V projections fused: (2*L*H*dk, d) (a copy, see module doc)
        self._w_cross_kv = torch.cat([b.wk_c for b in self.blocks] + [b.wv_c for b in self.blocks], 0).detach()
        att0 = dec.block[0].layer[0].SelfAttention
        self._rel_att = att0  # holds relative_attention_bias + the bucket function
        self._bias_table: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    # ---- relative position bias ---------------------------------------------------------------
    def bias_table(self, n: int) -> Tensor:
        """Decoder self-attention bias by distance, reversed: (H, D) with D >= n, where column
        ``D-1-k`` is the bias for a key ``k`` positions before the query. The bias row of query
        position ``p`` over keys ``0..p`` is the view ``table[:, D-1-p:]`` (no copy, no per-step work).
        Built once per view (from decoder layer 0's ``relative_attention_bias``), grown when needed."""
        if self._bias_table is None or self._bias_table.shape[1] < n:
            size = max(n, 512)
            att = self._rel_att
            rel = torch.arange(size, device=self.device) - (size - 1)  # key - query: -(size-1) .. 0
            buckets = att._relative_position_bucket(rel, bidirectional=False,
                                                    num_buckets=att.relative_attention_num_buckets,
                                                    max_distance=att.relative_attention_max_distance)
            with torch.no_grad():
                self._bias_table = att.relative_attention_bias(buckets).T.contiguous().to(self.dtype)  # (H, size)
        return self._bias_table

    def position_bias(self, start: int, n: int = 1, keys: int | None = None) -> Tensor:
        """Bias for queries at positions ``start..start+n-1`` over keys ``0..keys-1`` (default
        ``start+n``): (1, H, n, keys), with ``-inf`` on future keys (causal mask folded in)."""
        keys = start + n if keys is None else keys
        table = self.bias_table(max(keys, start + n))
        D = table.shape[1]
        if n == 1 and keys == start + 1:
            return table[None, :, None, D - 1 - start:]
        q = torch.arange(start, start + n, device=self.device)[:, None]
        k = torch.arange(keys, device=self.device)[None, :]
        idx = (k - q + D - 1).clamp(max=D - 1)  # (n, keys)
        bias = table[:, idx][None]  # (1, H, n, keys)
        return bias.masked_fill((k > q)[None, None], float("-inf"))

    # ---- the pieces of a forward pass ---------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Decoder input ids (1, n) -> layer-0 states (1, n, d) (shared embedding, no scaling)."""
        return F.embedding(ids, self.embed_weight)

    def norm(self, h: Tensor) -> Tensor:
        """The state as the LM head sees it: decoder final RMSNorm (+ ``d_model**-0.5`` for T5 v1.0),
        (..., d) -> (..., d)."""
        hn = _rms(h, self.final_norm_weight, self.final_norm_eps)
        return hn * self.output_scale if self.output_scale is not None else hn

    def head(self, hn: Tensor, rows: Tensor | None = None) -> Tensor:
        """Shared LM head on a normed state ``hn`` (..., d) -> (..., V), or (..., k) for ``rows`` (k,)."""
        if rows is None:
            return F.linear(hn, self.head_weight, self.head_bias)
        bias = None if self.head_bias is None else self.head_bias[rows]
        return F.linear(hn, self.head_weight[rows], bias)

    def logits(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Prediction of any decoder layer from its pre-norm state ``h`` (..., d): ``head(norm(h), rows)``.
        At the last layer this is the model's own logits."""
        return self.head(self.norm(h), rows)

    def encode(self, src_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full-depth encoder: ``src_ids`` (1, S) -> encoder output (1, S, d) (after its final norm)."""
        return self.encoder(input_ids=src_ids, attention_mask=attention_mask).last_hidden_state

    def cross_kv(self, enc: Tensor) -> tuple[Tensor, Tensor]:
        """Every decoder layer's cross-attention keys (transposed) and values from the encoder output
        ``enc`` (1, S, d): ``kT`` (L, 1, H, dk, S) and ``v`` (L, 1, H, S, dk)."""
        L, H, dk, S = self.num_layers, self.num_heads, self.d_kv, enc.shape[1]
        kv = F.linear(enc[0], self._w_cross_kv)  # (S, 2*L*H*dk): one matmul for all layers
        k = kv[:, :L * self.inner].view(S, L, H, dk)
        v = kv[:, L * self.inner:].view(S, L, H, dk)
        kT = k.permute(1, 2, 3, 0).contiguous().unsqueeze(1)  # (L, 1, H, dk, S)
        v = v.permute(1, 2, 0, 3).contiguous().unsqueeze(1)  # (L, 1, H, S, dk)
        return kT, v

    def new_cache(self, max_len: int) -> KVCache:
        """Pre-allocated decoder self-attention K/V: (L, 1, H, max_len, dk) each."""
        return KVCache(self.num_layers, self.num_heads, self.d_kv, max_len, self.dtype, self.device)

    def layer(self, i: int, h: Tensor, cache: KVCache, bias: Tensor, cross_kT: Tensor, cross_v: Tensor,
              cross_mask: Tensor | None = None) -> Tensor:
        """Decoder block ``i`` on ``h`` (1, n, d) at the next ``n`` positions of ``cache`` (appends its
        K/V). ``bias`` (1, H, n, keys): relative position bias incl. causal mask; ``cross_kT`` (1, H, dk, S),
        ``cross_v`` (1, H, S, dk); ``cross_mask`` (1, 1, 1, S) additive or None. Returns (1, n, d)."""
        b = self.blocks[i]
        n, H, dk, inner = h.shape[1], self.num_heads, self.d_kv, self.inner
        # self-attention (T5: no 1/sqrt(dk) scaling; bias added to the scores)
        x = _rms(h, b.ln_sa, b.sa_norm_eps)
        qkv = F.linear(x, b.w_qkv)  # (1, n, 3*inner)
        if n == 1:
            q = qkv[..., :inner].view(1, H, 1, dk)
            k = qkv[..., inner:2 * inner].view(1, H, 1, dk)
            v = qkv[..., 2 * inner:].view(1, H, 1, dk)
        else:
            q, k, v = (t.reshape(1, n, H, dk).transpose(1, 2) for t in qkv.split(inner, -1))
        K, Vv = cache.update(k, v, i)
        a = torch.softmax(torch.matmul(q, K.transpose(-1, -2)) + bias, -1)
        a = torch.matmul(a, Vv)  # (1, H, n, dk)
        a = a.view(1, 1, inner) if n == 1 else a.transpose(1, 2).reshape(1, n, inner)
        h = h + F.linear(a, b.w_o)
        # cross-attention to the encoder (no position bias)
        x = _rms(h, b.ln_ca, b.ca_norm_eps)
        q = F.linear(x, b.wq_c)
        q = q.view(1, H, 1, dk) if n == 1 else q.view(1, n, H, dk).transpose(1, 2)
        s = torch.matmul(q, cross_kT)  # (1, H, n, S)
        if cross_mask is not None:
            s = s + cross_mask
        a = torch.matmul(torch.softmax(s, -1), cross_v)
        a = a.view(1, 1, inner) if n == 1 else a.transpose(1, 2).reshape(1, n, inner)
        h = h + F.linear(a, b.wo_c)
        # feed-forward
        x = _rms(h, b.ln_ff, b.ff_norm_eps)
        if b.wi is None:
            x = b.act(F.linear(x, b.wi0)) * F.linear(x, b.wi1)
        else:
            x = b.act(F.linear(x, b.wi))
        return h + F.linear(x.to(b.wo.dtype), b.wo)

    def propagate(self, i: int, h: Tensor, cache: KVCache) -> None:
        """CALM state propagation: layer ``i`` stores self-attention K/V computed from the exited state
        ``h`` (1, n, d) via its own layer norm and K/V projections (cross-attention needs nothing)."""
        b = self.blocks[i]
        n, H, dk = h.shape[1], self.num_heads, self.d_kv
        kv = F.linear(_rms(h, b.ln_sa, b.sa_norm_eps), b.w_kv)  # (1, n, 2*inner)
        if n == 1:
            k, v = kv[..., :self.inner].view(1, H, 1, dk), kv[..., self.inner:].view(1, H, 1, dk)
        else:
            k, v = (t.reshape(1, n, H, dk).transpose(1, 2) for t in kv.split(self.inner, -1))
        cache.update(k, v, i)

    # ---- a decoding session (the interface early-exit decoding uses) ----------------------------
    def _src(self, src_ids) -> Tensor:
        ids = torch.as_tensor(src_ids, dtype=torch.long, device=self.device)
        return ids[None] if ids.dim() == 1 else ids

    def start(self, src_ids: Tensor, max_new_tokens: int) -> tuple["T5Session", None]:
        """Encode ``src_ids`` (1, S) at full depth, precompute cross-attention K/V, allocate the
        self-attention cache for ``max_new_tokens`` positions; return ``(session, None)`` (no state:
        the first target token is decoded from ``decoder_start_token_id`` like the others)."""
        ids = self._src(src_ids)
        if ids.shape[0] != 1:
            raise ValueError(f"src_ids must be one sequence (batch size 1), got {tuple(ids.shape)}")
        enc = self.encode(ids)
        kT, v = self.cross_kv(enc)
        self.bias_table(max_new_tokens)
        return T5Session(self, self.new_cache(max_new_tokens), kT, v), None

    # ---- whole passes ---------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, src_ids: Tensor, tgt_ids: Tensor, shift: bool = True) -> Tensor:
        """Teacher-forced pre-norm decoder states of every layer: (L+1, T, d), layer 0 = embedding.

        ``tgt_ids`` (1, T) or (T,): the target tokens (e.g. ``DecodeResult.tokens``); the decoder is fed
        ``decoder_start_token_id, tgt[0..T-2]`` so that row ``t`` predicts ``tgt[t]``
        (``view.logits(states[l, t])``). With ``shift=False`` ``tgt_ids`` are the decoder inputs as given.
        """
        ids = self._src(src_ids)
        tgt = self._src(tgt_ids)
        if shift:
            start = torch.full_like(tgt[:, :1], self.decoder_start_token_id)
            tgt = torch.cat([start, tgt[:, :-1]], 1)
        T = tgt.shape[1]
        kT, v = self.cross_kv(self.encode(ids))
        cache = self.new_cache(T)
        bias = self.position_bias(0, T)
        h = self.embed(tgt)
        out = [h[0]]
        for i in range(self.num_layers):
            h = self.layer(i, h, cache, bias, kT[i], v[i])
            out.append(h[0])
        return torch.stack(out)


class T5Session:
    """One sequence being decoded: encoder K/V, the decoder self-attention cache, the next position.

    The decoder calls ``embed(token)`` (which fixes this step's position and relative-position bias,
    once for all layers), ``layer(i, h)`` with ``h`` (1, 1, d), ``propagate(i, h)`` for skipped layers
    and ``rewind(i)`` to drop layer ``i``'s newest position.

    Attributes: ``cache`` (KVCache; ``cache.lengths[i]`` = positions layer ``i`` holds),
    ``cross_kT`` (L, 1, H, dk, S), ``cross_v`` (L, 1, H, S, dk), ``pos`` (next position).
    """

    def __init__(self, view: LayerwiseT5, cache: KVCache, cross_kT: Tensor, cross_v: Tensor):
        self.view, self.cache, self.cross_kT, self.cross_v = view, cache, cross_kT, cross_v
        self.pos = 0
        self._bias: Tensor | None = None
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=view.device)

    def embed(self, token: int) -> Tensor:
        """Decoder input ``token`` at the next position -> (1, 1, d); sets this step's position bias."""
        self._bias = self.view.position_bias(self.pos)  # (1, H, 1, pos+1): a view of the table
        self.pos += 1
        self._ids.fill_(int(token))
        return self.view.embed(self._ids)

    def layer(self, i: int, h: Tensor) -> Tensor:
        """Decoder block ``i`` on the current position: (1, 1, d) -> (1, 1, d)."""
        return self.view.layer(i, h, self.cache, self._bias, self.cross_kT[i], self.cross_v[i])

    def propagate(self, i: int, h: Tensor) -> None:
        """State propagation of the exited state ``h`` (1, 1, d) into layer ``i``'s self-attention cache."""
        self.view.propagate(i, h, self.cache)

    def rewind(self, i: int) -> None:
        """Drop layer ``i``'s newest self-attention position."""
        self.cache.lengths[i] -= 1
