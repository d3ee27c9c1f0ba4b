"""Learn-then-Test (LTT) threshold calibration, as used by CALM.

CALM (Schuster et al., 2022, "Confident Adaptive Language Modeling", Sec. 3-4)
chooses the early-exit confidence threshold ``lambda`` with Learn-then-Test
(Angelopoulos, Bates, Candes, Jordan and Lei, 2021, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", arXiv:2110.01052):

* every candidate threshold ``lambda_j`` defines a null hypothesis
  ``H_j: R(lambda_j) > delta`` where ``R`` is the expected loss (for CALM a
  textual or risk *consistency* loss in ``[0, 1]`` w.r.t. the full model);
* a valid p-value for ``H_j`` is computed from the empirical risk on ``n``
  calibration examples (Hoeffding, Bentkus, or their minimum "HB");
* thresholds are tested in a fixed sequence from the safest (highest, i.e.
  closest to the full model) downward, stopping at the first non-rejection;
  the family-wise error rate is then ``<= epsilon`` without any correction,
  so the lowest rejected threshold satisfies
  ``P(R(lambda_hat) <= delta) >= 1 - epsilon`` over the calibration draw.

CALM uses ``epsilon = 0.05`` and validates the guarantee with 50 random 80/20
calibration/test splits (:func:`split_validation`).

The losses are given as a matrix of shape ``(n_thresholds, n_examples)``: the
loss of each calibration example when decoding with each threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import binom

__all__ = [
    "LTTResult",
    "hoeffding_pvalue",
    "bentkus_pvalue",
    "hoeffding_bentkus_pvalue",
    "PVALUES",
    "ltt_calibrate",
    "naive_calibrate",
    "split_validation",
    "summarize_splits",
]

# Tolerance when turning n * risk_hat into an integer count: an empirical risk
# of 0.1 over n = 30 examples is 3 / 30, but 30 * 0.1 = 3.0000000000000004 in
# floating point, which a bare ceil would turn into 4 (a larger p-value).
_COUNT_TOL = 1e-9


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_level(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < v < 1.0) or not math.isfinite(v):
        raise ValueError(
            f"{name} must lie strictly between 0 and 1, got {value!r}; "
            f"CALM uses e.g. delta in [0.05, 0.5] and epsilon = 0.05"
        )
    return v


def _check_n(n) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(
            f"n (number of calibration examples) must be a positive integer, got {n!r}; "
            f"an empty calibration set gives no guarantee: collect calibration examples first"
        )
    return int(n)


def _check_risk(risk_hat) -> np.ndarray:
    r = np.asarray(risk_hat, dtype=float)
    if not np.all(np.isfinite(r)) or np.any((r < 0) | (r > 1)):
        raise ValueError(
            f"risk_hat must be finite and in [0, 1] (mean of losses in [0, 1]), got {risk_hat!r}"
        )
    return r


def _check_inputs(thresholds, losses) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``thresholds`` (1-D) and ``losses`` (n_thresholds, n_examples)."""
    t = np.asarray(thresholds, dtype=float)
    if t.ndim != 1:
        raise ValueError(
            f"thresholds must be a 1-D array, got shape {t.shape}; pass the grid of candidate "
            f"thresholds as a flat array"
        )
    if t.size == 0:
        raise ValueError("thresholds is empty: pass at least one candidate threshold")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds must be finite, got NaN/inf at positions {np.flatnonzero(~np.isfinite(t)).tolist()}")
    L = np.asarray(losses, dtype=float)
    if L.ndim != 2:
        raise ValueError(
            f"losses must have shape (n_thresholds, n_examples) = ({t.size}, n), got shape {L.shape}; "
            f"for one threshold use losses[None, :]"
        )
    if L.shape[0] != t.size:
        raise ValueError(
            f"shape mismatch: {t.size} thresholds but losses has {L.shape[0]} rows; losses must have "
            f"shape (n_thresholds, n_examples) with row j the losses at thresholds[j] "
            f"(transpose it if you passed (n_examples, n_thresholds))"
        )
    if L.shape[1] == 0:
        raise ValueError(
            "empty calibration set (losses has 0 examples): collect calibration examples "
            "(CALM uses a few thousand) before calibrating"
        )
    bad_nf = ~np.isfinite(L)
    if bad_nf.any():
        idx = [tuple(int(i) for i in ij) for ij in np.argwhere(bad_nf)[:5]]
        raise ValueError(
            f"losses must be finite: {int(bad_nf.sum())} NaN/inf entries, first at (threshold_row, example) "
            f"{idx}; fix or drop those examples"
        )
    bad = (L < 0) | (L > 1)
    if bad.any():
        where = np.argwhere(bad)[:5]
        shown = ", ".join(f"({int(i)}, {int(j)})={L[i, j]:.6g}" for i, j in where)
        raise ValueError(
            f"losses must lie in [0, 1] (they are not clipped): {int(bad.sum())} entries out of range, "
            f"first at (threshold_row, example): {shown}; rescale the loss (e.g. 1 - ROUGE-L in [0, 1], "
            f"or a risk difference clipped/normalised by you) before calibrating"
        )
    return t, L


