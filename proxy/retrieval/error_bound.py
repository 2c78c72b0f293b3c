"""An error bound for one collection under one `retrieve:` policy (`max_error`), learned from verified
outcomes in the spirit of vCache (per-entry thresholds from verified hits):

- every entry starts conservative: it answers only at or above the policy's calibrated threshold;
- a lookup the matcher would accept below that goes upstream (an exploration) and its answer is compared
  with the entry's: an exact (normalised) re-generation is a correct outcome, anything else a wrong one
  (conservative: a paraphrased answer counts against the entry);
- client feedback (`POST /v1/proxy/feedback`) on a served hit is a correct or wrong outcome;
- the collection's threshold comes down, band by band, only where the pooled outcomes at or above a
  similarity bound their error (Clopper–Pearson, one-sided) at `max_error`; an entry with a wrong
  outcome never again answers at or below that similarity;
- the realised error of served hits that were judged is shown with its interval, and once its lower
  bound exceeds `max_error` the collection stops answering for this policy until the policy is reloaded.

State is per process (each worker learns on its own) and starts afresh on reload.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.retrieval.intervals import clopper_pearson, error_upper_bound

BAND = 0.005  # similarities are pooled in bands this wide
CONFIDENCE = 0.95
_WRONG_MARGIN = 0.005  # an entry wrong at s answers only above s + this


@dataclass(slots=True)
class _Band:
    correct: int = 0
    wrong: int = 0


@dataclass(slots=True)
class ErrorBound:
    collection: str
    policy: str
    max_error: float
    start: float  # the calibrated threshold every entry starts at
    floor: float  # below this the matcher never accepts: no exploration either
    bands: dict[int, _Band] = field(default_factory=dict)
    entry_floor: dict[str, float] = field(default_factory=dict)  # entry -> similarity it must exceed
    served_judged: int = 0
    served_wrong: int = 0
    explored: int = 0
    stopped: bool = False
    _threshold: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _band(similarity: float) -> int:
        return math.floor(similarity / BAND + 1e-9)

    def threshold(self) -> float:
        """The collection's threshold now: the start, or lower where outcomes bound the error."""
        if self._threshold is None:
            self._threshold = self._learned()
        return self._threshold

    def _learned(self) -> float:
        correct = wrong = 0
        best = self.start
        for band in sorted(self.bands, reverse=True):
            b = self.bands[band]
            correct, wrong = correct + b.correct, wrong + b.wrong
            low = band * BAND
            if low < best and error_upper_bound(wrong, correct + wrong, CONFIDENCE) <= self.max_error:
                best = max(low, self.floor)
        return best

    def answers(self, entry_id: str, similarity: float) -> bool:
        """Whether this entry may answer at this similarity (the matcher has accepted it already)."""
        if self.stopped:
            return False
        if similarity <= self.entry_floor.get(entry_id, -2.0):
            return False
        return similarity >= self.threshold()

    def record(self, entry_id: str, similarity: float, correct: bool, served: bool) -> None:
        """One verified outcome: an exploration's re-generation, or feedback on a served hit."""
        with self._lock:
            b = self.bands.setdefault(self._band(similarity), _Band())
            if correct:
                b.correct += 1
            else:
                b.wrong += 1
                self.entry_floor[entry_id] = max(self.entry_floor.get(entry_id, -2.0), similarity + _WRONG_MARGIN)
            if served:
                self.served_judged += 1
                self.served_wrong += not correct
            else:
                self.explored += 1
            self._threshold = None
            low, _ = clopper_pearson(self.served_wrong, self.served_judged)
            if self.served_judged and low > self.max_error and not self.stopped:
                self.stopped = True
        metrics.RETRIEVAL_VERDICTS.labels(self.collection, self.policy, "good" if correct else "bad").inc()
        if self.served_judged:
            metrics.RETRIEVAL_REALISED_ERROR.labels(self.collection, self.policy).set(
                self.served_wrong / self.served_judged
            )

    def status(self) -> dict[str, Any]:
        n, k = self.served_judged, self.served_wrong
        low, high = clopper_pearson(k, n)
        return {
            "policy": self.policy,
            "max_error": self.max_error,
            "threshold": round(self.threshold(), 4),
            "start": self.start,
            "served_judged": n,
            "served_wrong": k,
            "realised_error": k / n if n else None,
            "interval": [low, high] if n else None,
            "explored": self.explored,
            "entries_raised": len(self.entry_floor),
            "answering": not self.stopped,
        }


@dataclass(frozen=True, slots=True)
class PendingOutcome:
    """A request whose retrieval decision can still be judged: who asked, which entry, how similar."""

    team: str | None
    bound: ErrorBound
    entry_id: str
    similarity: float
    served: bool
    at: float


class OutcomeLedger:
    """Recent retrieval decisions by request id (bounded, one day), for feedback to find them."""

    def __init__(self, max_items: int = 100_000, ttl_s: float = 86400.0):
        self._items: OrderedDict[str, PendingOutcome] = OrderedDict()
        self._max = max_items
        self._ttl = ttl_s
        self._judged: set[str] = set()
        self._lock = threading.Lock()

    def remember(self, request_id: str, outcome: PendingOutcome) -> None:
        with self._lock:
            self._items[request_id] = outcome
            self._items.move_to_end(request_id)
            while len(self._items) > self._max:
                old, _ = self._items.popitem(last=False)
                self._judged.discard(old)

    def find(self, request_id: str, now: float | None = None) -> PendingOutcome | None:
        outcome = self._items.get(request_id)
        if outcome is None or (now or time.time()) - outcome.at > self._ttl:
            return None
        return outcome

    def judge(self, request_id: str) -> bool:
        """Mark a request judged; False when it already was (one verdict per request counts)."""
        with self._lock:
            if request_id in self._judged:
                return False
            self._judged.add(request_id)
            return True
