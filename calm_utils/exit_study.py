"""The attention exit head study (notebook 02, issue 4): learned heads vs CALM's measures on both models.

Builds on :mod:`calm_utils.collect` (per-layer states of the model's own continuations),
:mod:`calm_utils.heads` (linear / MLP / attention exit heads) and :mod:`calm_utils.linear_maps`.

- :func:`smollm2_artefacts` / :func:`t5_artefacts`: training and held-out states, heads (and maps for
  SmolLM2), cached; SmolLM2 uses exactly the calls of ``scripts/exit_heads.py`` (same cache keys).
- :func:`auc_table`: held-out per-layer ROC-AUC of every measure (softmax_max, softmax_diff, state,
  linear, mlp, attention) for predicting CALM's consistency label.
- :func:`offline_exit` / :func:`pick_thresholds`: the exit rule simulated on held-out states (first layer
  whose score clears ``t``); the threshold grid per measure is the lowest ``t`` whose simulated
  token-level consistency reaches each target, so measures with different scales get comparable grids.
- :func:`tradeoff_runs`: decode real prompts with every (measure, threshold[, maps]) interleaved with the
  full model (:func:`calm_utils.experiments.compare_settings`), summarised per setting.
- :func:`matched_table`: per measure, the grid point with the lowest average exit layer whose measured
  consistency is >= a level.
- :func:`head_costs`: microseconds per exit-head call beside one decoder layer and one softmax_diff call.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from .collect import collect_states
from .confidence import ExitContext, SoftmaxDiff
from .decoding import ExitConfig
from .experiments import Setting, compare_settings, summarize
from .heads import KINDS, HeadMeasure, predict, time_head_call, train_head
from .linear_maps import fit_linear_maps, layer_agreement

MEASURES = ("softmax_max", "softmax_diff", "state", "linear", "mlp", "attention")
BUILTIN = ("softmax_max", "softmax_diff", "state")


# ---- artefacts ---------------------------------------------------------------------------------
def smollm2_prompts(tok, rows_squad, rows_sci):
    from .data import load_scitldr, load_squad, scitldr_prompt, squad_prompt
    from .model import encode_chat
    squad, sci = load_squad(), load_scitldr("train")
    out = [encode_chat(tok, squad_prompt(squad[i]["context"], squad[i]["question"])) for i in rows_squad]
    return out + [encode_chat(tok, scitldr_prompt(sci[i]["source"])) for i in rows_sci]


# sizes of scripts/exit_heads.py (full, --smoke)
SMOLLM2_SIZES = {False: dict(squad=60, scitldr=30, held_squad=20, held_scitldr=10, max_new_tokens=32, epochs=20),
                 True: dict(squad=4, scitldr=2, held_squad=2, held_scitldr=1, max_new_tokens=12, epochs=3)}


def smollm2_artefacts(view, tok, smoke: bool, lr: float = 2e-3, progress: bool = False) -> dict:
    """Training / held-out states, linear maps and the three heads on SmolLM2 (as scripts/exit_heads.py)."""
    z = SMOLLM2_SIZES[bool(smoke)]
    tag = "smoke_" if smoke else ""
    train_p = smollm2_prompts(tok, range(z["squad"]), range(z["scitldr"]))
    held_p = smollm2_prompts(tok, range(5000, 5000 + z["held_squad"]), range(1000, 1000 + z["held_scitldr"]))
    train = collect_states(view, train_p, z["max_new_tokens"], name=f"{tag}exit_train", progress=progress)
    held = collect_states(view, held_p, z["max_new_tokens"], name=f"{tag}exit_heldout", progress=progress)
    maps = fit_linear_maps(train, view, name=tag, progress=progress)
    heads = {k: train_head(k, train, epochs=z["epochs"], lr=lr, seed=0, name=tag, progress=progress) for k in KINDS}
    return {"train": train, "held": held, "maps": maps, "heads": heads}


T5_SIZES = {False: dict(train=200, held=60, max_new_tokens=40, epochs=20),
            True: dict(train=16, held=8, max_new_tokens=20, epochs=3)}


def t5_artefacts(view, tok, smoke: bool, lr: float = 2e-3, maps: bool = True, progress: bool = False) -> dict:
    """States of the CALM-trained T5's own greedy translations (Multi30k train sentences for training,
    val sentences held out), the three heads and (``maps``) per-layer linear maps."""
    from .data import load_multi30k
    z = T5_SIZES[bool(smoke)]
    tag = "smoke_" if smoke else ""
    src = lambda split, n: [tok(s, return_tensors="pt")["input_ids"] for s in load_multi30k(split)["en"][:n]]
    train = collect_states(view, src("train", z["train"]), z["max_new_tokens"], name=f"{tag}t5_exit_train",
                           progress=progress)
    held = collect_states(view, src("val", z["held"]), z["max_new_tokens"], name=f"{tag}t5_exit_heldout",
                          progress=progress)
    out = {"train": train, "held": held, "maps": None,
           "heads": {k: train_head(k, train, epochs=z["epochs"], lr=lr, seed=0, name=f"{tag}t5_", progress=progress)
                     for k in KINDS}}
    if maps:
        out["maps"] = fit_linear_maps(train, view, name=f"{tag}t5_", progress=progress)
    return out


# ---- offline scores and AUC ----------------------------------------------------------------------
def state_cosine(states: torch.Tensor) -> torch.Tensor:
    """The ``state`` measure offline: cos(h_{l-1}, h_l) for l = 1..L, 0 at layer 1 (as ``StateCosine``)."""
    s = states.float()
    cos = F.cosine_similarity(s[:, :-1], s[:, 1:], dim=-1)
    cos[:, 0] = 0.0
    return cos


def offline_scores(data: dict, heads: dict) -> dict[str, torch.Tensor]:
    """Every measure's confidence (N, L) on collected states."""
    out = {"softmax_max": data["softmax_max"].float(), "softmax_diff": data["softmax_diff"].float(),
           "state": state_cosine(data["states"])}
    for k, h in heads.items():
        out[k] = predict(h, data["states"])
    return out