# --------------------------------------------------------------------------- #
# p-values
# --------------------------------------------------------------------------- #
def hoeffding_pvalue(risk_hat, n: int, delta: float):
    """Hoeffding p-value for ``H0: R > delta`` with losses in ``[0, 1]``.

    ``p = exp(-2 n (delta - risk_hat)_+^2)``, so ``p = 1`` when
    ``risk_hat >= delta`` (Angelopoulos et al., 2021, Sec. 3; Hoeffding, 1963).

    Args:
        risk_hat: Empirical risk (mean loss) on the calibration set, scalar or array.
        n: Number of calibration examples.
        delta: Risk level in (0, 1).

    Returns:
        The p-value(s), same shape as ``risk_hat`` (a float for scalar input).

    Raises:
        ValueError: If ``delta`` is not in (0, 1), ``n < 1`` or ``risk_hat`` not in [0, 1].
    """
    delta = _check_level("delta", delta)
    n = _check_n(n)
    r = _check_risk(risk_hat)
    gap = np.maximum(delta - r, 0.0)
    p = np.exp(-2.0 * n * gap**2)
    return float(p) if p.ndim == 0 else p


def bentkus_pvalue(risk_hat, n: int, delta: float):
    """Bentkus p-value for ``H0: R > delta`` with losses in ``[0, 1]``.

    ``p = min(1, e * P(Binom(n, delta) <= ceil(n * risk_hat)))``
    (Bentkus, 2004; Angelopoulos et al., 2021, Prop. 3 / Bates et al., 2021).
    ``n * risk_hat`` is rounded up after subtracting a 1e-9 tolerance so that
    float error in a mean of 0/1 losses does not add a spurious extra count.

    Args:
        risk_hat: Empirical risk (mean loss) on the calibration set, scalar or array.
        n: Number of calibration examples.
        delta: Risk level in (0, 1).

    Returns:
        The p-value(s), same shape as ``risk_hat`` (a float for scalar input).

    Raises:
        ValueError: If ``delta`` is not in (0, 1), ``n < 1`` or ``risk_hat`` not in [0, 1].
    """
    delta = _check_level("delta", delta)
    n = _check_n(n)
    r = _check_risk(risk_hat)
    k = np.ceil(n * r - _COUNT_TOL)
    p = np.minimum(1.0, math.e * binom.cdf(k, n, delta))
    return float(p) if np.ndim(p) == 0 else np.asarray(p, dtype=float)


def hoeffding_bentkus_pvalue(risk_hat, n: int, delta: float):
    """Hoeffding-Bentkus ("HB") p-value of LTT: the minimum of the two.

    Both are valid p-values for losses bounded in ``[0, 1]``; so is their
    minimum because each bound holds simultaneously (Angelopoulos et al., 2021,
    Sec. 3.1; note the paper's Hoeffding term uses the tighter KL form
    ``exp(-n h(risk_hat ^ delta, delta))``, we use the simpler
    ``exp(-2 n (delta - risk_hat)_+^2)``, which is valid but slightly larger).

    Args:
        risk_hat: Empirical risk (mean loss), scalar or array.
        n: Number of calibration examples.
        delta: Risk level in (0, 1).

    Returns:
        The p-value(s), same shape as ``risk_hat``.
    """
    h = hoeffding_pvalue(risk_hat, n, delta)
    b = bentkus_pvalue(risk_hat, n, delta)
    p = np.minimum(h, b)
    return float(p) if np.ndim(p) == 0 else p


