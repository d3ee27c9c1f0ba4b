"""Early-exit greedy decoding (CALM, Schuster et al. 2022, Sec. 3), batch size 1.

For every generated token the decoder runs layer by layer; at each checked layer it asks a
confidence measure (``confidence.py``) and leaves at the first layer whose confidence clears the
threshold. Skipped layers still get keys/values for the token by CALM's state propagation
(``Session.propagate``), so later tokens can attend to it.

Exit policies:
    ``full``        never exit (must equal HF ``generate``; the study's key test)
    ``static``      every token exits at ``static_layer``
    ``oracle``      exit at the first layer whose argmax equals the last layer's (an analysis bound;
                    all layers are computed; ``oracle_cache=True`` keeps their true K/V, else the
                    skipped layers' K/V are replaced by propagated ones as a real exit would do)
    ``confidence``  CALM: exit when ``confidence >= threshold(t)``

Threshold decay (CALM_NOTES.md), ``t`` = index of the generated token, ``N`` = max_new_tokens:
    ``none``  (default, as in the official code) lambda
    ``paper`` clip_[0,1](0.9 lambda + 0.1 exp(-tau t / N))       (paper, Eq. 5)
    ``code``  lambda (0.9 + 0.1 exp(-tau t / N))                 (t5x contrib/calm)

In a decoder-only model the first generated token is predicted by the prompt pass, which always
runs at full depth (like CALM's encoder); it is recorded with exit layer L.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .confidence import ConfidenceMeasure, ExitContext, make_measure

POLICIES = ("full", "static", "oracle", "confidence")
DECAYS = ("none", "paper", "code")


@dataclass
class ExitConfig:
    """How tokens leave the decoder. Layers are 1-based (layer L = last)."""
    policy: str = "confidence"
    measure: str = "softmax_diff"
    threshold: float = 0.9
    static_layer: int | None = None
    min_exit_layer: int = 1
    exit_interval: int = 1
    decay: str = "none"
    decay_temperature: float = 4.0
    oracle_cache: bool = False
    max_new_tokens: int = 64
    measure_kwargs: dict = field(default_factory=dict)

    def validate(self, num_layers: int) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown exit policy {self.policy!r}; choose one of {POLICIES}")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold) or not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        if not isinstance(self.min_exit_layer, int) or not 1 <= self.min_exit_layer <= num_layers:
            raise ValueError(f"min_exit_layer must be an integer in [1, {num_layers}] (the model's layers), "
                             f"got {self.min_exit_layer!r}")
        if not isinstance(self.exit_interval, int) or self.exit_interval < 1:
            raise ValueError(f"exit_interval must be an integer >= 1, got {self.exit_interval!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown threshold decay {self.decay!r}; choose one of {DECAYS}")
        if self.decay_temperature < 0:
            raise ValueError(f"decay_temperature must be >= 0, got {self.decay_temperature}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.policy == "static" and (not isinstance(self.static_layer, int)
                                        or not 1 <= self.static_layer <= num_layers):
            raise ValueError(f"the static policy needs static_layer in [1, {num_layers}], got {self.static_layer!r}")

    def threshold_at(self, t: int) -> float:
        """The exit threshold for the t-th generated token (decay schedules above)."""
        lam, n = self.threshold, self.max_new_tokens
        if self.decay == "none":
            return lam
        decay = math.exp(-self.decay_temperature * t / n)
        if self.decay == "paper":
            return min(1.0, max(0.0, 0.9 * lam + 0.1 * decay))
        return lam * (0.9 + 0.1 * decay)

    def checked_layers(self, num_layers: int) -> list[bool]:
        """``checked[i]`` for 1-based layer i < L: is a confidence computed there?"""
        return [i >= self.min_exit_layer and (i - self.min_exit_layer) % self.exit_interval == 0 and i < num_layers
                for i in range(num_layers + 1)]


@dataclass
class DecodeResult:
    """One decoded sequence. ``exit_layers[t]`` is 1-based; ``confidences[t]`` is the confidence at
    exit (NaN where none was computed: full depth, static, oracle)."""
    tokens: list[int]
    text: str
    exit_layers: list[int]
    confidences: list[float]
    prompt_ms: float
    token_ms: list[float]
    prompt_len: int
    num_layers: int
    config: dict

    @property
    def avg_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(len(self.exit_layers), 1)

    @property
    def ms_per_token(self) -> float:
        return sum(self.token_ms) / max(len(self.token_ms), 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EarlyExitDecoder:
    """Greedy early-exit decoding over a layer-wise view (``LayerwiseLM`` or the T5 view).

    Args:
        view: the layer-wise model view (``start``, ``logits``, ``num_layers``, ``eos_ids``...).
        config: an :class:`ExitConfig`.
        measure: a :class:`ConfidenceMeasure` instance overriding ``config.measure``
            (learned exit heads are passed this way).
        project: the exit projection ``(layer, h, rows) -> logits``; default the shared final norm +
            LM head; linear maps ("Jump to Conclusions") replace it.
    """

    def __init__(self, view, config: ExitConfig, measure: ConfidenceMeasure | None = None,
                 project: Callable[[int, Tensor, Tensor | None], Tensor] | None = None):
        config.validate(view.num_layers)
        self.view, self.config = view, config
        self.L = view.num_layers
        self.checked = config.checked_layers(self.L)
        self.measure = None
        if config.policy == "confidence":
            kwargs = dict(config.measure_kwargs)
            kwargs.setdefault("vocab_size", view.vocab_size)
            self.measure = make_measure(measure if measure is not None else config.measure, **kwargs)
        self._shared_head = project is None
        self.project = project or (lambda layer, h, rows: view.logits(h, rows))

    def describe(self) -> dict:
        cfg = asdict(self.config)
        if self.measure is not None:
            cfg["measure"] = self.measure.describe()
        return cfg

    # ---- one token --------------------------------------------------------------------------
    def _exit_token(self, layer: int, h: Tensor) -> int:
        return int(self.project(layer, h, None).argmax(-1))

    def _finish(self, session, i: int, h: Tensor) -> None:
        """Layers i+1..L-1 (0-based) were skipped: give them K/V by state propagation."""
        for j in range(i + 1, self.L):
            session.propagate(j, h)

    def _step_confidence(self, session, h: Tensor, step: int) -> tuple[int, int, float]:
        measure, ctx, L = self.measure, self._ctx, self.L
        lam = self.config.threshold_at(step)
        measure.start_token()
        ctx.step = step
        ctx.history = [h[0, -1]]
        for i in range(L):
            h = session.layer(i, h)
            flat = h[0, -1]
            ctx.history.append(flat)
            if self.checked[i + 1]:
                conf, tok = measure(ctx.at(i + 1, flat))
                if conf >= lam:
                    if tok is None:
                        tok = self._exit_token(i + 1, flat)
                    self._finish(session, i, h)
                    return tok, i + 1, conf
        return int(self.view.logits(h[0, -1]).argmax(-1)), L, float("nan")

    def _step_static(self, session, h: Tensor) -> tuple[int, int, float]:
        s = self.config.static_layer
        for i in range(s):
            h = session.layer(i, h)
        tok = self._exit_token(s, h[0, -1]) if s < self.L else int(self.view.logits(h[0, -1]).argmax(-1))
        self._finish(session, s - 1, h)
        return tok, s, float("nan")

    def _step_full(self, session, h: Tensor) -> tuple[int, int, float]:
        for i in range(self.L):
            h = session.layer(i, h)
        return int(self.view.logits(h[0, -1]).argmax(-1)), self.L, float("nan")

    def _step_oracle(self, session, h: Tensor) -> tuple[int, int, float]:
        states = []
        for i in range(self.L):
            h = session.layer(i, h)
            states.append(h)
        final = int(self.view.logits(h[0, -1]).argmax(-1))
        exit_layer = self.L
        if self.L > 1:
            # every earlier layer's prediction in one (L-1, d) x (d, V) call: the head is memory-bound,
            # so this costs about one head call instead of L-1 (the projection may be layer-specific)
            if self._shared_head:
                preds = self.view.logits(torch.cat([s[0, -1:] for s in states[:-1]], 0)).argmax(-1).tolist()
            else:
                preds = [self._exit_token(i + 1, states[i][0, -1]) for i in range(self.L - 1)]
            for i, tok in enumerate(preds):
                if tok == final:
                    exit_layer = i + 1
                    break
        if not self.config.oracle_cache and exit_layer < self.L:
            for j in range(exit_layer, self.L):
                session.rewind(j)
            self._finish(session, exit_layer - 1, states[exit_layer - 1])
        return final, exit_layer, float("nan")

    # ---- a whole sequence -------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: Tensor | list[int]) -> DecodeResult:
        """Greedy-decode up to ``max_new_tokens`` after ``prompt_ids`` (1, T) or a list of ids."""
        view, cfg = self.view, self.config
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=view.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must be one sequence, shape (1, T) or (T,); got {tuple(ids.shape)} (batch size 1 only)")
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token (e.g. the chat template's prefix)")
        limit = getattr(view, "max_positions", None)
        if limit is not None and ids.shape[1] + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                             f"model's context of {limit} positions; shorten the prompt or lower max_new_tokens")
        self._ctx = ExitContext(self.project)
        step_fn = {"full": lambda s, h, t: self._step_full(s, h), "static": lambda s, h, t: self._step_static(s, h),
                   "oracle": lambda s, h, t: self._step_oracle(s, h), "confidence": self._step_confidence}[cfg.policy]
        tokens, exits, confs, times = [], [], [], []
        _sync(view.device)
        t0 = time.perf_counter()
        session, first = view.start(ids, cfg.max_new_tokens)
        if first is not None:  # decoder-only: the prompt pass predicts the first token at full depth
            tok, layer, conf = int(view.logits(first[0, -1]).argmax(-1)), self.L, float("nan")
        _sync(view.device)
        prompt_ms = (time.perf_counter() - t0) * 1e3
        for step in range(cfg.max_new_tokens):
            t = time.perf_counter()
            if step > 0 or first is None:
                prev = tokens[-1] if tokens else view.decoder_start_token_id
                tok, layer, conf = step_fn(session, session.embed(prev), step)
            _sync(view.device)
            tokens.append(tok)
            exits.append(layer)
            confs.append(conf)
            times.append((time.perf_counter() - t) * 1e3)
            if tok in view.eos_ids:
                break
        tokenizer = getattr(view, "tokenizer", None)
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        return DecodeResult(tokens, text, exits, confs, prompt_ms, times, ids.shape[1], self.L, self.describe())


def early_exit_generate(view, prompt_ids, measure: ConfidenceMeasure | None = None, project=None,
                        **config) -> DecodeResult:
    """Convenience: ``EarlyExitDecoder(view, ExitConfig(**config), measure, project).generate(prompt_ids)``."""
    return EarlyExitDecoder(view, ExitConfig(**config), measure, project).generate(prompt_ids)


def generate_with_session(view, decoder, prompt_ids):
    """``decoder.generate(prompt_ids)`` and the decoding session it used (captured from ``view.start``), to
    inspect the caches the run left behind (the equivalence checks of the tests and notebook 05)."""
    captured = {}
    original = view.start

    def spy(ids, n):
        session, first = original(ids, n)
        captured["session"] = session
        return session, first

    view.start = spy
    try:
        res = decoder.generate(prompt_ids)
    finally:
        del view.start
    return res, captured["session"]
