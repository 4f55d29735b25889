"""Across-seed statistics: mean with a t-based 95% confidence interval, and Welch's t-test.

Seeds are few (2-5), so intervals use Student's t, not the normal approximation, and two settings are
compared with Welch's test, which does not assume equal variances.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass
class Summary:
    n: int  # finite values
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN when n < 2
    ci95: float  # half-width of the 95% interval: t(0.975, n-1) * std / sqrt(n); NaN when n < 2

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _finite(values: list[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def summarize(values: list[float | None]) -> Summary:
    """Mean, spread and 95% interval of the finite values (None and NaN, e.g. failed runs, are left out)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    if n == 1:
        return Summary(1, float(x[0]), math.nan, math.nan)
    std = float(x.std(ddof=1))
    return Summary(n, float(x.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)))


@dataclass
class Comparison:
    difference: float  # mean(a) - mean(b)
    ci95: float  # half-width of the Welch interval of the difference
    p: float  # two-sided Welch p-value; NaN when not testable
    significant: bool


def welch(a: list[float | None], b: list[float | None], alpha: float = ALPHA) -> Comparison:
    """Welch's two-sample t-test of mean(a) = mean(b) (scipy), with the interval of the difference. Needs two
    finite values per side; with zero spread on both sides the answer is exact (p = 1 for equal means, else 0)."""
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Comparison(diff, math.nan, math.nan, False)
    if sa.std == 0.0 and sb.std == 0.0:
        p = 1.0 if diff == 0 else 0.0
        return Comparison(diff, 0.0, p, p < alpha)
    res = stats.ttest_ind(_finite(a), _finite(b), equal_var=False)
    ci = res.confidence_interval(0.95)
    return Comparison(diff, float(ci.high - ci.low) / 2, float(res.pvalue), bool(res.pvalue < alpha))


def paired(a: list[float | None], b: list[float | None], alpha: float = ALPHA) -> Comparison:
    """Paired t-test of mean(a_i - b_i) = 0 over the pairs where both values are finite (a seed's two arms), with
    the t-interval of the mean difference. Pairing removes what two arms on one seed share (initialisation, data
    order), so it detects smaller effects than Welch's test with as many seeds. Needs two pairs."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    d = summarize([x - y for x, y in pairs])
    if d.n < 2:
        return Comparison(d.mean, math.nan, math.nan, False)
    if d.std == 0.0:
        p = 1.0 if d.mean == 0 else 0.0
        return Comparison(d.mean, 0.0, p, p < alpha)
    res = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
    return Comparison(d.mean, d.ci95, float(res.pvalue), bool(res.pvalue < alpha))


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return "not testable"
    if p < 0.001:
        return "p < 0.001"
    if p < 0.01:
        return "p < 0.01"
    return f"p = {p:.2f}"
