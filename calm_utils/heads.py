"""Learned early-exit heads (CALM's ``meta`` classifier and the study's extensions).

Each head maps a token's per-layer states (B, L+1, d) (index 0 = embedding, pre-norm, as stored by
:func:`calm_utils.collect.collect_states`) to an exit logit per layer 1..L, shape (B, L); the exit
probability is its sigmoid. Heads are trained with the backbone frozen, on cached states, with
CALM's consistency labels (layer-l argmax == layer-L argmax) and class-balanced binary
cross-entropy per layer, averaged over layers 1..L-1 (layer L is never an exit candidate).

Input normalisation: every head first applies a parameter-free LayerNorm over d to the state.
The states' scale grows by orders of magnitude with depth; a shared classifier needs a
scale-free input, and the model's final RMSNorm gain is absorbed by the first linear layer. The
head therefore needs nothing from the model and is stored alone.

- :class:`LinearHead` (``"linear"``, CALM's ``meta``): one linear layer d -> 1 shared by all layers
  (a sigmoid over one logit equals a d -> 2 softmax). ``layer_embed=True`` adds a learned
  per-layer bias (off by default, to stay faithful).
- :class:`MLPHead` (``"mlp"``): d -> hidden -> 1 with GELU, shared by all layers.
- :class:`AttentionHead` (``"attention"``, the extension): the token's states at layers 1..i are
  down-projected to ``d_attn`` and get a learned layer-position embedding; one causal attention
  layer (query = layer i, keys/values = layers 1..i) plus a residual, then LayerNorm -> GELU-linear
  -> 1, plus a linear skip term on layer i's state (so it contains a linear head). Training runs all
  layers at once with a causal mask over layers; at decode time :class:`HeadMeasure` keeps the
  projected keys/values of the current token's earlier layers, so a call costs one d -> d_attn
  projection and an attention over <= L keys.

:func:`train_head` trains (Adam, minibatches of tokens, tqdm), caches the result under
``cache_dir("heads")`` by config hash as ``<kind>_<hash>.safetensors`` + ``.json`` and reuses it.
:class:`HeadMeasure` wraps a head as a :class:`~calm_utils.confidence.ConfidenceMeasure`
(confidence = exit probability, token None), to pass as ``EarlyExitDecoder(..., measure=...)``.
Importing this module also registers ``"linear"``, ``"mlp"`` and ``"attention"`` in
``confidence.MEASURES``: ``ExitConfig(measure="linear", measure_kwargs={"head": head_or_path})``.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .confidence import MEASURES, ConfidenceMeasure, ExitContext
from .utils import atomic_write, atomic_write_text, cache_dir, config_hash

KINDS = ("linear", "mlp", "attention")


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x.float(), x.shape[-1:])


class ExitHead(nn.Module):
    """Base: ``forward(states (B, L+1, d)) -> logits (B, L)`` for layers 1..L."""

    kind = "base"

    def __init__(self, d: int, num_layers: int):
        super().__init__()
        self.d, self.num_layers = d, num_layers

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "num_layers": self.num_layers}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def exit_logit(self, layer: int, history: list[Tensor], cache: list) -> Tensor:
        """Decode-time logit of 1-based ``layer`` from ``history`` (states of layers 0..layer, each (d,))."""
        raise NotImplementedError


class LinearHead(ExitHead):
    kind = "linear"

    def __init__(self, d: int, num_layers: int, layer_embed: bool = False):
        super().__init__(d, num_layers)
        self.layer_embed = layer_embed
        self.linear = nn.Linear(d, 1)
        self.layer_bias = nn.Parameter(torch.zeros(num_layers)) if layer_embed else None

    def config(self):
        return {**super().config(), "layer_embed": self.layer_embed}

    def _score(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def forward(self, states: Tensor) -> Tensor:
        out = self._score(_ln(states[:, 1:]))                   # (B, L)
        return out + self.layer_bias if self.layer_bias is not None else out

    def exit_logit(self, layer, history, cache):
        out = self._score(_ln(history[layer]))
        return out + self.layer_bias[layer - 1] if self.layer_bias is not None else out


class MLPHead(LinearHead):
    kind = "mlp"

    def __init__(self, d: int, num_layers: int, hidden: int = 128, layer_embed: bool = False):
        super().__init__(d, num_layers, layer_embed)
        self.hidden = hidden
        self.linear = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def config(self):
        return {**super().config(), "hidden": self.hidden}


class AttentionHead(ExitHead):
    kind = "attention"

    def __init__(self, d: int, num_layers: int, d_attn: int = 64, n_heads: int = 2):
        super().__init__(d, num_layers)
        if d_attn % n_heads:
            raise ValueError(f"d_attn={d_attn} must be divisible by n_heads={n_heads}")
        self.d_attn, self.n_heads = d_attn, n_heads
        self.down = nn.Linear(d, d_attn)
        self.pos = nn.Parameter(torch.randn(num_layers, d_attn) * 0.02)   # layers 1..L
        self.qkv = nn.Linear(d_attn, 3 * d_attn)
        self.o = nn.Linear(d_attn, d_attn)
        self.out_norm = nn.LayerNorm(d_attn)
        self.out = nn.Linear(d_attn, 1)
        self.skip = nn.Linear(d, 1)

    def config(self):
        return {**super().config(), "d_attn": self.d_attn, "n_heads": self.n_heads}

    def _split(self, x: Tensor) -> Tensor:          # (..., n, d_attn) -> (..., H, n, dh)
        *lead, n, _ = x.shape
        return x.reshape(*lead, n, self.n_heads, -1).transpose(-3, -2)

    def _finish(self, z: Tensor, att: Tensor, xn: Tensor) -> Tensor:
        h = z + self.o(att)
        return self.out(F.gelu(self.out_norm(h))).squeeze(-1) + self.skip(xn).squeeze(-1)

    def forward(self, states: Tensor) -> Tensor:
        xn = _ln(states[:, 1:])                                   # (B, L, d)
        z = self.down(xn) + self.pos                              # (B, L, d_attn)
        q, k, v = self.qkv(z).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), is_causal=True)
        att = att.transpose(1, 2).reshape(z.shape)
        return self._finish(z, att, xn)

    def exit_logit(self, layer, history, cache):
        """``cache`` is a list of (z, k, v) for layers 1..len(cache) of the current token (HeadMeasure resets it)."""
        for j in range(len(cache) + 1, layer + 1):
            xn = _ln(history[j])
            z = self.down(xn) + self.pos[j - 1]
            q, k, v = self.qkv(z).chunk(3, dim=-1)
            cache.append((z, xn, k, v, q))
        z, xn, _, _, q = cache[layer - 1]
        ks = torch.stack([c[2] for c in cache[:layer]])           # (i, d_attn)
        vs = torch.stack([c[3] for c in cache[:layer]])
        H, dh = self.n_heads, self.d_attn // self.n_heads
        qh, kh, vh = q.view(H, 1, dh), ks.view(layer, H, dh).transpose(0, 1), vs.view(layer, H, dh).transpose(0, 1)
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(dh), dim=-1)   # (H, 1, i)
        att = (w @ vh).reshape(self.d_attn)
        return self._finish(z, att, xn)


HEAD_CLASSES = {"linear": LinearHead, "mlp": MLPHead, "attention": AttentionHead}


def make_head(kind: str, d: int, num_layers: int, **kwargs) -> ExitHead:
    if kind not in HEAD_CLASSES:
        raise ValueError(f"unknown exit head {kind!r}; choose one of {KINDS}")
    return HEAD_CLASSES[kind](d, num_layers, **kwargs)


# ---- save / load ----------------------------------------------------------------------------
def save_head(head: ExitHead, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path.safetensors`` (weights) and ``path.json`` (config) atomically; return the weights path."""
    path = Path(path).with_suffix("")
    tensors = {k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    w = atomic_write(path.with_suffix(".safetensors"), lambda p: save_file(tensors, str(p)))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"config": head.config(), **(extra or {})}, indent=1))
    return w


