"""Agreement statistics for validating measurements against a reference (pure numpy / scipy).

Conventions used throughout:

* Differences are ``tool - reference`` (``a - b``): a positive bias means the tool measures more.
* Intervals are two-sided 95 % unless ``alpha`` says otherwise.
* A binary finding is "positive" when the space is *narrow*: value <= cut-off.
* Bootstrap intervals are seeded percentile intervals and are skipped (with a reason) when fewer
  than ``MIN_BOOTSTRAP_N`` pairs are available.

References: Bland & Altman, Lancet 1986 and Stat Methods Med Res 1999 (limits of agreement and their
confidence intervals); Shrout & Fleiss, Psychol Bull 1979 and McGraw & Wong, Psychol Methods 1996
(intraclass correlation); Wilson, JASA 1927 (score interval); Hanley & McNeil, Radiology 1982 (AUC);
Cohen, Psychol Bull 1968 (weighted kappa); Fleiss, Cohen & Everitt, Psychol Bull 1969 (its SE).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats as sps

MIN_BOOTSTRAP_N = 10
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 12345

#: Accepted ICC forms. ICC(A,1) (McGraw & Wong, two-way, absolute agreement, single measure) has
#: the same estimate and interval as Shrout & Fleiss ICC(2,1); ICC(C,1) is ICC(3,1).
ICC_FORMS = {
    "ICC(1,1)": "one-way random effects, absolute agreement, single measurement (Shrout & Fleiss ICC(1,1))",
    "ICC(2,1)": "two-way random effects, absolute agreement, single measurement (Shrout & Fleiss ICC(2,1); "
                "McGraw & Wong ICC(A,1))",
    "ICC(A,1)": "two-way model, absolute agreement, single measurement (McGraw & Wong ICC(A,1); "
                "same value as Shrout & Fleiss ICC(2,1))",
    "ICC(3,1)": "two-way mixed effects, consistency, single measurement (Shrout & Fleiss ICC(3,1); "
                "McGraw & Wong ICC(C,1))",
    "ICC(C,1)": "two-way mixed effects, consistency, single measurement (McGraw & Wong ICC(C,1); "
                "same value as Shrout & Fleiss ICC(3,1))",
}
DEFAULT_ICC_FORM = "ICC(2,1)"


def _z(alpha: float) -> float:
    return float(sps.norm.ppf(1 - alpha / 2))


def paired_finite(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return the pairs of ``a`` and ``b`` where both values are finite (as float arrays)."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired data must have the same length, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------
@dataclass
class BootstrapCI:
    """A percentile bootstrap interval, or the reason it was not computed."""

    low: float = float("nan")
    high: float = float("nan")
    n_boot: int = 0
    seed: int | None = None
    skipped: str | None = None


def bootstrap_ci(statistic: Callable[..., float], *samples: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP,
                 alpha: float = 0.05, seed: int = DEFAULT_SEED,
                 min_n: int = MIN_BOOTSTRAP_N) -> BootstrapCI:
    """Seeded percentile bootstrap CI of ``statistic(*samples)``, resampling rows jointly.

    All samples must have the same length (paired data are resampled as pairs). Returns a
    ``BootstrapCI`` with ``skipped`` set, and NaN bounds, when n < ``min_n`` or every resample
    gave a non-finite statistic.
    """
    arrays = [np.asarray(s) for s in samples]
    n = len(arrays[0])
    if any(len(s) != n for s in arrays):
        raise ValueError("bootstrap samples must have equal length")
    if n_boot <= 0:
        return BootstrapCI(skipped="bootstrap disabled (0 resamples)", seed=seed)
    if n < min_n:
        return BootstrapCI(skipped=f"n={n} < {min_n}: too few for a bootstrap interval", seed=seed)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            values[i] = statistic(*(s[idx] for s in arrays))
        except (ValueError, ZeroDivisionError, FloatingPointError):
            values[i] = np.nan
    values = values[np.isfinite(values)]
    if values.size < max(20, n_boot // 10):
        return BootstrapCI(skipped="statistic undefined in most resamples", seed=seed, n_boot=int(values.size))
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return BootstrapCI(float(lo), float(hi), int(values.size), seed)


# --------------------------------------------------------------------------------------------
# Continuous agreement
# --------------------------------------------------------------------------------------------
@dataclass
class BlandAltman:
    """Bland-Altman summary of ``a - b`` with exact (t-based) intervals for bias and limits."""

    n: int
    bias: float
    sd: float
    loa_low: float
    loa_high: float
    bias_ci: tuple[float, float]
    loa_low_ci: tuple[float, float]
    loa_high_ci: tuple[float, float]
    k: float = 1.96


def bland_altman(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, k: float = 1.96) -> BlandAltman:
    """Bias, SD of differences and limits of agreement ``bias +- k*SD`` of ``a - b``.

    CIs (Bland & Altman 1999): bias +- t * SD/sqrt(n); each limit +- t * SD * sqrt(1/n + k^2/(2(n-1))),
    with t from Student's t on n-1 degrees of freedom. Non-finite pairs are dropped. Needs n >= 2.
    """
    a, b = paired_finite(a, b)
    n = a.size
    if n < 2:
        raise ValueError(f"Bland-Altman needs at least 2 finite pairs, got {n}")
    d = a - b
    bias = float(d.mean())
    sd = float(d.std(ddof=1))
    t = float(sps.t.ppf(1 - alpha / 2, n - 1))
    se_bias = sd / math.sqrt(n)
    se_loa = sd * math.sqrt(1.0 / n + k * k / (2.0 * (n - 1)))
    lo, hi = bias - k * sd, bias + k * sd
    return BlandAltman(n, bias, sd, lo, hi, (bias - t * se_bias, bias + t * se_bias),
                       (lo - t * se_loa, lo + t * se_loa), (hi - t * se_loa, hi + t * se_loa), k)


def mae(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean absolute difference over finite pairs."""
    a, b = paired_finite(a, b)
    if a.size == 0:
        return float("nan")
    return float(np.mean(np.abs(a - b)))