def auc_table(model: str, data: dict, scores: dict) -> pd.DataFrame:
    """Rows ``model, measure, layer, auc`` for layers 1..L-1 (NaN where a layer's label is constant)."""
    y_all = data["labels"]
    L = y_all.shape[1]
    rows = []
    for name, sc in scores.items():
        for l in range(1, L):
            y = y_all[:, l - 1].numpy()
            auc = float("nan") if y.min() == y.max() else roc_auc_score(y, sc[:, l - 1].numpy())
            rows.append((model, name, l, auc))
    return pd.DataFrame(rows, columns=["model", "measure", "layer", "auc"])


# ---- exit rule simulated offline ----------------------------------------------------------------
def checked_mask(num_layers: int, min_exit_layer: int = 1, exit_interval: int = 1) -> torch.Tensor:
    """Bool (L-1,) over layers 1..L-1: where the decoder asks the measure (``ExitConfig.checked_layers``)."""
    return torch.tensor(ExitConfig(min_exit_layer=min_exit_layer, exit_interval=exit_interval)
                        .checked_layers(num_layers)[1:num_layers])


def offline_exit(scores: torch.Tensor, labels: torch.Tensor, t: float,
                 checked: torch.Tensor | None = None) -> tuple[float, float]:
    """(token consistency, average exit layer) of "exit at the first checked layer l < L with score >= t"."""
    s = scores[:, :-1] >= t
    if checked is not None:
        s = s & checked[None]
    L = labels.shape[1]
    first = torch.where(s.any(1), s.float().argmax(1), torch.full((s.shape[0],), L - 1))
    cons = labels[torch.arange(labels.shape[0]), first].float().mean()
    return float(cons), float((first + 1).float().mean())


def pick_thresholds(scores: torch.Tensor, labels: torch.Tensor, targets=(0.99, 0.95, 0.9),
                    n_candidates: int = 400, checked: torch.Tensor | None = None) -> list[float]:
    """Per target, the lowest candidate threshold (quantiles of the scores) whose simulated token
    consistency is >= target (the highest candidate when none reaches it). Sorted high to low, deduplicated."""
    v = scores[:, :-1].flatten().float()
    cands = torch.unique(torch.quantile(v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:100000]],
                                        torch.linspace(0, 1, n_candidates)))
    cands = torch.cat([cands, cands[-1:] + 1e-6]).tolist()
    sims = [(t, offline_exit(scores, labels, t, checked)[0]) for t in cands]
    out = []
    for tgt in targets:
        ok = [t for t, c in sims if c >= tgt]
        out.append(round(min(ok), 6) if ok else round(cands[-1], 6))
    return sorted(set(out), reverse=True)