def load_head(path: str | Path) -> ExitHead:
    path = Path(path).with_suffix("")
    cfg = dict(json.loads(path.with_suffix(".json").read_text())["config"])
    head = make_head(cfg.pop("kind"), cfg.pop("d"), cfg.pop("num_layers"), **cfg)
    head.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return head.eval()


# ---- training -------------------------------------------------------------------------------
def balanced_bce(logits: Tensor, labels: Tensor, pos_weight: Tensor, neg_weight: Tensor) -> Tensor:
    """Class-balanced BCE per layer, averaged over tokens then layers. ``logits``/``labels`` (B, K)."""
    y = labels.float()
    w = y * pos_weight + (1 - y) * neg_weight
    per = F.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="none")
    return (per.sum(0) / w.sum(0).clamp_min(1e-8)).mean()


def _data_key(data: dict) -> str:
    meta = data.get("meta") or {}
    if "key" in meta:
        return f"{meta['key']}:{hashlib.sha256(data['group'].numpy().tobytes()).hexdigest()[:16]}"
    s, y = data["states"], data.get("labels")
    return config_hash([list(s.shape), float(s.double().sum()), float((s.double() ** 2).sum()),
                        None if y is None else int(y.sum())])


def train_head(kind: str, data: dict, epochs: int = 10, lr: float = 1e-3, seed: int = 0, batch_size: int = 256,
               weight_decay: float = 1e-4, head_kwargs: dict | None = None, use_cache: bool = True,
               progress: bool = True, name: str = "") -> ExitHead:
    """Train an exit head of ``kind`` on ``data`` (``states`` (N, L+1, d), ``labels`` (N, L) bool).

    The loss covers layers 1..L-1; class weights per layer are n / (2 n_class) on the training set.
    Cached as ``cache_dir("heads") / f"{name}{kind}_{hash}"`` (.safetensors + .json) and reused.
    """
    states, labels = data["states"], data["labels"].bool()
    N, Lp1, d = states.shape
    L = Lp1 - 1
    head_kwargs = dict(head_kwargs or {})
    cfg = {"kind": kind, "d": d, "L": L, "head": head_kwargs, "epochs": epochs, "lr": lr, "seed": seed,
           "batch_size": batch_size, "wd": weight_decay, "data": _data_key(data), "version": 1}
    path = cache_dir("heads") / f"{name}{kind}_{config_hash(cfg)}"
    if use_cache and path.with_suffix(".safetensors").exists() and path.with_suffix(".json").exists():
        return load_head(path)

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = make_head(kind, d, L, **head_kwargs)
    y = labels[:, : L - 1]
    pos = y.float().sum(0)
    neg = N - pos
    pos_w = (N / (2 * pos.clamp_min(1))).clamp(max=1e3)
    neg_w = (N / (2 * neg.clamp_min(1))).clamp(max=1e3)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(N / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    head.train()
    t0, losses = time.time(), []
    bar = tqdm(total=steps, desc=f"train {kind}", disable=not progress, file=sys.stderr)
    for _ in range(epochs):
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, batch_size):
            idx = perm[s:s + batch_size]
            logits = head(states[idx].float())[:, : L - 1]
            loss = balanced_bce(logits, y[idx], pos_w, neg_w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    head.eval()
    if use_cache:
        save_head(head, path, {"train": {**cfg, "final_loss": losses[-1] if losses else None,
                                         "seconds": round(time.time() - t0, 1), "tokens": N}})
    return head


@torch.no_grad()
def predict(head: ExitHead, states: Tensor, batch_size: int = 1024) -> Tensor:
    """Exit probabilities (N, L) for states (N, L+1, d)."""
    head.eval()
    return torch.cat([torch.sigmoid(head(states[s:s + batch_size].float()))
                      for s in range(0, states.shape[0], batch_size)])


# ---- as a confidence measure ------------------------------------------------------------------
class HeadMeasure(ConfidenceMeasure):
    """A trained exit head as a confidence measure: confidence = exit probability, token None."""

    def __init__(self, head: ExitHead):
        self.head = head.eval()
        self.name = head.kind
        self._cache: list = []

    def describe(self):
        return {"name": self.name, "head": self.head.config(), "params": self.head.num_params()}

    def start_token(self):
        self._cache = []

    @torch.no_grad()
    def __call__(self, ctx: ExitContext):
        logit = self.head.exit_logit(ctx.layer, ctx.history, self._cache)
        return float(torch.sigmoid(logit)), None


def _factory(kind):
    def build(head=None, **kw):
        if head is None:
            raise ValueError(f"measure {kind!r} needs measure_kwargs={{'head': <ExitHead or saved path>}}")
        head = head if isinstance(head, ExitHead) else load_head(head)
        if head.kind != kind:
            raise ValueError(f"measure {kind!r} got a {head.kind!r} head")
        return HeadMeasure(head)
    return build


for _k in KINDS:
    MEASURES.setdefault(_k, _factory(_k))


# ---- cost --------------------------------------------------------------------------------------
@torch.no_grad()
def time_head_call(head: ExitHead, history: list[Tensor], repeats: int = 20) -> float:
    """Mean microseconds per decode-time call of ``HeadMeasure(head)``, averaged over one token's
    checked layers 1..L-1 (the attention head's per-token cache included)."""
    measure, ctx = HeadMeasure(head), ExitContext(lambda *a: None)
    L = len(history) - 1
    ctx.history = history
    calls, t0 = 0, time.perf_counter()
    for _ in range(repeats):
        measure.start_token()
        for i in range(1, L):
            measure(ctx.at(i, history[i]))
            calls += 1
    return (time.perf_counter() - t0) / calls * 1e6
