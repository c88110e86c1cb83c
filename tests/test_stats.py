"""Statistics checked against constructed data with known answers and textbook examples."""
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from pipeline import stats as S

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


def test_bland_altman_known_bias_and_limits():
    ref = np.linspace(10, 30, 10)
    d = 2.0 + np.array([-1.0, 1.0] * 5)          # mean 2, SD sqrt(10/9)
    ba = S.bland_altman(ref + d, ref)
    sd = math.sqrt(10 / 9)
    assert ba.n == 10
    assert ba.bias == pytest.approx(2.0)
    assert ba.sd == pytest.approx(sd)
    assert ba.loa_low == pytest.approx(2.0 - 1.96 * sd)
    assert ba.loa_high == pytest.approx(2.0 + 1.96 * sd)
    t = sps.t.ppf(0.975, 9)
    assert ba.bias_ci == pytest.approx((2 - t * sd / math.sqrt(10), 2 + t * sd / math.sqrt(10)))
    se_loa = sd * math.sqrt(1 / 10 + 1.96 ** 2 / 18)   # Bland & Altman 1999
    assert ba.loa_high_ci == pytest.approx((ba.loa_high - t * se_loa, ba.loa_high + t * se_loa))


def test_bland_altman_drops_nonfinite_and_needs_two_pairs():
    ba = S.bland_altman([1, 2, np.nan, 4], [0, 1, 5, 3])
    assert ba.n == 3 and ba.bias == pytest.approx(1.0) and ba.sd == pytest.approx(0.0)
    with pytest.raises(ValueError):
        S.bland_altman([1.0], [2.0])


@pytest.mark.parametrize("form, expected, ci", [
    ("ICC(1,1)", 0.17, (-0.13, 0.72)),
    ("ICC(2,1)", 0.29, (0.02, 0.76)),
    ("ICC(3,1)", 0.71, (0.34, 0.95)),
])
def test_icc_shrout_fleiss_textbook(form, expected, ci):
    res = S.icc(SHROUT_FLEISS, form)
    assert round(res.icc, 2) == expected
    assert np.round(res.ci, 2) == pytest.approx(ci, abs=0.011)
    assert form in res.description or "Shrout" in res.description


def test_icc_mcgraw_wong_aliases_and_perfect_agreement():
    assert S.icc(SHROUT_FLEISS, "ICC(A,1)").icc == pytest.approx(S.icc(SHROUT_FLEISS, "ICC(2,1)").icc)
    assert S.icc(SHROUT_FLEISS, "ICC(C,1)").icc == pytest.approx(S.icc(SHROUT_FLEISS, "ICC(3,1)").icc)
    x = np.arange(10, dtype=float)
    assert S.icc(np.column_stack([x, x]), "ICC(2,1)").icc == pytest.approx(1.0)
    # a constant offset: consistency stays 1, absolute agreement drops
    shifted = np.column_stack([x, x + 3])
    assert S.icc(shifted, "ICC(3,1)").icc == pytest.approx(1.0)
    assert S.icc(shifted, "ICC(2,1)").icc < 0.9
    with pytest.raises(ValueError):
        S.icc(SHROUT_FLEISS, "ICC(9,9)")


def test_pearson_fisher_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.5, size=50)
    res = S.pearson(x, y)
    assert res.r == pytest.approx(np.corrcoef(x, y)[0, 1])
    z, se = math.atanh(res.r), 1 / math.sqrt(47)
    assert res.ci == pytest.approx((math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)), rel=1e-5)
    assert res.ci[0] < res.r < res.ci[1]


def test_mae_and_bootstrap():
    assert S.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    small = S.bootstrap_ci(np.mean, np.arange(5.0))
    assert small.skipped and math.isnan(small.low)
    x = np.arange(40.0)
    a = S.bootstrap_ci(np.mean, x, seed=7)
    b = S.bootstrap_ci(np.mean, x, seed=7)
    assert (a.low, a.high) == (b.low, b.high)          # seeded: reproducible
    assert a.low < x.mean() < a.high and a.skipped is None


