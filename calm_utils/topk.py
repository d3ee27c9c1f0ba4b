"""Helpers for the top-k vocabulary sweep (notebook 03, issue 5).

The top-k measure (``confidence.TopK``) pays the full LM head once per token, at the first checked
layer, keeps that layer's k best token ids, and at every later checked layer computes logits for
those k rows only (O(k d) instead of O(V d)). This module measures what that buys:

- :func:`confidence_cost_us`  wall-clock cost of one confidence call at a later layer (top-k and
                              full-vocabulary ``softmax_diff``) beside one decoder layer on a single
                              position, plus the FLOP counts (2 k d vs 2 V d).
- :func:`candidate_ranks` / :func:`candidate_miss_rate`  on teacher-forced text (e.g. the model's own
                              greedy continuations), how often the full-depth argmax is outside the
                              first checked layer's top-k (then no later top-k exit can emit it).
- :func:`topk_settings` / :func:`sweep_summary` / :func:`choose_thresholds`  the decoding sweep over
                              (k, threshold), run side by side with the full model by
                              ``experiments.compare_settings``, and per-k threshold choice.
"""
from __future__ import annotations

import re
import statistics
import time

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .calibration import ltt_calibrate, naive_calibrate
from .confidence import ExitContext, make_measure
from .decoding import ExitConfig
from .experiments import Setting, summarize

SWEEP_KS = (2, 8, 32, 128, 512, 2048)  # plus V


def sweep_ks(vocab_size: int, ks=SWEEP_KS) -> list[int]:
    """The k values of the sweep that fit the vocabulary (2 <= k < V), then V itself."""
    return sorted({k for k in ks if 2 <= k < vocab_size} | {vocab_size})


def _median_us(fn, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time (µs) of ``inner`` back-to-back calls of ``fn``."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / inner)
    return statistics.median(samples)


def _probe_ids(view, prompt_ids) -> Tensor:
    if prompt_ids is None:
        gen = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(3, view.vocab_size, (1, 64), generator=gen)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=view.device)
    return ids[None] if ids.dim() == 1 else ids