def offline_tradeoff(model: str, scores: dict, labels: torch.Tensor, n: int = 40,
                     checked: torch.Tensor | None = None) -> pd.DataFrame:
    """Simulated (consistency, avg exit layer) curve per measure over quantile thresholds (held-out states)."""
    rows = []
    for name, sc in scores.items():
        v = sc[:, :-1].flatten().float()
        for t in torch.unique(torch.quantile(v[:100000], torch.linspace(0.5, 1, n))).tolist():
            c, a = offline_exit(sc, labels, t, checked)
            rows.append((model, name, t, c, a))
    return pd.DataFrame(rows, columns=["model", "measure", "threshold", "token_consistency", "avg_exit_layer"])


# ---- decoding trade-off -----------------------------------------------------------------------
def make_setting(measure: str, threshold: float, heads: dict, maps=None, min_exit_layer: int = 1,
                 exit_interval: int = 1) -> Setting:
    name = f"{measure}{'+maps' if maps is not None else ''}@{threshold:.6g}"
    cfg = ExitConfig(measure=measure if measure in BUILTIN else "softmax_diff", threshold=float(threshold),
                     min_exit_layer=min_exit_layer, exit_interval=exit_interval)
    m = HeadMeasure(heads[measure]) if measure not in BUILTIN else None
    return Setting(name, cfg, m, maps.project if maps is not None else None)