@dataclass
class Correlation:
    """Pearson correlation with a Fisher-z interval."""

    n: int
    r: float
    ci: tuple[float, float]
    p_value: float


def pearson(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Correlation:
    """Pearson r, two-sided p-value, and CI via Fisher's z (tanh(atanh r +- z/sqrt(n-3))).

    The interval needs n >= 4; with fewer pairs or constant data the missing parts are NaN.
    """
    a, b = paired_finite(a, b)
    n = a.size
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(n, float("nan"), (float("nan"), float("nan")), float("nan"))
    res = sps.pearsonr(a, b)
    r = float(np.clip(res.statistic, -1.0, 1.0))
    if n < 4 or abs(r) == 1.0:
        ci = (r, r) if abs(r) == 1.0 else (float("nan"), float("nan"))
    else:
        z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
        ci = (math.tanh(z - _z(alpha) * se), math.tanh(z + _z(alpha) * se))
    return Correlation(n, r, ci, float(res.pvalue))


@dataclass
class ICCResult:
    """An intraclass correlation with its F-distribution interval and the ANOVA pieces."""

    form: str
    description: str
    icc: float
    ci: tuple[float, float]
    n_targets: int
    n_raters: int
    ms_rows: float
    ms_cols: float
    ms_error: float
    ms_within: float


def icc(ratings: np.ndarray, form: str = DEFAULT_ICC_FORM, alpha: float = 0.05) -> ICCResult:
    """Intraclass correlation of an (n targets x k raters) table without missing values.

    Forms (Shrout & Fleiss 1979; McGraw & Wong 1996), all single-measurement:
      ICC(1,1): (MSR - MSW) / (MSR + (k-1) MSW)
      ICC(2,1) = ICC(A,1): (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)
      ICC(3,1) = ICC(C,1): (MSR - MSE) / (MSR + (k-1) MSE)
    Intervals: exact F for ICC(1,1) and ICC(3,1); McGraw & Wong's Satterthwaite approximation for
    ICC(2,1). Rows with any non-finite rating are dropped.
    """
    if form not in ICC_FORMS:
        raise ValueError(f"unknown ICC form {form!r}; choose one of {sorted(ICC_FORMS)}")
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2:
        raise ValueError("ratings must be a 2D array (targets x raters)")
    x = x[np.all(np.isfinite(x), axis=1)]
    n, k = x.shape
    if n < 2 or k < 2:
        raise ValueError(f"ICC needs >= 2 targets and >= 2 raters, got {n} x {k}")
    grand = x.mean()
    ss_rows = k * np.sum((x.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((x.mean(axis=0) - grand) ** 2)
    ss_total = np.sum((x - grand) ** 2)
    ss_err = ss_total - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    msw = (ss_cols + ss_err) / (n * (k - 1))
    q = 1 - alpha / 2
    nan = float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        if form == "ICC(1,1)":
            value = (msr - msw) / (msr + (k - 1) * msw)
            f_obs = msr / msw
            fl = f_obs / sps.f.ppf(q, n - 1, n * (k - 1))
            fu = f_obs * sps.f.ppf(q, n * (k - 1), n - 1)
            ci = ((fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1))
        elif form in ("ICC(3,1)", "ICC(C,1)"):
            value = (msr - mse) / (msr + (k - 1) * mse)
            f_obs = msr / mse
            fl = f_obs / sps.f.ppf(q, n - 1, (n - 1) * (k - 1))
            fu = f_obs * sps.f.ppf(q, (n - 1) * (k - 1), n - 1)
            ci = ((fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1))
        else:  # ICC(2,1) / ICC(A,1)
            value = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
            ci = (nan, nan)
            if np.isfinite(value) and value < 1:
                a_ = k * value / (n * (1 - value))
                b_ = 1 + k * value * (n - 1) / (n * (1 - value))
                den = (a_ * msc) ** 2 / (k - 1) + (b_ * mse) ** 2 / ((n - 1) * (k - 1))
                if den > 0:
                    v = (a_ * msc + b_ * mse) ** 2 / den
                    f1 = sps.f.ppf(q, n - 1, v)
                    f2 = sps.f.ppf(q, v, n - 1)
                    c = k * msc + (k * n - k - n) * mse
                    ci = (n * (msr - f1 * mse) / (f1 * c + n * msr), n * (f2 * msr - mse) / (c + n * f2 * msr))
    ci = tuple(float(c) if np.isfinite(c) else nan for c in ci)
    return ICCResult(form, ICC_FORMS[form], float(value) if np.isfinite(value) else nan, ci, n, k,
                     float(msr), float(msc), float(mse), float(msw))


# --------------------------------------------------------------------------------------------
# Binary findings
# --------------------------------------------------------------------------------------------
def wilson_ci(successes: int, total: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaN when total is 0)."""
    if total <= 0:
        return (float("nan"), float("nan"))
    z = _z(alpha)
    p = successes / total
    den = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / den
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class BinaryAgreement:
    """Confusion matrix of a test against a reference with proportions and Wilson intervals."""

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    accuracy: float
    accuracy_ci: tuple[float, float]
    ppv: float
    npv: float


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def confusion_metrics(test: Sequence[bool], reference: Sequence[bool], alpha: float = 0.05) -> BinaryAgreement:
    """Sensitivity, specificity, accuracy (Wilson CIs), PPV and NPV of boolean ``test`` vs ``reference``."""
    t = np.asarray(test, dtype=bool).ravel()
    r = np.asarray(reference, dtype=bool).ravel()
    if t.shape != r.shape:
        raise ValueError("test and reference must have the same length")
    tp = int(np.sum(t & r))
    fp = int(np.sum(t & ~r))
    tn = int(np.sum(~t & ~r))
    fn = int(np.sum(~t & r))
    n = t.size
    return BinaryAgreement(
        n, tp, fp, tn, fn,
        _ratio(tp, tp + fn), wilson_ci(tp, tp + fn, alpha),
        _ratio(tn, tn + fp), wilson_ci(tn, tn + fp, alpha),
        _ratio(tp + tn, n), wilson_ci(tp + tn, n, alpha),
        _ratio(tp, tp + fp), _ratio(tn, tn + fn),
    )


def flag_narrow(values: Sequence[float], cutoff: float) -> np.ndarray:
    """Boolean 'narrow' flags: value <= cutoff (NaN values are not flagged; filter them first)."""
    v = np.asarray(values, dtype=float)
    return v <= cutoff


@dataclass
class AUCResult:
    """ROC area with its Hanley & McNeil standard error and interval."""

    auc: float
    se: float
    ci: tuple[float, float]
    n_pos: int
    n_neg: int


def roc_auc(values: Sequence[float], positive: Sequence[bool], low_is_positive: bool = True,
            alpha: float = 0.05) -> AUCResult:
    """ROC AUC of a continuous measure for a binary reference (Mann-Whitney form, ties count 1/2).

    With ``low_is_positive`` (the default, for spaces that are abnormal when narrow) the AUC is
    P(value of a positive < value of a negative) + 0.5 P(tie). The interval uses Hanley & McNeil's
    SE, clipped to [0, 1]. NaN when either class is empty.
    """
    v = np.asarray(values, dtype=float).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if v.shape != pos.shape:
        raise ValueError("values and labels must have the same length")
    ok = np.isfinite(v)
    v, pos = v[ok], pos[ok]
    n1, n0 = int(pos.sum()), int((~pos).sum())
    nan = float("nan")
    if n1 == 0 or n0 == 0:
        return AUCResult(nan, nan, (nan, nan), n1, n0)
    score = -v if low_is_positive else v
    ranks = sps.rankdata(score)  # average ranks handle ties (a tie contributes 1/2)
    auc = (ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    se = math.sqrt(max(var, 0.0))
    z = _z(alpha)
    return AUCResult(float(auc), se, (float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))), n1, n0)


# --------------------------------------------------------------------------------------------
# Ordinal grades
# --------------------------------------------------------------------------------------------
@dataclass
class KappaResult:
    """Cohen's (weighted) kappa with its large-sample SE (Fleiss, Cohen & Everitt 1969)."""

    weights: str
    kappa: float
    se: float
    ci: tuple[float, float]
    n: int
    observed_agreement: float
    table: list = field(default_factory=list)
    categories: list = field(default_factory=list)


def weighted_kappa(a: Sequence, b: Sequence, categories: Sequence | None = None,
                   weights: str = "linear", alpha: float = 0.05) -> KappaResult:
    """Cohen's kappa of two ratings on ordered categories, unweighted or linear/quadratic weighted.

    ``categories`` gives the order (default: sorted union of the observed values). Agreement
    weights are w_ij = 1 - |i-j|/(c-1) (linear) or 1 - ((i-j)/(c-1))^2 (quadratic); ``"none"`` is
    Cohen's unweighted kappa. Pairs with a missing value (None/NaN) are dropped.
    """
    if weights not in ("none", "linear", "quadratic"):
        raise ValueError("weights must be 'none', 'linear' or 'quadratic'")
    pairs = [(x, y) for x, y in zip(a, b) if not _missing(x) and not _missing(y)]
    if categories is None:
        categories = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    categories = list(categories)
    index = {c: i for i, c in enumerate(categories)}
    c = len(categories)
    table = np.zeros((c, c))
    for x, y in pairs:
        if x not in index or y not in index:
            raise ValueError(f"rating {x!r}/{y!r} not among the categories {categories}")
        table[index[x], index[y]] += 1
    return kappa_from_table(table, weights, alpha, categories)


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def kappa_from_table(table: np.ndarray, weights: str = "linear", alpha: float = 0.05,
                     categories: Sequence | None = None) -> KappaResult:
    """Weighted kappa from a c x c contingency table (rows: rater A, columns: rater B)."""
    t = np.asarray(table, dtype=float)
    c = t.shape[0]
    n = float(t.sum())
    nan = float("nan")
    cats = list(categories) if categories is not None else list(range(c))
    if n == 0 or c < 2:
        return KappaResult(weights, nan, nan, (nan, nan), int(n), nan, t.tolist(), cats)
    i, j = np.indices((c, c))
    if weights == "none":
        w = (i == j).astype(float)
    elif weights == "linear":
        w = 1 - np.abs(i - j) / (c - 1)
    else:
        w = 1 - ((i - j) / (c - 1)) ** 2
    p = t / n
    pr, pc = p.sum(axis=1), p.sum(axis=0)
    pe_tab = np.outer(pr, pc)
    po, pe = float((w * p).sum()), float((w * pe_tab).sum())
    if pe >= 1.0:
        return KappaResult(weights, nan, nan, (nan, nan), int(n), float(np.trace(p)), t.tolist(), cats)
    kappa = (po - pe) / (1 - pe)
    # large-sample SE under the alternative (Fleiss, Cohen & Everitt 1969)
    wr = w @ pc            # w_bar_i.
    wc = pr @ w            # w_bar_.j
    term = p * (w - (wr[:, None] + wc[None, :]) * (1 - kappa)) ** 2
    var = (term.sum() - (kappa - pe * (1 - kappa)) ** 2) / (n * (1 - pe) ** 2)
    se = math.sqrt(max(var, 0.0))
    z = _z(alpha)
    return KappaResult(weights, float(kappa), se, (kappa - z * se, kappa + z * se), int(n),
                       float(np.trace(p)), t.tolist(), cats)


def to_dict(obj) -> dict:
    """Dataclass result -> plain dict (tuples become lists) for JSON output."""
    return asdict(obj)
