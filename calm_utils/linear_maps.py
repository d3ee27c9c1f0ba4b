"""Per-layer linear maps to the last layer ("Jump to Conclusions", Din et al. 2023).

For each layer i = 0..L-1, ``A_i, b_i`` with ``A_i h_i + b_i ~ h_L`` (pre-norm states) are fitted
in closed form by ridge regression on cached states (:func:`calm_utils.collect.collect_states`):
``W = (X^T X + lam D)^-1 X^T Y`` with ``X = [h_i, 1]`` (N, d+1), ``Y = h_L``, ``D`` = identity
without the bias entry, solved in float64 with ``torch.linalg.solve``. The exit prediction of
layer i is then the usual final norm + shared head on the mapped state; layer L is the identity.

Ridge strength: ``lam = alpha * trace(X^T X) / (d+1)`` (scale-free). ``alpha`` is chosen per
layer from ``ALPHAS`` by the held-out mean squared error of the *normed* mapped state against the
normed ``h_L`` (the quantity the head sees; raw-state MSE is dominated by a few huge outlier
dimensions) on a prompt-level 80/20 split of the training tokens, then refitted on all of them.

:class:`LinearMaps` has ``project(layer, h, rows) -> logits`` to pass as
``EarlyExitDecoder(..., project=maps.project)`` and saves/loads as safetensors + JSON.
:func:`layer_agreement` gives per-layer agreement with the final prediction with and without maps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .utils import atomic_write, atomic_write_text, cache_dir, config_hash

ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def ridge_fit(X: Tensor, Y: Tensor, lam: float) -> Tensor:
    """Closed-form ridge with an unpenalised bias: returns W (d_in+1, d_out), ``Y ~ [X, 1] @ W``."""
    Xa = torch.cat([X.double(), torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)
    G = Xa.T @ Xa
    reg = torch.full((Xa.shape[1],), float(lam), dtype=torch.float64)
    reg[-1] = 0.0
    return torch.linalg.solve(G + torch.diag(reg), Xa.T @ Y.double())


def _rms(x: Tensor) -> Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LinearMaps:
    """Maps ``W[i]`` (d+1, d) for layers i = 0..L (``W[L]`` = identity): ``h_i -> [h_i, 1] @ W[i]``."""

    def __init__(self, W: Tensor, view=None, alphas: list[float] | None = None):
        self.W = W.float()                 # (L+1, d+1, d)
        self.view = view
        self.alphas = alphas or []
        self.num_layers = W.shape[0] - 1

    @property
    def A(self) -> Tensor:                 # (L+1, d, d), acting as h @ A
        return self.W[:, :-1]

    @property
    def b(self) -> Tensor:                 # (L+1, d)
        return self.W[:, -1]

    @classmethod
    def identity(cls, num_layers: int, d: int, view=None) -> "LinearMaps":
        W = torch.zeros(num_layers + 1, d + 1, d)
        W[:, :d] = torch.eye(d)
        return cls(W, view)

    def map(self, layer: int, h: Tensor) -> Tensor:
        """Mapped state of 1-based ``layer`` (0 = embedding); ``h`` (..., d)."""
        if layer >= self.num_layers:
            return h
        W = self.W[layer].to(h.dtype)
        return h @ W[:-1] + W[-1]

    def project(self, layer: int, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """Exit logits of ``layer``: final norm + shared head on the mapped state (``EarlyExitDecoder(project=)``)."""
        if self.view is None:
            raise RuntimeError("LinearMaps.project needs the model view: LinearMaps(W, view) or maps.view = view")
        return self.view.logits(self.map(layer, h), rows)

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path).with_suffix("")
        W = self.W.contiguous().clone()
        out = atomic_write(path.with_suffix(".safetensors"), lambda p: save_file({"W": W}, str(p)))
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"num_layers": self.num_layers, "d": W.shape[-1], "alphas": self.alphas, **(extra or {})}, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path, view=None) -> "LinearMaps":
        path = Path(path).with_suffix("")
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(load_file(str(path.with_suffix(".safetensors")))["W"], view, meta.get("alphas"))


def fit_linear_maps(data: dict, view=None, alphas=ALPHAS, val_frac: float = 0.2, seed: int = 0,
                    use_cache: bool = True, progress: bool = True, name: str = "") -> LinearMaps:
    """Fit per-layer ridge maps on ``data['states']`` (N, L+1, d); choose alpha per layer on a prompt split.

    ``alphas`` of length 1 skips the selection. Cached under ``cache_dir("heads")`` by config hash.
    """
    states, groups = data["states"], data["group"]
    N, Lp1, d = states.shape
    L = Lp1 - 1
    from .heads import _data_key
    cfg = {"kind": "linear_maps", "alphas": list(alphas), "val_frac": val_frac, "seed": seed,
           "data": _data_key(data), "version": 1}
    path = cache_dir("heads") / f"{name}maps_{config_hash(cfg)}"
    if use_cache and path.with_suffix(".safetensors").exists() and path.with_suffix(".json").exists():
        return LinearMaps.load(path, view)

    ug = torch.unique(groups)
    perm = ug[torch.randperm(len(ug), generator=torch.Generator().manual_seed(seed))]
    n_val = max(1, int(round(val_frac * len(ug)))) if len(alphas) > 1 and len(ug) > 1 else 0
    val = torch.isin(groups, perm[:n_val])
    Y = states[:, L].double()
    W = torch.zeros(L + 1, d + 1, d, dtype=torch.float64)
    W[L, :d] = torch.eye(d, dtype=torch.float64)
    chosen = []
    for i in tqdm(range(L), desc="ridge maps", disable=not progress, file=sys.stderr):
        X = states[:, i].double()
        scale = lambda Xs: float((Xs.pow(2).sum() + Xs.shape[0]) / (d + 1))  # trace of [X,1]^T[X,1] / (d+1)
        best = alphas[0]
        if n_val:
            Xt, Yt, Xv, Yv = X[~val], Y[~val], X[val], Y[val]
            s = scale(Xt)
            errs = []
            for a in alphas:
                Wa = ridge_fit(Xt, Yt, a * s)
                pred = Xv @ Wa[:-1] + Wa[-1]
                errs.append(float((_rms(pred) - _rms(Yv)).pow(2).mean()))
            best = alphas[int(torch.tensor(errs).argmin())]
        W[i] = ridge_fit(X, Y, best * scale(X))
        chosen.append(best)
    maps = LinearMaps(W.float(), view, chosen)
    if use_cache:
        maps.save(path, {"train": cfg})
    return maps


@torch.no_grad()
def mapped_argmax(view, states: Tensor, maps: LinearMaps | None = None, layers=None, chunk: int = 256,
                  progress: bool = False) -> Tensor:
    """Per-layer argmax (N, len(layers)) of final norm + head on (optionally mapped) states (N, L+1, d)."""
    L = states.shape[1] - 1
    layers = list(layers) if layers is not None else list(range(1, L + 1))
    out = torch.empty(states.shape[0], len(layers), dtype=torch.long)
    for j, l in enumerate(tqdm(layers, desc="agreement", disable=not progress, file=sys.stderr)):
        for s in range(0, states.shape[0], chunk):
            h = states[s:s + chunk, l].float().to(view.device)
            if maps is not None:
                h = maps.map(l, h)
            out[s:s + chunk, j] = view.logits(h).argmax(-1).cpu()
    return out


def layer_agreement(view, states: Tensor, final: Tensor, maps: LinearMaps | None = None, model: str = "",
                    layers=None, labels: Tensor | None = None, progress: bool = False) -> pd.DataFrame:
    """Per-layer share of tokens whose layer-l prediction equals ``final`` (the layer-L argmax (N,)).

    Rows ``(model, layer, agreement, mapped)``: ``mapped=False`` always (from ``labels`` (N, L) when
    given, else through the head), ``mapped=True`` too when ``maps`` is given.
    """
    L = states.shape[1] - 1
    layers = list(layers) if layers is not None else list(range(1, L + 1))
    rows = []
    if labels is not None:
        plain = labels[:, [l - 1 for l in layers]].float().mean(0)
    else:
        plain = (mapped_argmax(view, states, None, layers, progress=progress) == final[:, None]).float().mean(0)
    rows += [(model, l, float(a), False) for l, a in zip(layers, plain)]
    if maps is not None:
        m = (mapped_argmax(view, states, maps, layers, progress=progress) == final[:, None]).float().mean(0)
        rows += [(model, l, float(a), True) for l, a in zip(layers, m)]
    return pd.DataFrame(rows, columns=["model", "layer", "agreement", "mapped"])
