"""Confidence measures, selected by name as in CALM's t5x code (``t5x/contrib/calm``).

A measure is called at every checked layer of a token with an :class:`ExitContext` and returns
``(confidence, token)``: a confidence in [0, 1] (compared with the threshold) and the token it
would emit, or ``None`` when it did not compute one (then the decoder projects the exited state
through the shared head). Measures that keep per-token state (top-k candidates) reset it in
``start_token``. New measures (learned heads, top-k) subclass :class:`ConfidenceMeasure` and
register themselves in ``MEASURES``; the decoding loop never changes.

- ``softmax_max``   top-1 probability of the full-vocabulary softmax (CALM code default), O(V d)
- ``softmax_diff``  top-1 minus top-2 probability (CALM's best measure, paper Sec. 3.5), O(V d)
- ``state``         cosine similarity of layer i-1 and layer i states ("hidden-state saturation"), O(d);
                    never exits at layer 1 (its previous state is the embedding)
- ``topk_diff`` / ``topk_max``  the study's extension: softmax over the first checked layer's top-k
                    tokens only, O(k d) at later layers (``k`` argument)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class ExitContext:
    """What a measure sees at a checked layer of the current token.

    Attributes:
        layer: 1-based layer number ``i`` whose output is ``hidden``.
        hidden: the state of layer ``i`` at the current position, shape (d,).
        history: states of layers 0..i of the current token (index 0 = embedding), each (d,).
        step: index of the generated token (0 = first generated).
    """

    __slots__ = ("layer", "hidden", "history", "step", "_project", "_logits")

    def __init__(self, project: Callable[[int, Tensor, Tensor | None], Tensor]):
        self._project = project
        self.history: list[Tensor] = []
        self.layer, self.hidden, self.step, self._logits = 0, None, 0, None

    def at(self, layer: int, hidden: Tensor) -> "ExitContext":
        self.layer, self.hidden, self._logits = layer, hidden, None
        return self

    def logits(self, rows: Tensor | None = None) -> Tensor:
        """Exit logits of this layer (through the decoder's exit projection, e.g. linear maps)."""
        if rows is not None:
            return self._project(self.layer, self.hidden, rows)
        if self._logits is None:
            self._logits = self._project(self.layer, self.hidden, None)
        return self._logits


class ConfidenceMeasure:
    """Base class. Subclasses set ``name`` and implement ``__call__``."""

    name = "base"

    def start_token(self) -> None:
        """Reset per-token state (called before the first layer of every generated token)."""

    def __call__(self, ctx: ExitContext) -> tuple[float, int | None]:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description saved in every result's config."""
        return {"name": self.name}


def _top2_probs(logits: Tensor) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, 2)
    return top.values, top.indices


class SoftmaxMax(ConfidenceMeasure):
    name = "softmax_max"

    def __call__(self, ctx):
        logits = ctx.logits()
        p = torch.softmax(logits.float(), dim=-1)
        conf, tok = p.max(dim=-1)
        return float(conf), int(tok)


class SoftmaxDiff(ConfidenceMeasure):
    name = "softmax_diff"

    def __call__(self, ctx):
        values, indices = _top2_probs(ctx.logits())
        return float(values[0] - values[1]), int(indices[0])


class StateCosine(ConfidenceMeasure):
    name = "state"

    def __call__(self, ctx):
        if ctx.layer <= 1:
            return 0.0, None
        prev = ctx.history[ctx.layer - 1]
        return float(F.cosine_similarity(prev.float(), ctx.hidden.float(), dim=-1)), None


class TopK(ConfidenceMeasure):
    """Top-k vocabulary restriction (the study's second extension).

    At the first checked layer of a token: full logits, keep the top-k token ids and gather their
    k rows of the LM head. At later checked layers: logits of those k rows only (O(k d)), softmax
    renormalised over the k, confidence = top-1 (``topk_max``) or top-1 minus top-2
    (``topk_diff``). On exit the emitted token is the best of the k. ``k = V`` equals the
    full-vocabulary measure (its later calls use the full head, not a gather of all V rows).
    """

    def __init__(self, k: int, vocab_size: int, kind: str = "diff"):
        if kind not in ("diff", "max"):
            raise ValueError(f"TopK kind must be 'diff' or 'max', got {kind!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= vocab_size:
            raise ValueError(f"top-k needs an integer k with 2 <= k <= V={vocab_size}, got k={k!r}")
        self.k, self.vocab_size, self.kind = k, vocab_size, kind
        self.name = f"topk_{kind}"
        self.candidates: Tensor | None = None
        self.first_full_argmax: int | None = None

    def describe(self):
        return {"name": self.name, "k": self.k}

    def start_token(self):
        self.candidates = None

    def __call__(self, ctx):
        if self.candidates is None:
            logits = ctx.logits()
            top = torch.topk(logits, self.k)
            self.candidates = top.indices                      # (k,)
            sub = top.values
        elif self.k == self.vocab_size:                        # every row: the full head, no (V, d) gather
            sub = ctx.logits()[self.candidates]
        else:
            sub = ctx.logits(rows=self.candidates)             # (k,)
        probs = torch.softmax(sub.float(), dim=-1)
        values, idx = torch.topk(probs, 2)
        conf = values[0] if self.kind == "max" else values[0] - values[1]
        return float(conf), int(self.candidates[idx[0]])


MEASURES: dict[str, Callable[..., ConfidenceMeasure]] = {
    "softmax_max": lambda **kw: SoftmaxMax(),
    "softmax_diff": lambda **kw: SoftmaxDiff(),
    "state": lambda **kw: StateCosine(),
    "topk_diff": lambda k, vocab_size, **kw: TopK(k, vocab_size, "diff"),
    "topk_max": lambda k, vocab_size, **kw: TopK(k, vocab_size, "max"),
}


def make_measure(measure: str | ConfidenceMeasure, **kwargs) -> ConfidenceMeasure:
    """A measure by name (``MEASURES``) or a ready instance (returned as is)."""
    if isinstance(measure, ConfidenceMeasure):
        return measure
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; choose one of {sorted(MEASURES)} "
                         "or pass a ConfidenceMeasure instance (e.g. a trained exit head)")
    try:
        return MEASURES[measure](**kwargs)
    except TypeError as err:
        raise ValueError(f"measure {measure!r} needs more arguments ({err}); top-k measures need k=...") from None
