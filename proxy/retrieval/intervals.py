"""Confidence intervals of a rate from k successes in n trials (Clopper–Pearson exact, Wilson score):
calibration chooses thresholds by the lower bound of precision, the error bound compares the upper
bound of realised error, and benchmarks report both. Pure Python: no scipy on the proxy's path."""

from __future__ import annotations

import math


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _tail_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p) = I_p(k, n - k + 1)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return _betainc(k, n - k + 1, p)


def _solve(f, lo: float, hi: float) -> float:
    """The root of an increasing f on [lo, hi] by bisection (60 steps: below 1e-15)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95, sided: int = 2) -> tuple[float, float]:
    """The exact interval of a binomial rate; `sided=1` gives one-sided bounds at `confidence` each."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    if sided == 2:
        alpha /= 2
    lower = 0.0 if k == 0 else _solve(lambda p: _tail_at_least(k, n, p) - alpha, 0.0, 1.0)
    # upper: P(X <= k) = alpha, i.e. 1 - P(X >= k+1) = alpha; P(X >= k+1) rises with p.
    upper = 1.0 if k == n else _solve(lambda p: _tail_at_least(k + 1, n, p) - (1 - alpha), 0.0, 1.0)
    return lower, upper


def precision_lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of a precision of k correct among n hits."""
    return clopper_pearson(k, n, confidence, sided=1)[0]


def error_upper_bound(errors: int, n: int, confidence: float = 0.95) -> float:
    return clopper_pearson(errors, n, confidence, sided=1)[1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def meets_precision(k: int, n: int, target: float, confidence: float = 0.95) -> bool:
    """Whether the one-sided lower bound of k correct among n hits is at least `target` (one tail
    evaluation, no root finding: calibration asks this at every candidate threshold)."""
    if n <= 0 or k / n < target:
        return False
    return _tail_at_least(k, n, target) <= 1.0 - confidence
