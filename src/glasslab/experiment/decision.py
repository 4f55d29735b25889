"""The rules of evidence: from one metric value per seed and arm to better / worse / no effect / inconclusive.

The effect is the paired difference candidate - baseline (same seed, same data order and initialisation), its
mean and 95% t-interval in the metric's units, and a two-sided paired t-test (glasslab.study.stats). A call of
"better" or "worse" needs p < 0.05 and a mean effect at least the user's minimum effect. Welch's test of the two
arms as independent samples is reported beside it. The noise floor is the baseline's seed-to-seed standard
deviation: an effect well inside it is what a change of seed alone does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from glasslab.study.stats import ALPHA, p_text, paired, summarize, welch

Verdict = Literal["better", "worse", "no effect", "inconclusive"]


@dataclass
class Judgement:
    verdict: Verdict
    reason: str
    pairs: int  # seeds where both arms completed
    difference: float | None  # mean of candidate - baseline, in the metric's units
    ci95: float | None  # half-width of its 95% interval
    p: float | None  # paired t-test, two-sided
    welch_p: float | None
    improvement: float | None  # the difference signed so that positive is better
    noise_floor: float | None  # the baseline's seed-to-seed standard deviation
    baseline_failed: int
    candidate_failed: int

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def judge(
    baseline: list[float | None],
    candidate: list[float | None],
    *,
    goal: Literal["min", "max"],
    min_effect: float = 0.0,
    alpha: float = ALPHA,
) -> Judgement:
    """Values are per seed, in pair order; None is a run that failed (diverged) or did not log the metric."""
    ok_b = [v is not None and math.isfinite(v) for v in baseline]
    ok_c = [v is not None and math.isfinite(v) for v in candidate]
    failed_b, failed_c = ok_b.count(False), ok_c.count(False)
    cmp = paired(candidate, baseline, alpha)
    sign = -1.0 if goal == "min" else 1.0
    improvement = sign * cmp.difference
    floor = summarize(baseline).std
    w = welch(candidate, baseline, alpha)
    pairs = sum(b and c for b, c in zip(ok_b, ok_c))

    def out(verdict: Verdict, reason: str) -> Judgement:
        return Judgement(
            verdict,
            reason,
            pairs,
            _num(cmp.difference),
            _num(cmp.ci95),
            _num(cmp.p),
            _num(w.p),
            _num(improvement),
            _num(floor),
            failed_b,
            failed_c,
        )

    lost = sum(b and not c for b, c in zip(ok_b, ok_c))
    if lost > sum(c and not b for b, c in zip(ok_b, ok_c)):
        return out("worse", f"the candidate failed at {lost} seed(s) where the baseline completed")
    if pairs < 2:
        return out("inconclusive", f"only {pairs} seed(s) where both arms completed: an interval needs 2")
    effect = (
        f"{'lower' if cmp.difference < 0 else 'higher'} by {abs(cmp.difference):.4g} ± {cmp.ci95:.4g} "
        f"(paired, {p_text(cmp.p)}; noise floor {floor:.3g})"
    )
    if not cmp.significant:
        return out("no effect", f"{effect}: not significant")
    if abs(improvement) < min_effect:
        return out("no effect", f"{effect}: significant but smaller than the minimum effect {min_effect:g}")
    return out("better" if improvement > 0 else "worse", effect)