def test_wilson_and_confusion():
    # Wilson interval for 8/10 (textbook value 0.490 to 0.943)
    lo, hi = S.wilson_ci(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    test = [True, True, True, False, False, False, True, False]
    ref = [True, True, False, False, False, True, True, False]
    cm = S.confusion_metrics(test, ref)
    assert (cm.tp, cm.fp, cm.tn, cm.fn) == (3, 1, 3, 1)
    assert cm.sensitivity == pytest.approx(0.75) and cm.specificity == pytest.approx(0.75)
    assert cm.accuracy == pytest.approx(0.75)
    assert list(S.flag_narrow([14.9, 15.0, 15.1], 15.0)) == [True, True, False]


def test_roc_auc_known_values():
    # narrow (low) = positive: perfectly separated
    perfect = S.roc_auc([5, 6, 7, 20, 21, 22], [True, True, True, False, False, False])
    assert perfect.auc == pytest.approx(1.0)
    # reversed direction gives 0
    assert S.roc_auc([25, 26, 7, 2], [True, True, False, False]).auc == pytest.approx(0.0)
    # identical distributions
    rng = np.random.default_rng(3)
    v = rng.normal(size=4000)
    lab = rng.random(4000) < 0.5
    assert S.roc_auc(v, lab).auc == pytest.approx(0.5, abs=0.03)
    # all tied: exactly 0.5; one class missing: NaN
    assert S.roc_auc([1, 1, 1, 1], [True, False, True, False]).auc == pytest.approx(0.5)
    assert math.isnan(S.roc_auc([1, 2], [True, True]).auc)
    # hand count: pos {1, 3}, neg {2, 3}: pairs (1<2) (1<3) (3>2 -> 0) (3=3 -> 1/2) = 2.5/4
    assert S.roc_auc([1, 3, 2, 3], [True, True, False, False]).auc == pytest.approx(0.625)


def test_kappa_textbook_2x2():
    # Wikipedia 'Cohen's kappa' example: 20/5/10/15 of 50 -> p_o = 0.7, p_e = 0.5, kappa = 0.4.
    t = [[20, 5], [10, 15]]
    for w in ("none", "linear", "quadratic"):   # with 2 categories all weightings agree
        assert S.kappa_from_table(t, w).kappa == pytest.approx(0.4)


def test_weighted_kappa_hand_computed_3x3():
    # Disagreement-weight form (Cohen 1968): kappa_w = 1 - sum(v*p_obs) / sum(v*p_exp), exact fractions
    table = [[10, 2, 0], [3, 8, 1], [0, 2, 4]]
    n = sum(map(sum, table))
    rows = [Fraction(sum(r), n) for r in table]
    cols = [Fraction(sum(table[i][j] for i in range(3)), n) for j in range(3)]
    for weights, v in (("linear", lambda i, j: abs(i - j)), ("quadratic", lambda i, j: (i - j) ** 2)):
        obs = sum(v(i, j) * Fraction(table[i][j], n) for i in range(3) for j in range(3))
        exp = sum(v(i, j) * rows[i] * cols[j] for i in range(3) for j in range(3))
        expected = float(1 - obs / exp)
        assert S.kappa_from_table(table, weights).kappa == pytest.approx(expected)
    # from raw ratings with named ordered categories
    cats = ["none", "mild", "marked"]
    a, b = [], []
    for i in range(3):
        for j in range(3):
            a += [cats[i]] * table[i][j]
            b += [cats[j]] * table[i][j]
    k = S.weighted_kappa(a, b, categories=cats, weights="linear")
    assert k.kappa == pytest.approx(S.kappa_from_table(table, "linear").kappa)
    assert k.ci[0] < k.kappa < k.ci[1]


def test_quadratic_kappa_equals_concordance_correlation():
    # Fleiss & Cohen 1973: quadratic-weighted kappa == Lin's CCC with 1/n moments (integer scores)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 300)
    b = np.clip(a + rng.integers(-1, 2, 300), 0, 4)
    k = S.weighted_kappa(a, b, categories=range(5), weights="quadratic").kappa
    ccc = 2 * np.cov(a, b, ddof=0)[0, 1] / (a.var() + b.var() + (a.mean() - b.mean()) ** 2)
    assert k == pytest.approx(ccc)


def test_weighted_kappa_missing_and_unknown():
    k = S.weighted_kappa([0, 1, None, 2], [0, 1, 1, 2], categories=[0, 1, 2])
    assert k.n == 3 and k.kappa == pytest.approx(1.0)
    with pytest.raises(ValueError):
        S.weighted_kappa([0, 7], [0, 1], categories=[0, 1, 2])
