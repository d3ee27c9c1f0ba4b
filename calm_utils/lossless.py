"""Lossless CALM: confidence-based early exits as drafts, verified by the full model (self-speculative decoding).

CALM's early exits change the output (a calibrated, bounded amount, via Learn-then-Test). LayerSkip
(Elhoushi et al., 2024) and Hugging Face's ``generate(assistant_early_exit=E)`` use an early exit only to
*draft* tokens, which the full model then checks in one forward pass over all drafted positions: the
output is exactly the full model's greedy output, and the speed-up comes from verifying several tokens
per full-depth pass. Here the drafts come from CALM's exits (any confidence measure, a learned head, or
a fixed exit layer as in LayerSkip), on the same layer-wise views as :mod:`calm_utils.decoding`.

One round, with the cache exact up to position ``P`` and the last committed token ``x`` not yet fed:

1. Draft: feed ``x``, ``d_1``, ... one position at a time with early exits, up to ``draft_len`` tokens. CALM's
   state propagation gives skipped layers K/V so later drafts can attend to them; here it is *lazy*: a
   layer gets the propagated K/V of earlier drafted positions only when a later draft reaches it (the same
   values, fewer projections; with a fixed exit layer none at all, as in LayerSkip). Stop early
   at EOS, at the token budget, or (``adaptive``) at a token that found no confident exit.
   If the *first* draft step of a round reaches the last layer, its token is exact (every earlier
   position's K/V is exact): it is committed without verification (with threshold 1 the mode is plain
   full decoding).
2. Verify: forget the drafted positions' K/V in every layer that did not compute them exactly
   (``KVCache`` lengths back to ``P``), and run the inputs ``x, d_1, .., d_n`` (``n + 1`` positions; the last
   gives a bonus token when every draft is accepted) through those layers in one multi-position pass.
   With ``reuse_draft_layers`` the layers below ``m = min(draft exit layers)`` are kept: drafting computed
   them exactly at every drafted position (state propagation only writes layers at or above a token's
   exit), so the verification pass starts at layer ``m`` from the drafts' own layer-``m`` states.
3. Accept the longest prefix of drafts equal to the full model's greedy choices, take the full model's
   token at the first mismatch (or the bonus), and truncate every layer's cache to the accepted length,
   which leaves it as full greedy decoding would have it (tests: ``allclose`` to the full decoder's cache).

Multi-position passes: ``LayerwiseLM.layer`` runs ``n > 1`` positions with ``is_causal=True``, which torch
aligns top-left (query 0 sees key 0 only); that is right for a prefill from an empty cache but not for
positions appended to a filled one. This module therefore runs decoder-only verification passes with its
own copy of the lean Llama layer and an explicit bottom-right causal mask (HF's own layer gets the
same mask). ``LayerwiseT5.layer`` takes a relative-position bias with the causal mask folded in and
handles ``n > 1`` directly (``position_bias(P, n)``).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .confidence import ConfidenceMeasure, ExitContext
from .decoding import DecodeResult, EarlyExitDecoder, ExitConfig, _sync
from .utils import scale_layer

DRAFT_POLICIES = ("confidence", "static", "full")


@dataclass
class LosslessResult(DecodeResult):
    """A :class:`DecodeResult` plus self-speculation statistics.

    ``exit_layers[t]``: the draft's exit layer for an accepted draft, ``L`` for a token the full model
    produced (verification correction/bonus, or an exact full-depth first step).
    ``draft_exit_layers``: exit layer of every drafted token sent to verification (accepted or not).
    ``drafted`` / ``accepted``: drafted tokens verified / accepted; ``verify_passes``: multi-position
    full-depth passes; ``exact_steps``: first-of-round tokens that reached the last layer and were
    committed without verification; ``verify_layers``: layer calls made by verification passes
    (each over ``n + 1`` positions); ``accepted_per_pass``: accepted drafts of each verification.
    """
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    exact_steps: int = 0
    verify_layers: int = 0
    draft_exit_layers: list[int] = field(default_factory=list)
    accepted_per_pass: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def avg_draft_exit_layer(self) -> float:
        d = self.draft_exit_layers
        return sum(d) / len(d) if d else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per full-depth pass (verification passes + exact steps)."""
        passes = self.verify_passes + self.exact_steps
        return len(self.tokens) / passes if passes else float("nan")

    def stats(self) -> dict:
        return {"tokens": len(self.tokens), "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.acceptance_rate, "avg_draft_exit_layer": self.avg_draft_exit_layer,
                "verify_passes": self.verify_passes, "exact_steps": self.exact_steps,
                "tokens_per_pass": self.tokens_per_pass}


