"""Tests of calm_utils.calibration (Learn-then-Test, Angelopoulos et al. 2021)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from calm_utils.calibration import (
    LTTResult,
    bentkus_pvalue,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    ltt_calibrate,
    naive_calibrate,
    split_validation,
    summarize_splits,
)

GRID = np.linspace(0.0, 1.0, 21)


def true_risk(lam):
    return 0.3 * (1.0 - np.asarray(lam, dtype=float))


def draw_losses(rng, n, grid=GRID):
    """Nested Bernoulli losses: loss(lambda) = 1[U < 0.3 (1 - lambda)], U ~ U(0, 1)."""
    u = rng.random(n)
    return (u[None, :] < true_risk(grid)[:, None]).astype(float)


def bentkus_direct(risk_hat, n, delta):
    k = math.ceil(n * risk_hat - 1e-9)
    cdf = sum(math.comb(n, i) * delta**i * (1 - delta) ** (n - i) for i in range(0, k + 1))
    return min(1.0, math.e * cdf)


# ----------------------------------------------------------------- p-values
@pytest.mark.parametrize("r,n,d", [(0.0, 100, 0.1), (0.05, 200, 0.1), (0.08, 50, 0.2), (0.3, 1000, 0.35), (0.1, 30, 0.1)])
def test_hoeffding_formula(r, n, d):
    assert hoeffding_pvalue(r, n, d) == pytest.approx(math.exp(-2 * n * max(d - r, 0.0) ** 2))


def test_hoeffding_is_one_at_or_above_delta():
    assert hoeffding_pvalue(0.1, 100, 0.1) == 1.0
    assert hoeffding_pvalue(0.5, 100, 0.1) == 1.0


@pytest.mark.parametrize("r,n,d", [(0.0, 100, 0.1), (0.05, 200, 0.1), (0.08, 50, 0.2), (0.3, 300, 0.35), (0.1, 30, 0.1), (0.9, 40, 0.1)])
def test_bentkus_matches_direct_and_scipy(r, n, d):
    p = bentkus_pvalue(r, n, d)
    assert p == pytest.approx(bentkus_direct(r, n, d), rel=1e-9)
    assert p == pytest.approx(min(1.0, math.e * binom.cdf(math.ceil(n * r - 1e-9), n, d)), rel=1e-12)


def test_bentkus_float_count_tolerance():
    # 3/30 is 0.1 but 30 * 0.1 is 3.0000000000000004: the count must be 3, not 4.
    assert bentkus_pvalue(3 / 30, 30, 0.2) == pytest.approx(min(1, math.e * binom.cdf(3, 30, 0.2)))


def test_hb_is_min():
    rs = np.linspace(0, 1, 41)
    hb = hoeffding_bentkus_pvalue(rs, 150, 0.2)
    np.testing.assert_allclose(hb, np.minimum(hoeffding_pvalue(rs, 150, 0.2), bentkus_pvalue(rs, 150, 0.2)))
    assert isinstance(hoeffding_bentkus_pvalue(0.1, 150, 0.2), float)


@pytest.mark.parametrize("fn", [hoeffding_pvalue, bentkus_pvalue, hoeffding_bentkus_pvalue])
def test_pvalues_monotone(fn):
    rs = np.linspace(0, 1, 201)
    p = fn(rs, 200, 0.15)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= -1e-12)  # larger risk_hat -> larger-or-equal p
    for r in (0.0, 0.05, 0.1):  # risk_hat < delta: more data -> smaller p
        ps = [fn(r, n, 0.15) for n in (50, 100, 200, 400, 800)]
        assert all(b < a for a, b in zip(ps, ps[1:])), ps


# ----------------------------------------------------------------- calibration
def test_ltt_basic_and_caller_order():
    rng = np.random.default_rng(1)
    L = draw_losses(rng, 2000)
    res = ltt_calibrate(GRID, L, delta=0.1, epsilon=0.05)
    assert isinstance(res, LTTResult) and res.valid
    assert true_risk(res.threshold) <= 0.1
    # accepted thresholds are exactly those >= the returned one (fixed sequence from the top)
    np.testing.assert_array_equal(res.accepted, GRID >= res.threshold)
    assert np.all(res.pvalues[res.accepted] < 0.05)

    perm = rng.permutation(GRID.size)
    res2 = ltt_calibrate(GRID[perm], L[perm], delta=0.1, epsilon=0.05)
    assert res2.threshold == res.threshold
    np.testing.assert_allclose(res2.pvalues, res.pvalues[perm])
    np.testing.assert_allclose(res2.risks, res.risks[perm])
    np.testing.assert_array_equal(res2.accepted, res.accepted[perm])


def test_fixed_sequence_stops_at_first_failure():
    # risk 0 at 1.0 and 0.5, but 1 at 0.75: LTT must stop at 1.0, naive picks 0.5.
    thr = np.array([0.5, 0.75, 1.0])
    L = np.zeros((3, 500))
    L[1] = 1.0
    res = ltt_calibrate(thr, L, 0.1, 0.05)
    assert res.threshold == 1.0
    np.testing.assert_array_equal(res.accepted, [False, False, True])
    assert naive_calibrate(thr, L, 0.1).threshold == 0.5


def test_ltt_none_found_message():
    L = np.full((3, 40), 0.5)
    res = ltt_calibrate([0.2, 0.5, 0.9], L, delta=0.1, epsilon=0.05)
    assert res.threshold is None and not res.valid and not res.accepted.any()
    assert "no threshold satisfies delta=0.1 at epsilon=0.05 with n=40 examples" in res.message
    nres = naive_calibrate([0.2, 0.5, 0.9], L, 0.1)
    assert nres.threshold is None and not nres.valid


@pytest.mark.parametrize("epsilon", [0.1, 0.05])
def test_ltt_guarantee_in_simulation(epsilon):
    delta, n, draws = 0.1, 200, 400
    rng = np.random.default_rng(12345)
    ltt_viol = naive_viol = 0
    for _ in range(draws):
        L = draw_losses(rng, n)
        r = ltt_calibrate(GRID, L, delta, epsilon)
        lam = r.threshold if r.valid else 1.0  # none found -> full model (risk 0 here)
        ltt_viol += true_risk(lam) > delta
        nr = naive_calibrate(GRID, L, delta)
        naive_viol += true_risk(nr.threshold if nr.valid else 1.0) > delta
    assert ltt_viol / draws <= epsilon
    assert naive_viol / draws > ltt_viol / draws
    assert naive_viol / draws > epsilon  # naive violates noticeably


def test_larger_delta_never_raises_threshold():
    rng = np.random.default_rng(7)
    for _ in range(20):
        L = draw_losses(rng, 150)
        prev_ltt = prev_naive = np.inf
        for d in np.linspace(0.02, 0.4, 20):
            r = ltt_calibrate(GRID, L, d, 0.05)
            thr = r.threshold if r.valid else np.inf
            assert thr <= prev_ltt
            prev_ltt = thr
            nr = naive_calibrate(GRID, L, d)
            thr = nr.threshold if nr.valid else np.inf
            assert thr <= prev_naive
            prev_naive = thr


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_delta_epsilon(bad):
    L = np.zeros((2, 10))
    with pytest.raises(ValueError, match="delta"):
        ltt_calibrate([0.5, 1.0], L, bad, 0.05)
    with pytest.raises(ValueError, match="epsilon"):
        ltt_calibrate([0.5, 1.0], L, 0.1, bad)
    with pytest.raises(ValueError, match="delta"):
        naive_calibrate([0.5, 1.0], L, bad)
    with pytest.raises(ValueError, match="delta"):
        hoeffding_pvalue(0.1, 10, bad)


def test_empty_losses():
    with pytest.raises(ValueError, match="empty calibration set"):
        ltt_calibrate([0.5, 1.0], np.zeros((2, 0)), 0.1, 0.05)
    with pytest.raises(ValueError, match="empty calibration set"):
        naive_calibrate([0.5, 1.0], np.zeros((2, 0)), 0.1)
    with pytest.raises(ValueError, match="n"):
        bentkus_pvalue(0.1, 0, 0.1)


def test_losses_out_of_range_not_clipped():
    L = np.zeros((2, 10))
    L[1, 3] = 1.2
    with pytest.raises(ValueError, match=r"out of range.*\(1, 3\)=1\.2"):
        ltt_calibrate([0.5, 1.0], L, 0.1, 0.05)
    L[1, 3] = -0.01
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        naive_calibrate([0.5, 1.0], L, 0.1)
    L[1, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ltt_calibrate([0.5, 1.0], L, 0.1, 0.05)


def test_shape_mismatch_and_unknown_pvalue():
    with pytest.raises(ValueError, match="shape mismatch"):
        ltt_calibrate([0.2, 0.5, 1.0], np.zeros((2, 10)), 0.1, 0.05)
    with pytest.raises(ValueError, match="n_thresholds, n_examples"):
        ltt_calibrate([0.5, 1.0], np.zeros(10), 0.1, 0.05)
    with pytest.raises(ValueError, match="unknown pvalue 'wsr'"):
        ltt_calibrate([0.5, 1.0], np.zeros((2, 10)), 0.1, 0.05, pvalue="wsr")
    for name in ("hb", "hoeffding", "bentkus"):
        assert ltt_calibrate([0.5, 1.0], np.zeros((2, 400)), 0.1, 0.05, pvalue=name).valid


# ----------------------------------------------------------------- split validation
def _split_data(seed=3, n=300):
    rng = np.random.default_rng(seed)
    L = draw_losses(rng, n)
    layers = np.broadcast_to((1.0 + 7.0 * GRID)[:, None], L.shape) + rng.random(L.shape)
    return L, {"avg_exit_layer": layers}


def test_split_validation_shape_and_determinism():
    L, extra = _split_data()
    df = split_validation(GRID, L, 0.1, 0.05, seed=11, extra=extra)
    assert isinstance(df, pd.DataFrame) and len(df) == 50
    assert list(df.columns) == ["split", "threshold", "found", "calib_risk", "test_risk", "valid", "avg_exit_layer"]
    assert df["split"].tolist() == list(range(50))
    assert (df["valid"] == (df["test_risk"] <= 0.1)).all()
    pd.testing.assert_frame_equal(df, split_validation(GRID, L, 0.1, 0.05, seed=11, extra=extra))
    assert not df.equals(split_validation(GRID, L, 0.1, 0.05, seed=12, extra=extra))

    naive = split_validation(GRID, L, 0.1, 0.05, seed=11, method="naive")
    assert len(naive) == 50
    # naive picks lower (or equal) thresholds than LTT on every split
    assert (naive["threshold"].fillna(np.inf) <= df["threshold"].fillna(np.inf)).all()

    s = summarize_splits(df, 0.05)
    assert s["n_splits"] == 50
    assert s["mean_threshold"] == pytest.approx(df["threshold"].mean())
    assert s["mean_test_risk"] == pytest.approx(df["test_risk"].mean())
    assert s["meets_guarantee"] == (s["valid_fraction"] >= 0.95)
    assert "mean_avg_exit_layer" in s


def test_split_validation_not_found_falls_back_to_highest_threshold():
    rng = np.random.default_rng(0)
    L = (rng.random((3, 60)) < 0.5).astype(float)  # risk 0.5 everywhere
    extra = {"t": np.tile(np.array([[1.0], [2.0], [3.0]]), (1, 60))}
    df = split_validation([0.9, 0.1, 0.5], L, 0.1, 0.05, n_splits=5, extra=extra)
    assert df["threshold"].isna().all() and (~df["found"]).all()
    assert (df["t"] == 1.0).all()  # row of the highest threshold (0.9)
    assert (df["test_risk"] > 0).all()  # test risk 0 is not assumed
    s = summarize_splits(df, 0.05)
    assert math.isnan(s["mean_threshold"]) and s["found_fraction"] == 0.0


def test_split_validation_errors():
    L, extra = _split_data(n=50)
    with pytest.raises(ValueError, match="method"):
        split_validation(GRID, L, 0.1, 0.05, method="bonferroni")
    with pytest.raises(ValueError, match="shape"):
        split_validation(GRID, L, 0.1, 0.05, extra={"x": np.zeros(3)})
    with pytest.raises(ValueError, match="calib_frac"):
        split_validation(GRID, L, 0.1, 0.05, calib_frac=1.0)
    with pytest.raises(ValueError, match="clashes"):
        split_validation(GRID, L, 0.1, 0.05, extra={"test_risk": L})
