"""Learn-then-Test on real decoding runs: threshold sweeps and CALM's 50-split validation.

``threshold_sweep`` decodes every prompt at every threshold of a grid (and once with the full model)
and returns per-example losses for both of CALM's constraints:

- textual consistency: ``1 - D_sim(early, full)`` with ROUGE-L (summaries), BLEU/100 (translation) or
  token F1 (QA) between the early-exit and the full model's outputs (no references needed);
- risk consistency: ``max(0, q(full, refs) - q(early, refs))`` with q the task metric in [0, 1]. CALM bounds
  the difference of risks; LTT needs losses in [0, 1], so a per-example *gain* is counted as 0 (conservative).

``calibration_table`` then runs :func:`calm_utils.calibration.split_validation` per delta, for LTT and for
naive tuning, and reports threshold, average exit layer, wall-clock speed-up, test risk and the share of
splits whose test risk <= delta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .calibration import split_validation, summarize_splits
from .decoding import EarlyExitDecoder, ExitConfig
from .metrics import textual_consistency


@dataclass
class Sweep:
    """Per-threshold, per-example arrays of shape (n_thresholds, n_examples)."""
    thresholds: np.ndarray
    textual_loss: np.ndarray
    risk_loss: np.ndarray
    avg_exit_layer: np.ndarray
    ms_per_token: np.ndarray
    full_ms_per_token: np.ndarray  # (n_examples,)


def threshold_sweep(view, prompts: list, make_config: Callable[[float], ExitConfig], thresholds,
                    quality: Callable[[str, object], float], consistency_metric: str,
                    max_new_tokens: int, measure_factory: Callable[[], object] | None = None,
                    project=None, desc: str = "threshold sweep") -> Sweep:
    """Decode each prompt with the full model, then at every threshold (interleaved per prompt).

    Args:
        prompts: objects with ``ids`` (1, T) (and whatever ``quality`` needs, e.g. references).
        make_config: threshold -> ExitConfig of the measure under study.
        quality: ``(text, prompt) -> score in [0, 1]`` (task metric against references).
        consistency_metric: 'rouge_l' | 'bleu' | 'token_f1'.
    """
    thresholds = np.asarray(thresholds, dtype=float)
    full = EarlyExitDecoder(view, ExitConfig(policy="full", max_new_tokens=max_new_tokens))
    decoders = []
    for lam in thresholds:
        cfg = make_config(float(lam))
        cfg.max_new_tokens = max_new_tokens
        decoders.append(EarlyExitDecoder(view, cfg, measure_factory() if measure_factory else None, project))
    shape = (len(thresholds), len(prompts))
    tl, rl, ex, ms = (np.zeros(shape) for _ in range(4))
    full_ms = np.zeros(len(prompts))
    for j, p in enumerate(tqdm(prompts, desc=desc)):
        ref = full.generate(p.ids)
        full_ms[j] = ref.ms_per_token
        q_full = quality(ref.text, p)
        for i, dec in enumerate(decoders):
            res = dec.generate(p.ids)
            tl[i, j] = 1.0 - textual_consistency(res.text, ref.text, consistency_metric)
            rl[i, j] = max(0.0, q_full - quality(res.text, p))
            ex[i, j] = res.avg_exit_layer
            ms[i, j] = res.ms_per_token
    return Sweep(thresholds, tl, rl, ex, ms, full_ms)


def calibration_table(sweep: Sweep, deltas, epsilon: float = 0.05, n_splits: int = 50, seed: int = 0,
                      **labels) -> pd.DataFrame:
    """CALM's validation per delta, for both constraints and both methods (LTT, naive).

    Columns: the ``labels`` (model, task, measure...), ``constraint, method, delta, epsilon, threshold,
    found_fraction, avg_layers, speedup, test_risk, valid_fraction, meets_guarantee, n_examples``.
    ``speedup`` is mean full-model ms/token over mean early-exit ms/token on each split's test part
    (averaged over splits), measured in the same run.
    """
    n = sweep.textual_loss.shape[1]
    extra = {"avg_layers": sweep.avg_exit_layer, "ms": sweep.ms_per_token,
             "full_ms": np.broadcast_to(sweep.full_ms_per_token, sweep.ms_per_token.shape)}
    rows = []
    for constraint, losses in (("textual", sweep.textual_loss), ("risk", sweep.risk_loss)):
        for method in ("ltt", "naive"):
            for delta in deltas:
                df = split_validation(sweep.thresholds, losses, delta, epsilon, n_splits=n_splits, seed=seed,
                                      method=method, extra=extra)
                s = summarize_splits(df, epsilon)
                rows.append({**labels, "constraint": constraint, "method": method, "delta": delta,
                             "epsilon": epsilon, "threshold": s["mean_threshold"],
                             "found_fraction": s["found_fraction"], "avg_layers": df["avg_layers"].mean(),
                             "speedup": float((df["full_ms"] / df["ms"]).mean()),
                             "test_risk": s["mean_test_risk"], "valid_fraction": s["valid_fraction"],
                             "meets_guarantee": s["meets_guarantee"], "n_examples": n})
    return pd.DataFrame(rows)


def sweep_table(sweep: Sweep, **labels) -> pd.DataFrame:
    """The raw trade-off: per threshold, mean losses, exit layer and speed-up over all examples."""
    return pd.DataFrame({**labels, "threshold": sweep.thresholds,
                         "textual_risk": sweep.textual_loss.mean(1), "risk_loss": sweep.risk_loss.mean(1),
                         "avg_layers": sweep.avg_exit_layer.mean(1),
                         "speedup": sweep.full_ms_per_token.mean() / sweep.ms_per_token.mean(1)})