# ---- multi-position passes over consecutive layers (composition over the views) --------------------
def _is_t5(session) -> bool:
    return hasattr(session, "cross_kT")


def run_layers(view, session, h: Tensor, start: int, first: int, last: int) -> Tensor:
    """Run 0-based layers ``first..last-1`` on ``h`` (1, n, d) at positions ``start..start+n-1`` of the
    session's cache (each layer's cache must hold exactly ``start`` positions; its K/V are appended).
    Works for :class:`LayerwiseLM` and :class:`LayerwiseT5` sessions; returns layer ``last``'s states."""
    n = h.shape[1]
    cache = session.cache
    if _is_t5(session):
        bias = view.position_bias(start, n)
        for i in range(first, last):
            h = view.layer(i, h, cache, bias, session.cross_kT[i], session.cross_v[i])
        return h
    pos = view.positions(start, n)
    mask = None
    if n > 1:
        q = torch.arange(start, start + n, device=h.device)[:, None]
        k = torch.arange(start + n, device=h.device)[None, :]
        mask = k <= q  # bottom-right causal: position start+j sees keys 0..start+j
    for i in range(first, last):
        h = view.layer(i, h, cache, pos, mask)
    return h


class LosslessDecoder(EarlyExitDecoder):
    """Self-speculative greedy decoding with CALM exits as drafts; output = the full model's greedy output.

    Args:
        view: ``LayerwiseLM`` or ``LayerwiseT5``.
        config: an :class:`ExitConfig` for the *drafts*: ``policy="confidence"`` (any measure, threshold,
            ``min_exit_layer``, ``exit_interval``, decay), ``"static"`` (a fixed exit layer, LayerSkip-style)
            or ``"full"`` (no early exit: plain full decoding). ``max_new_tokens`` is the output budget.
        draft_len: the most tokens drafted per verification pass (>= 1).
        measure / project: as for :class:`EarlyExitDecoder` (a learned exit head; linear maps).
        reuse_draft_layers: keep the layers that drafting computed exactly at every drafted position
            (below the block's lowest exit) instead of recomputing them in the verification pass.
        adaptive: end a draft block at a token that found no confident exit.
        max_draft_layer: the deepest layer a draft may use (1-based, default ``L``). A token with no
            confident exit up to it is drafted from that layer anyway and ends the block (with ``L``: the
            token is computed at full depth, exact when it is the first of a round). Below ``L`` this is
            HF's ``assistant_confidence_threshold`` idea with CALM's measures: a cheap unconfident draft stops
            drafting instead of paying for the deeper layers.
        draft_vocab: token ids the *drafts* may use (e.g. :func:`frequent_tokens`); the draft projection is
            then the shared final norm + the LM head's rows for these tokens only, pre-gathered once per
            sequence (with ``draft_vocab_prompt`` plus the prompt's own tokens and EOS). On a memory-bound CPU
            the full head (V x d) is the dearest part of a shallow draft; a draft outside the subset is simply
            rejected by verification (the idea of FR-Spec, Zhao et al. 2025). Verification always uses the
            full head, so the output stays exact.
    """

    def __init__(self, view, config: ExitConfig, draft_len: int = 4, measure: ConfidenceMeasure | None = None,
                 project=None, reuse_draft_layers: bool = True, adaptive: bool = True,
                 max_draft_layer: int | None = None, draft_vocab=None, draft_vocab_prompt: bool = True):
        if config.policy not in DRAFT_POLICIES:
            raise ValueError(f"lossless drafting needs policy in {DRAFT_POLICIES}, got {config.policy!r}")
        if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
            raise ValueError(f"draft_len must be an integer >= 1, got {draft_len!r}")
        super().__init__(view, config, measure, project)
        self.draft_len, self.reuse, self.adaptive = draft_len, bool(reuse_draft_layers), bool(adaptive)
        D = self.L if max_draft_layer is None else max_draft_layer
        if isinstance(D, bool) or not isinstance(D, int) or not 1 <= D <= self.L:
            raise ValueError(f"max_draft_layer must be an integer in [1, {self.L}], got {max_draft_layer!r}")
        self.max_draft_layer = D
        if draft_vocab is not None and project is not None:
            raise ValueError("draft_vocab and a custom exit projection cannot be combined")
        self.draft_vocab = None if draft_vocab is None else torch.as_tensor(draft_vocab, dtype=torch.long,
                                                                             device=view.device).unique()
        self.draft_vocab_prompt = bool(draft_vocab_prompt)
        self._vocab: Tensor | None = None
        self.session = None  # the last generate()'s session (tests inspect its cache)

    def describe(self) -> dict:
        d = super().describe()
        d.update(mode="lossless", draft_len=self.draft_len, reuse_draft_layers=self.reuse, adaptive=self.adaptive,
                 max_draft_layer=self.max_draft_layer,
                 draft_vocab=None if self.draft_vocab is None else int(self.draft_vocab.numel()))
        return d

    # ---- one drafted token (no propagation yet: the caller decides) ----------------------------
    def _draft(self, session, h: Tensor, step: int) -> tuple[int, int, float, list[Tensor], Tensor, bool]:
        """Returns ``(token, exit layer (1-based), confidence, states of layers 0..exit (each (1, 1, d)),
        exited state, confident)``. Layers above the exit have *not* been given K/V yet."""
        cfg, L = self.config, self.L
        states = [h]
        fill = self._fill if self._pending else None
        if cfg.policy == "confidence":
            measure, ctx, D = self.measure, self._ctx, self.max_draft_layer
            lam = cfg.threshold_at(step)
            measure.start_token()
            ctx.step = step
            ctx.history = [h[0, -1]]
            conf, tok = float("nan"), None
            for i in range(D):
                if fill is not None:
                    fill(session, i)
                h = session.layer(i, h)
                states.append(h)
                flat = h[0, -1]
                ctx.history.append(flat)
                if self.checked[i + 1]:
                    conf, tok = measure(ctx.at(i + 1, flat))
                    if conf >= lam:
                        if tok is None:
                            tok = self._exit_token(i + 1, flat)
                        return self._map(tok), i + 1, conf, states, h, True
                else:
                    conf, tok = float("nan"), None
            if D == L:
                return int(self.view.logits(h[0, -1]).argmax(-1)), L, float("nan"), states, h, False
            if tok is None:
                tok = self._exit_token(D, h[0, -1])
            return self._map(tok), D, conf, states, h, False
        s = cfg.static_layer if cfg.policy == "static" else L
        for i in range(s):
            if fill is not None:
                fill(session, i)
            h = session.layer(i, h)
            states.append(h)
        tok = self._map(self._exit_token(s, h[0, -1])) if s < L else int(self.view.logits(h[0, -1]).argmax(-1))
        return tok, s, float("nan"), states, h, True

    def _map(self, tok: int) -> int:
        """A token index from the draft projection -> a vocabulary id (identity without ``draft_vocab``)."""
        return tok if self._vocab is None else int(self._vocab[tok])

    def _set_draft_vocab(self, ids: Tensor) -> None:
        """Pre-gather the draft head rows for this sequence and install the restricted projection."""
        view = self.view
        parts = [self.draft_vocab, torch.tensor(sorted(view.eos_ids), dtype=torch.long, device=view.device)]
        if self.draft_vocab_prompt:
            parts.append(ids.reshape(-1))
        vocab = torch.cat(parts).unique()
        need = max(getattr(self.measure, "k", 2), 2)
        if vocab.numel() < need:
            raise ValueError(f"the draft vocabulary has {vocab.numel()} tokens; the draft measure needs at least {need}")
        w = view.head_weight[vocab].contiguous()
        b = None if view.head_bias is None else view.head_bias[vocab]
        self._vocab = vocab

        def project(layer, h, rows, w=w, b=b):
            if rows is None:
                return F.linear(view.norm(h), w, b)
            return F.linear(view.norm(h), w[rows], None if b is None else b[rows])
        self.project = project

    def _fill(self, session, i: int) -> None:
        """Lazy state propagation: before layer ``i`` runs at the current position, give it the K/V of the
        earlier drafted positions that exited below it, computed from their exited states (the values
        CALM's eager propagation would have written; positions no later draft reaches are never filled)."""
        cache = session.cache
        start, end = cache.lengths[i], session.pos - 1
        if start >= end:
            return
        h = torch.cat([self._pending[p] for p in range(start, end)], 1)  # (1, end - start, d)
        if _is_t5(session):
            self.view.propagate(i, h, cache)
        else:
            self.view.propagate(i, h, cache, self.view.positions(start, end - start))

    # ---- verification ------------------------------------------------------------------------
    def _verify(self, session, P: int, inputs: list[int], states: list[list[Tensor]], exits: list[int],
                res: LosslessResult) -> list[int]:
        """Full-depth predictions after each of ``inputs`` (fed at positions ``P..``); ``states[j]`` /
        ``exits[j]`` belong to the drafted position ``P + j`` (``len(states)`` drafted positions; an
        extra last input, if any, has not been fed yet). Leaves each layer's cache at ``P + len(inputs)``."""
        view, cache, L = self.view, session.cache, self.L
        n_fed, n_in = len(states), len(inputs)
        m = min(exits) if self.reuse else 0  # layers 0..m-1 are exact at every drafted position
        for i in range(L):
            cache.lengths[i] = P + n_fed if i < m else P
        if m > 0:
            h = torch.cat([s[m] for s in states], 1)  # (1, n_fed, d): the exact inputs of layer m
            if n_in > n_fed:  # the bonus position was never fed: its layers 0..m-1 first
                hb = view.embed(torch.tensor([inputs[n_fed:]], device=view.device))
                h = torch.cat([h, run_layers(view, session, hb, P + n_fed, 0, m)], 1)
        else:
            h = view.embed(torch.tensor([inputs], device=view.device))
        h = run_layers(view, session, h, P, m, L)
        res.verify_passes += 1
        res.verify_layers += L - m
        return view.logits(h[0]).argmax(-1).tolist()

    # ---- a whole sequence ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor | list[int]) -> LosslessResult:
        view, cfg, L = self.view, self.config, self.L
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=view.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must be one sequence, shape (1, T) or (T,); got {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token")
        N = cfg.max_new_tokens
        limit = getattr(view, "max_positions", None)
        if limit is not None and ids.shape[1] + N + 1 > limit:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({N}) + 1 exceeds the model's "
                             f"context of {limit} positions")
        if self.draft_vocab is not None:
            self._set_draft_vocab(ids)
        self._ctx = ExitContext(self.project)
        self._pending: dict[int, Tensor] = {}
        eos = view.eos_ids
        tokens, exits, confs, times = [], [], [], []
        res = LosslessResult([], "", exits, confs, 0.0, times, ids.shape[1], L, self.describe())
        _sync(view.device)
        t0 = time.perf_counter()
        session, first = view.start(ids, N + 1)  # one spare position: the bonus input of a last full block
        self.session = session
        pos0 = session.pos
        if first is not None:  # decoder-only: the prompt pass predicts the first token at full depth
            tokens.append(int(view.logits(first[0, -1]).argmax(-1)))
            exits.append(L)
            confs.append(float("nan"))
        _sync(view.device)
        res.prompt_ms = (time.perf_counter() - t0) * 1e3
        if tokens:
            times.append(0.0)
        while len(tokens) < N and not (tokens and tokens[-1] in eos):
            t = time.perf_counter()
            P = session.pos
            x = tokens[-1] if tokens else view.decoder_start_token_id
            budget = N - len(tokens)
            drafts, d_exits, d_confs, d_states = [], [], [], []
            self._pending = {}
            inp, exact = x, False
            for k in range(min(self.draft_len, budget)):
                tok, e, conf, states, hx, confident = self._draft(session, session.embed(inp), len(tokens) + k)
                if k == 0 and e == L:  # exact: every earlier position's K/V is the full model's
                    exact = True
                    tokens.append(tok)
                    exits.append(L)
                    confs.append(conf)
                    res.exact_steps += 1
                    break
                drafts.append(tok)
                d_exits.append(e)
                d_confs.append(conf)
                d_states.append(states)
                if tok in eos or k == min(self.draft_len, budget) - 1 or (self.adaptive and not confident):
                    break
                if e < L:  # CALM state propagation for later drafts' attention, done lazily (_fill)
                    self._pending[P + k] = hx
                inp = tok
            if exact:
                new = 1
            else:
                n = len(drafts)
                inputs = [x] + drafts
                if len(tokens) + n >= N or drafts[-1] in eos:  # no use for a bonus token
                    inputs = inputs[:n]
                greedy = self._verify(session, P, inputs, d_states, d_exits, res)
                a = 0
                while a < n and drafts[a] == greedy[a]:
                    a += 1
                res.drafted += n
                res.accepted += a
                res.accepted_per_pass.append(a)
                res.draft_exit_layers.extend(d_exits)
                emitted = drafts[:a] + greedy[a:a + 1]
                new = 0
                for j, tok in enumerate(emitted):
                    if len(tokens) >= N:
                        break
                    tokens.append(tok)
                    exits.append(d_exits[j] if j < a else L)
                    confs.append(d_confs[j] if j < a else float("nan"))
                    new += 1
                    if tok in eos:
                        break
                session.cache.truncate(P + new)
                session.pos = P + new
            _sync(view.device)
            dt = (time.perf_counter() - t) * 1e3
            times.extend([dt / new] * new)
        # leave the cache exactly as full greedy decoding leaves it: every token but the last fed
        final = pos0 + len(tokens) - (1 if first is not None else 0)
        session.cache.truncate(final)
        session.pos = final
        res.tokens = tokens
        tokenizer = getattr(view, "tokenizer", None)
        res.text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        return res