PVALUES: dict[str, Callable] = {
    "hoeffding": hoeffding_pvalue,
    "bentkus": bentkus_pvalue,
    "hb": hoeffding_bentkus_pvalue,
}


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
@dataclass
class LTTResult:
    """Result of a threshold calibration.

    Attributes:
        threshold: The chosen threshold, or ``None`` if none qualifies (then
            the caller should not exit early, i.e. run the full model).
        valid: Whether a threshold was found.
        pvalues: p-value per threshold, in the caller's threshold order (all
            NaN for :func:`naive_calibrate`).
        risks: Empirical calibration risk per threshold (caller's order).
        accepted: Per threshold (caller's order), whether it was accepted: the
            rejected-null prefix of the fixed sequence for LTT, ``risk <= delta``
            for the naive rule.
        delta: Risk level.
        epsilon: Error level (``None`` for the naive rule).
        message: Human-readable summary.
    """

    threshold: float | None
    valid: bool
    pvalues: np.ndarray
    risks: np.ndarray
    accepted: np.ndarray
    delta: float
    epsilon: float | None
    message: str
    index: int | None = field(default=None, repr=False)  # row of `losses` of the chosen threshold


def ltt_calibrate(thresholds, losses, delta: float, epsilon: float, pvalue: str = "hb") -> LTTResult:
    """Calibrate an early-exit threshold with Learn-then-Test (fixed-sequence testing).

    Thresholds are sorted from highest (safest, closest to the full model)
    downward; ``H_j: R(lambda_j) > delta`` is rejected while its p-value is
    ``< epsilon`` and testing stops at the first non-rejection. The lowest
    rejected threshold is returned; with probability ``>= 1 - epsilon`` over the
    calibration draw its true risk is ``<= delta`` (Angelopoulos et al., 2021,
    Prop. 1 / Sec. 4; Schuster et al., 2022, Sec. 4). Fixed-sequence testing
    needs no multiplicity correction but relies on the ordering, which should
    make the risk roughly non-increasing in the threshold.

    Args:
        thresholds: 1-D array of candidate thresholds, any order.
        losses: Array of shape ``(n_thresholds, n_examples)`` with values in
            ``[0, 1]``: loss of each calibration example at each threshold.
        delta: Risk level in (0, 1).
        epsilon: Error level in (0, 1) (CALM: 0.05).
        pvalue: ``"hb"`` (Hoeffding-Bentkus, default), ``"hoeffding"`` or ``"bentkus"``.

    Returns:
        An :class:`LTTResult`; ``threshold is None`` and ``valid is False`` when
        even the highest threshold cannot be certified.

    Raises:
        ValueError: On invalid ``delta``/``epsilon``, shapes, empty calibration
            set, losses outside ``[0, 1]`` or an unknown ``pvalue`` name.
    """
    delta = _check_level("delta", delta)
    epsilon = _check_level("epsilon", epsilon)
    if pvalue not in PVALUES:
        raise ValueError(f"unknown pvalue {pvalue!r}: use one of {sorted(PVALUES)}")
    t, L = _check_inputs(thresholds, losses)
    n = L.shape[1]
    risks = L.mean(axis=1)
    # Clamp tiny float excursions of the mean (all entries are in [0, 1]).
    risks = np.clip(risks, 0.0, 1.0)
    pvals = np.asarray(PVALUES[pvalue](risks, n, delta), dtype=float).reshape(t.shape)

    order = np.argsort(-t, kind="stable")  # highest threshold first
    rejected = pvals[order] < epsilon
    n_acc = int(np.argmin(rejected)) if not rejected.all() else t.size
    accepted = np.zeros(t.size, dtype=bool)
    accepted[order[:n_acc]] = True

    if n_acc == 0:
        return LTTResult(
            threshold=None, valid=False, pvalues=pvals, risks=risks, accepted=accepted,
            delta=delta, epsilon=epsilon, index=None,
            message=(
                f"no threshold satisfies delta={delta:g} at epsilon={epsilon:g} with n={n} examples "
                f"(highest threshold {t[order[0]]:g}: risk {risks[order[0]]:.4g}, "
                f"p-value {pvals[order[0]]:.4g}); use the full model, or raise delta/epsilon "
                f"or add calibration examples"
            ),
        )
    j = int(order[n_acc - 1])
    return LTTResult(
        threshold=float(t[j]), valid=True, pvalues=pvals, risks=risks, accepted=accepted,
        delta=delta, epsilon=epsilon, index=j,
        message=(
            f"LTT ({pvalue}) accepted {n_acc}/{t.size} thresholds: lambda={t[j]:g} "
            f"(calibration risk {risks[j]:.4g}, p-value {pvals[j]:.4g}) for delta={delta:g}, "
            f"epsilon={epsilon:g}, n={n}"
        ),
    )


