"""Quality retained by a cost policy, from paired comparisons (the policy's answer against the one the
client asked for): the share at least as good, its Wilson 95% interval, and the `min_quality` floor rule.

Pure functions, shared by the shadow evaluation, the learned router's fit and the replay benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share: honest at small n and at shares near 0 or 1,
    where the normal approximation leaves [0, 1]. With no samples, nothing is known: (0, 1)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class QualityRetained:
    """Judged pairs of one policy: its answer won, tied or lost against the counterfactual."""

    wins: int
    ties: int
    losses: int
    share: float  # (wins + ties) / n: at least as good; 1.0 when nothing is judged yet
    low: float
    high: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def quality_retained(wins: int, ties: int, losses: int) -> QualityRetained:
    """The share of judged pairs where the policy's answer is at least as good, with its Wilson 95% interval."""
    if min(wins, ties, losses) < 0:
        raise ValueError("counts cannot be negative")
    n = wins + ties + losses
    kept = wins + ties
    low, high = wilson_interval(kept, n)
    return QualityRetained(wins, ties, losses, kept / n if n else 1.0, low, high)


def floor_breached(quality: QualityRetained, min_quality: float, min_samples: int) -> bool:
    """Whether a policy must stop: with at least `min_samples` judged pairs, even the upper end of its
    interval is below the floor (so a bad run of luck on few samples never stops a good policy)."""
    return quality.n >= min_samples and quality.high < min_quality