def frequent_tokens(tokenizer, texts: list[str], m: int) -> list[int]:
    """The ``m`` most frequent token ids of ``texts`` (no special tokens): a draft vocabulary."""
    from collections import Counter
    counts = Counter()
    for i in range(0, len(texts), 512):
        for ids in tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return [t for t, _ in counts.most_common(m)]


def lossless_generate(view, prompt_ids, draft_len: int = 4, measure: ConfidenceMeasure | None = None,
                      project=None, reuse_draft_layers: bool = True, adaptive: bool = True,
                      max_draft_layer: int | None = None, draft_vocab=None, **config) -> LosslessResult:
    """Convenience: ``LosslessDecoder(view, ExitConfig(**config), draft_len, ...).generate(prompt_ids)``."""
    return LosslessDecoder(view, ExitConfig(**config), draft_len, measure, project, reuse_draft_layers,
                           adaptive, max_draft_layer, draft_vocab).generate(prompt_ids)


# ---- side-by-side comparison ----------------------------------------------------------------------
@dataclass
class Method:
    """A decoding method in :func:`compare_lossless`.

    ``kind``: ``"hf"`` (HF greedy ``generate``, the speed reference), ``"hf_early_exit"`` (HF
    ``generate(assistant_early_exit=layer)``), ``"full"`` (our full decoder), ``"lossy"`` (CALM's exits,
    :class:`EarlyExitDecoder`) or ``"lossless"`` (:class:`LosslessDecoder`). ``config``: the ExitConfig
    (lossy/lossless); ``draft_len``/``measure`` for lossless; ``layer`` for hf_early_exit."""
    method: str
    setting: str
    kind: str
    config: ExitConfig | None = None
    draft_len: int = 4
    measure: ConfidenceMeasure | None = None
    layer: int | None = None
    kwargs: dict = field(default_factory=dict)