def naive_calibrate(thresholds, losses, delta: float) -> LTTResult:
    """Naive calibration: the lowest threshold whose empirical risk is ``<= delta``.

    This is the baseline LTT improves on (Angelopoulos et al., 2021, Sec. 1;
    Schuster et al., 2022, Sec. 6): it gives no finite-sample guarantee and
    typically violates the constraint in a large fraction of calibration draws.

    Args:
        thresholds: 1-D array of candidate thresholds, any order.
        losses: Array of shape ``(n_thresholds, n_examples)`` with values in ``[0, 1]``.
        delta: Risk level in (0, 1).

    Returns:
        An :class:`LTTResult` with ``pvalues`` all NaN and ``epsilon=None``.

    Raises:
        ValueError: As :func:`ltt_calibrate`.
    """
    delta = _check_level("delta", delta)
    t, L = _check_inputs(thresholds, losses)
    n = L.shape[1]
    risks = np.clip(L.mean(axis=1), 0.0, 1.0)
    accepted = risks <= delta
    pvals = np.full(t.shape, np.nan)
    if not accepted.any():
        return LTTResult(
            threshold=None, valid=False, pvalues=pvals, risks=risks, accepted=accepted,
            delta=delta, epsilon=None, index=None,
            message=f"no threshold has empirical risk <= delta={delta:g} with n={n} examples; use the full model",
        )
    cand = np.flatnonzero(accepted)
    j = int(cand[np.argmin(t[cand])])
    return LTTResult(
        threshold=float(t[j]), valid=True, pvalues=pvals, risks=risks, accepted=accepted,
        delta=delta, epsilon=None, index=j,
        message=f"naive: lambda={t[j]:g} (calibration risk {risks[j]:.4g} <= delta={delta:g}, n={n}; no guarantee)",
    )


# --------------------------------------------------------------------------- #
# CALM's split validation
# --------------------------------------------------------------------------- #
_RESERVED = ("split", "threshold", "found", "calib_risk", "test_risk", "valid")


