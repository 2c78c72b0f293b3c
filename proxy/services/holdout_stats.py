"""The hold-out estimator: how much a policy (conciseness) really saves, from two arms of requests.

Each arm is kept as sufficient statistics (count, sum, sum of squares of output tokens), which add
up across replicas in the store. The realised saving is 1 − mean(treated)/mean(hold-out), with a
95% confidence interval from the delta method on the ratio of two independent means.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

Z_95 = 1.959963984540054
TREATED = "treated"
HOLDOUT = "holdout"


def holdout_bucket(request_id: str) -> float:
    """A uniform number in [0, 1) fixed by the request id."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True, slots=True)
class ArmStats:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: list[float]) -> ArmStats:
        return cls(len(values), float(sum(values)), float(sum(v * v for v in values)))

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Unbiased sample variance."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True, slots=True)
class SavingEstimate:
    saving: float  # fraction of output tokens saved, 1 − treated/hold-out
    ci_low: float
    ci_high: float
    treated: ArmStats
    holdout: ArmStats

    @property
    def ratio(self) -> float:
        """treated / hold-out mean output tokens."""
        return 1.0 - self.saving

    def as_dict(self) -> dict[str, float | int]:
        return {
            "saving": self.saving,
            "ci95": [self.ci_low, self.ci_high],
            "treated": {"n": self.treated.n, "mean_output_tokens": self.treated.mean},
            "holdout": {"n": self.holdout.n, "mean_output_tokens": self.holdout.mean},
        }


def realised_saving(treated: ArmStats, holdout: ArmStats) -> SavingEstimate | None:
    """None until both arms have two samples and the hold-out mean is positive."""
    if treated.n < 2 or holdout.n < 2 or holdout.mean <= 0:
        return None
    ratio = treated.mean / holdout.mean
    # Var(T/H) ≈ R² (Var(T)/(n_t T²) + Var(H)/(n_h H²)) for independent arms.
    rel_t = treated.variance / (treated.n * treated.mean**2) if treated.mean > 0 else 0.0
    rel_h = holdout.variance / (holdout.n * holdout.mean**2)
    half = Z_95 * ratio * math.sqrt(rel_t + rel_h)
    return SavingEstimate(1 - ratio, 1 - ratio - half, 1 - ratio + half, treated, holdout)