def tradeoff_runs(model: str, view, prompts, grids: dict, heads: dict, max_new_tokens: int, maps=None,
                  with_maps: bool = False, consistency_metric: str = "rouge_l", desc: str = "",
                  min_exit_layer: int = 1, exit_interval: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode ``prompts`` with every measure over its grid (and, ``with_maps``, again with ``maps.project``),
    interleaved with the full model. Returns (per-setting table of the trade-off CSV, raw runs)."""
    settings, meta = [], {}
    for use_maps in ([False, True] if with_maps else [False]):
        for measure, grid in grids.items():
            for t in grid:
                s = make_setting(measure, t, heads, maps if use_maps else None, min_exit_layer, exit_interval)
                settings.append(s)
                meta[s.name] = (measure, use_maps, t)
    runs = compare_settings(view, prompts, settings, max_new_tokens, consistency_metric=consistency_metric,
                            desc=desc or f"{model} trade-off")
    summ = summarize(runs, view.num_layers)
    summ = summ[summ.setting != "full"].copy()
    summ["model"] = model
    summ["measure"] = [meta[s][0] for s in summ.setting]
    summ["maps"] = [meta[s][1] for s in summ.setting]
    summ["threshold"] = [meta[s][2] for s in summ.setting]
    cols = ["model", "measure", "maps", "threshold", "avg_exit_layer", "consistency", "quality", "speedup",
            "ideal_speedup", "ms_per_token", "tokens"]
    full = summarize(runs, view.num_layers).query("setting == 'full'")
    summ["full_quality"] = float(full["quality"].iloc[0])
    summ["full_ms_per_token"] = float(full["ms_per_token"].iloc[0])
    return summ[cols + ["full_quality", "full_ms_per_token"]].reset_index(drop=True), runs


def matched_table(trade: pd.DataFrame, levels=(0.9, 0.8), measures=("linear", "attention", "softmax_diff"),
                  num_layers: dict | None = None) -> pd.DataFrame:
    """Per (model, maps, measure, level): the grid point with the lowest average exit layer among those
    whose measured consistency >= level; when none qualifies, the full model (exit layer L, speed-up 1)."""
    rows = []
    for (model, maps), g in trade.groupby(["model", "maps"]):
        L = (num_layers or {}).get(model, float("nan"))
        for measure in measures:
            gm = g[g.measure == measure]
            if gm.empty:
                continue
            for lvl in levels:
                ok = gm[gm.consistency >= lvl]
                if ok.empty:
                    rows.append((model, maps, measure, lvl, float("nan"), L, 1.0, 1.0, float("nan"), False))
                else:
                    r = ok.sort_values(["avg_exit_layer", "threshold"]).iloc[0]
                    rows.append((model, maps, measure, lvl, r.threshold, r.avg_exit_layer, r.speedup,
                                 r.consistency, r.quality, True))
    return pd.DataFrame(rows, columns=["model", "maps", "measure", "level", "threshold", "avg_exit_layer",
                                       "speedup", "consistency", "quality", "reached"])


# ---- cost ------------------------------------------------------------------------------------------
@torch.no_grad()
def decoder_layer_us(view, prompt_ids, repeats: int = 100) -> float:
    """Microseconds of one decoder layer at one new position (middle layer), via a decoding session."""
    session, _ = view.start(prompt_ids, repeats + 20)
    h = session.embed(5)
    i = view.num_layers // 2
    for _ in range(5):
        session.layer(i, h)
        session.rewind(i)
    t0 = time.perf_counter()
    for _ in range(repeats):
        session.layer(i, h)
        session.rewind(i)
    return (time.perf_counter() - t0) / repeats * 1e6


@torch.no_grad()
def softmax_diff_us(view, history, repeats: int = 10) -> float:
    m, ctx = SoftmaxDiff(), ExitContext(lambda layer, h, rows: view.logits(h, rows))
    ctx.history = history
    i = len(history) // 2
    t0 = time.perf_counter()
    for _ in range(repeats):
        m(ctx.at(i, history[i]))
    return (time.perf_counter() - t0) / repeats * 1e6


def head_costs(model: str, view, heads: dict, held: dict, prompt_ids, repeats: int = 20) -> pd.DataFrame:
    """``model, head, params, us_per_call, decoder_layer_us`` (heads, then softmax_diff with 0 params)."""
    history = list(held["states"][0].float())
    layer_us = decoder_layer_us(view, prompt_ids)
    rows = [(model, k, h.num_params(), time_head_call(h, history, repeats=repeats), layer_us) for k, h in heads.items()]
    rows.append((model, "softmax_diff", 0, softmax_diff_us(view, history, repeats), layer_us))
    return pd.DataFrame(rows, columns=["model", "head", "params", "us_per_call", "decoder_layer_us"])


def agreement_table(model: str, view, art: dict) -> pd.DataFrame:
    """Held-out per-layer agreement with the last layer, with and (when fitted) without linear maps."""
    held = art["held"]
    return layer_agreement(view, held["states"], held["final_argmax"], art["maps"], model=model, labels=held["labels"])


@torch.no_grad()
def state_check(view, data: dict) -> pd.DataFrame:
    """Is the ``state`` measure's AUC ~0.5 a bug? Per layer: mean cosine of raw pre-norm states (what the
    measure uses), AUC of it, and AUC of the cosine after the final norm (the scale the head sees)."""
    s = data["states"].float()
    y = data["labels"]
    raw = state_cosine(s)
    normed = view.norm(s).float()
    cn = F.cosine_similarity(normed[:, :-1], normed[:, 1:], dim=-1)
    L = y.shape[1]
    rows = []
    for l in range(2, L):
        yl = y[:, l - 1].numpy()
        if yl.min() == yl.max():
            continue
        rows.append((l, float(raw[:, l - 1].mean()), float(raw[:, l - 1].std()),
                     roc_auc_score(yl, raw[:, l - 1].numpy()), roc_auc_score(yl, cn[:, l - 1].numpy())))
    return pd.DataFrame(rows, columns=["layer", "cos_mean", "cos_std", "auc_raw", "auc_normed"])


def history_balance(scores: dict, labels: torch.Tensor, cost: pd.DataFrame, checked: torch.Tensor,
                    target: float = 0.9, a: str = "attention", b: str = "linear") -> dict:
    """Simulated on held-out states at token consistency ``target``: decoder layers per token that head ``a``
    saves over head ``b`` (lower average exit layer) against the extra cost of its calls, in decoder layers
    (calls per token = checked layers up to the exit; per-call cost from ``cost.share_of_layer``)."""
    out = {}
    for k in (a, b):
        t = pick_thresholds(scores[k], labels, (target,), checked=checked)[0]
        s = (scores[k][:, :-1] >= t) & checked[None]
        L = labels.shape[1]
        first = torch.where(s.any(1), s.float().argmax(1), torch.full((s.shape[0],), L - 1))   # 0-based exit
        calls = torch.cumsum(checked.long(), 0)[first.clamp(max=L - 2)].float()
        share = float(cost.set_index("head").loc[k, "share_of_layer"])
        out[k] = {"threshold": t, "avg_exit_layer": float((first + 1).float().mean()), "calls": float(calls.mean()),
                  "overhead_layers": float(calls.mean()) * share}
    out["layers_saved"] = out[b]["avg_exit_layer"] - out[a]["avg_exit_layer"]
    out["extra_cost_layers"] = out[a]["overhead_layers"] - out[b]["overhead_layers"]
    return out