def split_validation(
    thresholds,
    losses,
    delta: float,
    epsilon: float,
    n_splits: int = 50,
    calib_frac: float = 0.8,
    seed: int = 0,
    method: str = "ltt",
    extra: Mapping[str, np.ndarray] | None = None,
    pvalue: str = "hb",
) -> pd.DataFrame:
    """CALM's validation protocol: repeated random calibration/test splits.

    For each of ``n_splits`` random splits (``calib_frac`` calibration, the
    rest test; Schuster et al., 2022, Sec. 6 use 50 splits of 80/20), calibrate
    on the calibration part and evaluate the chosen threshold on the test part.

    When no threshold is found on a split, the run falls back to "no early
    exit": ``threshold`` is NaN, ``found`` is False, and ``test_risk`` and the
    ``extra`` columns are those of the *highest* threshold in the grid (the
    closest the grid has to the full model). A test risk of 0 is *not* assumed,
    so the reported numbers stay honest when the highest threshold still
    differs from the full model.

    Args:
        thresholds: 1-D array of candidate thresholds.
        losses: ``(n_thresholds, n_examples)`` losses in ``[0, 1]``.
        delta: Risk level in (0, 1).
        epsilon: Error level in (0, 1) (ignored by ``method="naive"`` except
            for validation).
        n_splits: Number of random splits.
        calib_frac: Fraction of examples used for calibration, in (0, 1).
        seed: Seed of the split generator (output is deterministic given it).
        method: ``"ltt"`` or ``"naive"``.
        extra: Optional per-threshold, per-example quantities (e.g. average exit
            layer, time per token), each of shape ``(n_thresholds, n_examples)``;
            the test-part mean at the chosen threshold becomes a column.
        pvalue: p-value name for LTT (see :func:`ltt_calibrate`).

    Returns:
        A DataFrame with one row per split and columns ``split, threshold,
        found, calib_risk, test_risk, valid`` (``test_risk <= delta``) plus one
        column per ``extra`` key.

    Raises:
        ValueError: On invalid arguments (see :func:`ltt_calibrate`), an unknown
            ``method``, a ``calib_frac`` leaving an empty part, or an ``extra``
            array of the wrong shape / with a reserved name.
    """
    delta = _check_level("delta", delta)
    epsilon = _check_level("epsilon", epsilon)
    if method not in ("ltt", "naive"):
        raise ValueError(f"unknown method {method!r}: use 'ltt' or 'naive'")
    if pvalue not in PVALUES:
        raise ValueError(f"unknown pvalue {pvalue!r}: use one of {sorted(PVALUES)}")
    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 1:
        raise ValueError(f"n_splits must be a positive integer, got {n_splits!r}")
    t, L = _check_inputs(thresholds, losses)
    n = L.shape[1]
    if not (0.0 < calib_frac < 1.0):
        raise ValueError(f"calib_frac must be in (0, 1), got {calib_frac!r}")
    n_cal = int(round(calib_frac * n))
    if n_cal < 1 or n_cal >= n:
        raise ValueError(
            f"calib_frac={calib_frac:g} with n={n} examples leaves an empty calibration or test part; "
            f"use more examples or another calib_frac"
        )
    extras: dict[str, np.ndarray] = {}
    for name, arr in (extra or {}).items():
        if name in _RESERVED:
            raise ValueError(f"extra key {name!r} clashes with a result column {_RESERVED}; rename it")
        a = np.asarray(arr, dtype=float)
        if a.shape != L.shape:
            raise ValueError(
                f"extra[{name!r}] has shape {a.shape}, expected {L.shape} (n_thresholds, n_examples)"
            )
        extras[name] = a

    top = int(np.argsort(-t, kind="stable")[0])  # fallback: highest threshold
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(int(n_splits)):
        perm = rng.permutation(n)
        cal, test = perm[:n_cal], perm[n_cal:]
        if method == "ltt":
            res = ltt_calibrate(t, L[:, cal], delta, epsilon, pvalue=pvalue)
        else:
            res = naive_calibrate(t, L[:, cal], delta)
        j = res.index if res.valid else top
        test_risk = float(L[j, test].mean())
        row = {
            "split": s,
            "threshold": res.threshold if res.valid else np.nan,
            "found": bool(res.valid),
            "calib_risk": float(res.risks[j]),
            "test_risk": test_risk,
            "valid": bool(test_risk <= delta),
        }
        for name, a in extras.items():
            row[name] = float(a[j, test].mean())
        rows.append(row)
    return pd.DataFrame(rows, columns=list(_RESERVED) + list(extras))


def summarize_splits(df: pd.DataFrame, epsilon: float) -> dict:
    """Summarise :func:`split_validation` output.

    Note ``valid_fraction`` uses the *empirical* test risk of a finite test
    part, so it is a noisy check of the LTT guarantee (which concerns the true
    risk), as in CALM's Fig. 3 / Table 2.

    Args:
        df: Output of :func:`split_validation`.
        epsilon: Error level the guarantee was targeted at.

    Returns:
        A dict with ``n_splits``, ``found_fraction``, ``mean_threshold`` (over
        splits where a threshold was found; NaN if none), ``mean_test_risk``,
        ``valid_fraction``, ``meets_guarantee`` (``valid_fraction >= 1 - epsilon``)
        and ``mean_<col>`` for every extra column.
    """
    epsilon = _check_level("epsilon", epsilon)
    missing = [c for c in ("threshold", "test_risk", "valid") if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks columns {missing}: pass the output of split_validation")
    if len(df) == 0:
        raise ValueError("df is empty: run split_validation with n_splits >= 1")
    thr = df["threshold"].to_numpy(dtype=float)
    valid_fraction = float(df["valid"].mean())
    out = {
        "n_splits": int(len(df)),
        "found_fraction": float(df["found"].mean()) if "found" in df else float(np.isfinite(thr).mean()),
        "mean_threshold": float(np.nanmean(thr)) if np.isfinite(thr).any() else float("nan"),
        "mean_test_risk": float(df["test_risk"].mean()),
        "valid_fraction": valid_fraction,
        "meets_guarantee": bool(valid_fraction >= 1.0 - epsilon),
    }
    for c in df.columns:
        if c not in _RESERVED:
            out[f"mean_{c}"] = float(df[c].mean())
    return out