def default_methods(num_layers: int, t5: bool, smoke: bool = False, draft_vocab=None) -> list[Method]:
    """The comparison's methods. T5 (CALM-trained, 8 layers): drafts from a fixed exit layer (LayerSkip-style),
    the top-k / state / softmax-diff measures, and top-k capped at a shallow layer (``max_draft_layer``);
    CALM's lossy exits at a fixed threshold 0.9 (``softmax_diff`` and ``topk_diff``). SmolLM2 (frozen, 30
    layers): late exits only, plus HF ``generate(assistant_early_exit=E)`` (Llama-family only: it does not
    run on T5 in transformers 5.25)."""
    L = num_layers
    C = lambda **kw: ExitConfig(**kw)
    ms = [Method("hf_generate", "greedy", "hf"), Method("ours_full", "full", "full", C(policy="full"))]
    if t5:
        top = lambda th: C(measure="topk_diff", threshold=th, measure_kwargs={"k": 32})
        lossy = [("softmax_diff@0.9", C(measure="softmax_diff", threshold=0.9)), ("topk_diff(k=32)@0.9", top(0.9))]
        drafts = [("static-2", C(policy="static", static_layer=2), (4, 6), {}),
                  ("topk_diff(k=32)@0.5,max3", top(0.5), (4, 8), {"max_draft_layer": 3}),
                  ("static-3", C(policy="static", static_layer=3), (4,), {}),
                  ("topk_diff(k=32)@0.9", top(0.9), (4,), {}),
                  ("state@0.9", C(measure="state", threshold=0.9), (4,), {}),
                  ("softmax_diff@0.9", C(measure="softmax_diff", threshold=0.9), (4,), {})]
        vocab_drafts = [("static-2", C(policy="static", static_layer=2), (4,), {}),
                        ("topk_diff(k=32)@0.5,max3", top(0.5), (4, 8), {"max_draft_layer": 3})]
        ee = []
    else:
        m = scale_layer(20, L)  # layer 20 of SmolLM2's 30, at the same relative depth of another model
        top = C(measure="topk_diff", threshold=0.9, min_exit_layer=m, measure_kwargs={"k": 64})
        lossy = [(f"topk_diff(k=64)@0.9,min{m}", top)]
        drafts = [(f"topk_diff(k=64)@0.9,min{m}", top, (2, 4), {}),
                  (f"static-{L - 6}", C(policy="static", static_layer=L - 6), (2,), {})]
        vocab_drafts = [(f"static-{L - 6}", C(policy="static", static_layer=L - 6), (2,), {}),
                        (f"topk_diff(k=64)@0.9,min{m}", top, (2,), {})]
        ee = [L // 2, L - 6]
    if draft_vocab is not None:
        M = len(set(int(t) for t in draft_vocab))
        drafts = drafts + [(f"{name},V={M}", cfg, lens, {**kw, "draft_vocab": draft_vocab})
                           for name, cfg, lens, kw in vocab_drafts]
    if smoke:
        drafts = [(name, cfg, lens[:1], kw) for name, cfg, lens, kw in drafts[:2] + drafts[-1:]]
        ee = ee[-1:]
    for name, cfg in lossy:
        ms.append(Method("calm_lossy", name, "lossy", cfg))
    for name, cfg, lens, kw in drafts:
        for n in lens:
            ms.append(Method("lossless", f"{name},n={n}", "lossless", copy.deepcopy(cfg), draft_len=n, kwargs=kw))
    for e in ee:
        ms.append(Method("hf_assistant_early_exit", f"E={e}", "hf_early_exit", layer=e))
    return ms


def _strip(tokens: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos:
            return tokens[:j + 1]
    return tokens


def hf_runner(model, view, early_exit: int | None = None):
    """``(ids, max_new) -> tokens``: HF greedy generate (optionally ``assistant_early_exit``), cut at EOS."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    t5 = getattr(model.config, "is_encoder_decoder", False)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = next(iter(view.eos_ids), 0)
    extra = {} if early_exit is None else {"assistant_early_exit": early_exit}

    def run(ids, n):
        if t5:
            out = model.generate(ids, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                                 cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), **extra)
            return _strip(out[0, 1:].tolist(), view.eos_ids)
        out = model.generate(ids, max_new_tokens=n, do_sample=False, num_beams=1, min_new_tokens=0,
                             pad_token_id=pad, attention_mask=torch.ones_like(ids), **extra)
        return _strip(out[0, ids.shape[1]:].tolist(), view.eos_ids)
    return run


def compare_lossless(model, view, prompts: list[Tensor], methods: list[Method], max_new_tokens: int,
                     repeats: int = 2, model_name: str = "model", log=print):
    """Run every method on every prompt, interleaved (prompt by prompt, methods in turn, ``repeats``
    times; untimed warm-up on the first prompt). Returns ``(runs, summary)``.

    ``runs``: one row per (method, prompt, repeat): ``ms``, ``tokens``, ``identical`` (tokens == HF greedy
    ``generate``'s on that prompt), lossless statistics. ``summary`` per method: ``speedup`` (HF generate's
    total ms / the method's, per repeat, median over repeats; ms per token for methods whose output
    differs), ``speedup_vs_full`` (same against our full decoder), ``speedup_min/max`` over repeats,
    ``acceptance`` (accepted / drafted drafts), ``avg_draft_exit_layer``, ``tokens_per_pass``,
    ``avg_exit_layer`` (lossy), ``identical`` (every prompt identical to HF generate)."""
    import numpy as np
    import pandas as pd
    runners = {}
    for m in methods:
        if m.kind == "hf":
            runners[m.setting + m.method] = hf_runner(model, view)
        elif m.kind == "hf_early_exit":
            runners[m.setting + m.method] = hf_runner(model, view, m.layer)
        elif m.kind in ("full", "lossy"):
            m.config.max_new_tokens = max_new_tokens
            runners[m.setting + m.method] = EarlyExitDecoder(view, m.config, m.measure)
        elif m.kind == "lossless":
            m.config.max_new_tokens = max_new_tokens
            runners[m.setting + m.method] = LosslessDecoder(view, m.config, m.draft_len, m.measure, **m.kwargs)
        else:
            raise ValueError(f"unknown method kind {m.kind!r}")

    def call(m, ids):
        r = runners[m.setting + m.method]
        if m.kind in ("hf", "hf_early_exit"):
            return r(ids, max_new_tokens), None
        res = r.generate(ids)
        return res.tokens, res

    rows = []
    with torch.inference_mode():
        for m in methods:  # warm-up: allocator, tables, lazy inits
            call(m, prompts[0])
        for rep in range(repeats):
            for j, ids in enumerate(prompts):
                ref = None
                for m in methods:
                    _sync(view.device)
                    t0 = time.perf_counter()
                    toks, res = call(m, ids)
                    _sync(view.device)
                    ms = (time.perf_counter() - t0) * 1e3
                    if m.kind == "hf":
                        ref = toks
                    row = dict(model=model_name, method=m.method, setting=m.setting, prompt=j, repeat=rep, ms=ms,
                               tokens=len(toks), identical=toks == ref)
                    if isinstance(res, LosslessResult):
                        row.update(drafted=res.drafted, accepted=res.accepted, verify_passes=res.verify_passes,
                                   exact_steps=res.exact_steps, draft_layer_sum=sum(res.draft_exit_layers))
                    elif res is not None:
                        row.update(exit_layer_sum=sum(res.exit_layers))
                    rows.append(row)
            log(f"{model_name}: repeat {rep + 1}/{repeats} done")
    runs = pd.DataFrame(rows)
    hf_total = runs[runs.method == "hf_generate"].groupby("repeat")[["ms", "tokens"]].sum()
    full_total = runs[runs.method == "ours_full"].groupby("repeat")[["ms", "tokens"]].sum()
    out = []
    for (meth, setting), g in runs.groupby(["method", "setting"], sort=False):
        tot = g.groupby("repeat")[["ms", "tokens"]].sum()
        ident = bool(g.identical.all())
        if ident:  # same tokens: ratio of total times
            sp = hf_total.ms / tot.ms
            spf = full_total.ms / tot.ms
        else:  # different outputs (lossy): ratio of ms per token
            sp = (hf_total.ms / hf_total.tokens) / (tot.ms / tot.tokens)
            spf = (full_total.ms / full_total.tokens) / (tot.ms / tot.tokens)
        r = dict(model=model_name, method=meth, setting=setting, speedup=float(np.median(sp)),
                 speedup_min=float(sp.min()), speedup_max=float(sp.max()), speedup_vs_full=float(np.median(spf)),
                 ms_per_token=float((tot.ms / tot.tokens).median()), tokens=int(g[g.repeat == 0].tokens.sum()),
                 identical=ident, acceptance=float("nan"), avg_draft_exit_layer=float("nan"),
                 tokens_per_pass=float("nan"), avg_exit_layer=float("nan"))
        first = g[g.repeat == 0]
        if "drafted" in g and first.drafted.notna().any():
            d = first.drafted.sum()
            r["acceptance"] = float(first.accepted.sum() / d) if d else float("nan")
            r["avg_draft_exit_layer"] = float(first.draft_layer_sum.sum() / d) if d else float("nan")
            passes = first.verify_passes.sum() + first.exact_steps.sum()
            r["tokens_per_pass"] = float(first.tokens.sum() / passes) if passes else float("nan")
        if "exit_layer_sum" in g and first.exit_layer_sum.notna().any():
            r["avg_exit_layer"] = float(first.exit_layer_sum.sum() / first.tokens.sum())
        out.append(r)
    return runs, pd.DataFrame(out)