@torch.inference_mode()
def confidence_cost_us(view, k: int, repeats: int = 30, prompt_ids=None, first_layer: int | None = None,
                       later_layer: int | None = None, inner: int = 10, kind: str = "diff") -> dict:
    """Measured cost (µs, medians over ``repeats``) of one confidence call at a *later* checked layer.

    A real decoding session is opened on ``prompt_ids`` (decoder-only: the prompt; T5: the source;
    default 64 random tokens) and one token is run through every layer. Then, on a single position:

    - ``conf_us``: the top-k measure at ``later_layer`` after its candidates were chosen at
      ``first_layer`` (gather the k rows of the LM head, k-row matvec, softmax over k, top-2),
      called through the measure exactly as the decoder calls it;
    - ``first_us``: the top-k measure's first checked layer (full logits + ``topk(k)``), once per token;
    - ``full_conf_us``: the full-vocabulary ``softmax_diff`` call (full head, softmax over V, top-2);
    - ``layer_us``: one decoder layer (``session.layer``) on that position, its K/V write rewound.

    FLOPs: ``flops`` = 2 k d per later call (multiply-adds of the k-row head), ``full_flops`` = 2 V d.
    ``conf_frac_layer`` = conf_us / layer_us.
    """
    L, V, d = view.num_layers, view.vocab_size, view.hidden_size
    first_layer = first_layer or max(1, L // 2)
    later_layer = later_layer or min(L - 1, first_layer + 1)
    if not 1 <= first_layer <= later_layer <= L:
        raise ValueError(f"need 1 <= first_layer <= later_layer <= L={L}, got {first_layer}, {later_layer}")
    ids = _probe_ids(view, prompt_ids)
    session, first = view.start(ids, 2)
    tok = int(view.logits(first[0, -1]).argmax(-1)) if first is not None else view.decoder_start_token_id
    h = session.embed(tok)
    states = [h]
    for i in range(L):
        h = session.layer(i, h)
        states.append(h)
    mid = max(0, later_layer - 1)  # 0-based layer timed

    def one_layer():
        session.layer(mid, states[mid])
        session.rewind(mid)

    layer_us = _median_us(one_layer, repeats, inner)

    ctx = ExitContext(lambda layer, hh, rows: view.logits(hh, rows))
    h_first, h_later = states[first_layer][0, -1], states[later_layer][0, -1]
    topk = make_measure(f"topk_{kind}", k=k, vocab_size=V)

    def first_call():
        topk.start_token()
        topk(ctx.at(first_layer, h_first))

    first_us = _median_us(first_call, repeats, inner)
    first_call()
    conf_us = _median_us(lambda: topk(ctx.at(later_layer, h_later)), repeats, inner)
    full = make_measure(f"softmax_{kind}")
    full_conf_us = _median_us(lambda: full(ctx.at(later_layer, h_later)), repeats, inner)
    return {"k": k, "V": V, "d": d, "conf_us": conf_us, "first_us": first_us, "full_conf_us": full_conf_us,
            "layer_us": layer_us, "conf_frac_layer": conf_us / layer_us, "flops": 2 * k * d,
            "full_flops": 2 * V * d}


@torch.inference_mode()
def candidate_ranks(view, states: Tensor, first_layer: int) -> Tensor:
    """Rank (0 = best) of the full-depth argmax among layer ``first_layer``'s logits, per position.

    ``states``: (L+1, T, d) pre-norm states (``view.hidden_states``), rows = positions to score.
    The full-depth token is inside the top-k of ``first_layer`` iff its rank < k (ties counted against it).
    """
    final = view.logits(states[view.num_layers]).argmax(-1)          # (T,)
    early = view.logits(states[first_layer]).float()                  # (T, V)
    target = early.gather(-1, final[:, None])                         # (T, 1)
    return (early > target).sum(-1) + ((early == target).sum(-1) - 1)


@torch.inference_mode()
def candidate_miss_rate(view, sequences: list[Tensor], ks, first_layer: int, starts: list[int] | None = None,
                        sources: list[Tensor] | None = None, model_name: str = "") -> pd.DataFrame:
    """Share of tokens whose full-depth argmax is outside the top-k of the first checked layer.

    Teacher-forced. Decoder-only: ``sequences`` are (1, T) prompt+continuation ids and ``starts[j]`` the
    length of prompt j (only positions predicting the continuation count; all positions without
    ``starts``). Encoder-decoder (T5): ``sources`` are the source ids and ``sequences`` the generated
    target tokens (``view.hidden_states(src, tgt)``, every target position counts).
    Columns: ``model, first_layer, k, miss_rate, n_tokens``.
    """
    ranks = []
    for j, seq in enumerate(sequences):
        if sources is not None:
            states = view.hidden_states(sources[j], seq)
        else:
            states = view.hidden_states(seq)
            lo = 0 if starts is None else starts[j] - 1
            states = states[:, lo:-1] if starts is not None else states
        ranks.append(candidate_ranks(view, states, first_layer))
    r = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    n = int(r.numel())
    return pd.DataFrame({"model": model_name, "first_layer": first_layer, "k": list(ks),
                         "miss_rate": [float((r >= k).float().mean()) if n else float("nan") for k in ks],
                         "n_tokens": n})


# ---- the decoding sweep ---------------------------------------------------------------------------
def setting_name(k: int, threshold: float) -> str:
    return f"topk(k={k})@{threshold:g}"


_NAME = re.compile(r"topk\(k=(\d+)\)@([0-9.e-]+)$")


def parse_setting(name: str) -> tuple[int, float] | None:
    """``(k, threshold)`` of a name made by :func:`setting_name`; None for others (e.g. 'full')."""
    m = _NAME.match(name)
    return (int(m.group(1)), float(m.group(2))) if m else None


def topk_settings(ks, thresholds, min_exit_layer: int, kind: str = "diff") -> list[Setting]:
    """One confidence Setting per (k, threshold). ``thresholds``: a list (same for every k) or a
    dict ``k -> list`` (per-k grids, e.g. the chosen threshold per k)."""
    out = []
    for k in ks:
        grid = thresholds[k] if isinstance(thresholds, dict) else thresholds
        for lam in np.atleast_1d(grid):
            out.append(Setting(setting_name(k, float(lam)),
                               ExitConfig(measure=f"topk_{kind}", threshold=float(lam),
                                          min_exit_layer=min_exit_layer, measure_kwargs={"k": int(k)})))
    return out


def sweep_summary(runs: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """``experiments.summarize`` plus ``k`` and ``threshold`` columns parsed from the setting names
    (NaN for 'full')."""
    s = summarize(runs, num_layers)
    kt = [parse_setting(n) or (np.nan, np.nan) for n in s["setting"]]
    s.insert(1, "k", [a for a, _ in kt])
    s.insert(2, "threshold", [b for _, b in kt])
    return s


def threshold_losses(runs: pd.DataFrame, k: int, prompt_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, losses) for k: losses[i, j] = 1 - consistency of prompt j at threshold i
    (rows of ``compare_settings``), restricted to ``prompt_ids`` when given."""
    rows = runs[runs["setting"].map(lambda n: (parse_setting(n) or (None,))[0] == k)]
    if prompt_ids is not None:
        rows = rows[rows["prompt_id"].isin(set(prompt_ids))]
    rows = rows.assign(threshold=rows["setting"].map(lambda n: parse_setting(n)[1]))
    table = rows.pivot_table(index="threshold", columns=["task", "prompt_id"], values="consistency")
    return table.index.to_numpy(dtype=float), np.clip(1.0 - table.to_numpy(dtype=float), 0.0, 1.0)


def choose_thresholds(runs: pd.DataFrame, ks, delta: float = 0.05, epsilon: float = 0.05,
                      prompt_ids=None) -> pd.DataFrame:
    """Per k: the naive choice (lowest grid threshold with mean loss 1 - consistency <= delta on the
    calibration prompts) and the Learn-then-Test one (``ltt_calibrate``, Hoeffding-Bentkus), with
    the highest grid threshold as fallback when neither certifies one. Columns:
    ``k, naive_threshold, ltt_threshold, ltt_valid, threshold, rule, n_calib, risk_at_choice``."""
    out = []
    for k in ks:
        t, losses = threshold_losses(runs, k, prompt_ids)
        naive = naive_calibrate(t, losses, delta)
        ltt = ltt_calibrate(t, losses, delta, epsilon)
        if ltt.valid:
            lam, rule = ltt.threshold, "ltt"
        elif naive.valid:
            lam, rule = naive.threshold, "naive"
        else:
            lam, rule = float(t.max()), "highest"
        j = int(np.flatnonzero(t == lam)[0])
        out.append({"k": int(k), "naive_threshold": naive.threshold, "ltt_threshold": ltt.threshold,
                    "ltt_valid": ltt.valid, "threshold": lam, "rule": rule, "n_calib": losses.shape[1],
                    "risk_at_choice": float(losses[j].mean())})
    return pd.DataFrame(out)
