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

The outcomes live in the store (memory, or Redis shared by every replica): each outcome is one atomic
script that answers the bound's whole state, and each replica refreshes its copy in the background, so
a verdict given to one replica changes what every replica answers. A reload of the policy (on any
replica) starts the bound afresh, for every replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy import metrics
from proxy.retrieval.intervals import clopper_pearson, error_upper_bound
from proxy.store.base import StoreUnavailable
from proxy.store.collections import BoundState, CollectionStore, MemoryCollectionStore, Outcome, apply_outcome

log = logging.getLogger("llm_proxy.retrieval")

BAND = 0.005  # similarities are pooled in bands this wide
CONFIDENCE = 0.95
_WRONG_MARGIN = 0.005  # an entry wrong at s answers only above s + this


@dataclass(eq=False)
class ErrorBound:
    collection: str
    policy: str
    max_error: float
    start: float  # the calibrated threshold every entry starts at
    floor: float  # below this the matcher never accepts: no exploration either
    shared: CollectionStore = field(default_factory=MemoryCollectionStore)
    reset: bool = False  # a reloaded policy: forget the stored outcomes before the first use
    state: BoundState = field(default_factory=BoundState)
    stopped: bool = False
    _threshold: float | None = None
    _resetting: asyncio.Task[None] | None = None
    _recorded: int = 0  # outcomes this replica recorded: a refresh read before one is stale

    @property
    def key(self) -> str:
        """The bound in the store: a policy that changed its bound or start learns apart from the old one."""
        text = f"{self.policy}|{self.max_error!r}|{self.start!r}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

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
        bands = self.state.bands
        for band in sorted(bands, reverse=True):
            c, w = bands[band]
            correct, wrong = correct + c, wrong + w
            low = band * BAND
            if low < best and error_upper_bound(wrong, correct + wrong, CONFIDENCE) <= self.max_error:
                best = max(low, self.floor)
        return best

    def answers(self, entry_id: str, similarity: float) -> bool:
        """Whether this entry may answer at this similarity (the matcher has accepted it already)."""
        if self.stopped:
            return False
        if similarity <= self.state.entry_floor.get(entry_id, -2.0):
            return False
        return similarity >= self.threshold()

    def _over_bound(self, state: BoundState) -> bool:
        low, _ = clopper_pearson(state.served_wrong, state.served_judged)
        return state.served_judged > 0 and low > self.max_error

    def _use(self, state: BoundState) -> None:
        self.state = state
        self._threshold = None
        # Stopped until a reload resets the stored state, whatever later outcomes say.
        self.stopped = state.stopped or self._over_bound(state)
        if state.served_judged:
            metrics.RETRIEVAL_REALISED_ERROR.labels(self.collection, self.policy).set(
                state.served_wrong / state.served_judged
            )

    async def _reset_once(self) -> None:
        if self.reset:
            if self._resetting is None:
                self._resetting = asyncio.get_running_loop().create_task(
                    self.shared.reset_bound(self.collection, self.key)
                )
            await asyncio.shield(self._resetting)
            self.reset = False

    async def refresh(self) -> None:
        """Take the outcomes every replica has recorded (the background follower calls this)."""
        await self._reset_once()
        seen = self._recorded
        state = await self.shared.bound_state(self.collection, self.key)
        if self._recorded == seen:  # else an outcome recorded meanwhile brought a newer state already
            self._use(state)

    async def record(self, entry_id: str, similarity: float, correct: bool, served: bool) -> None:
        """One verified outcome: an exploration's re-generation, or feedback on a served hit."""
        outcome = Outcome(entry_id, self._band(similarity), correct, served, similarity + _WRONG_MARGIN)
        try:
            await self._reset_once()
            state = await self.shared.record_outcome(self.collection, self.key, outcome)
            if self._over_bound(state) and not state.stopped:
                await self.shared.stop_bound(self.collection, self.key)
                state.stopped = True
        except StoreUnavailable as e:
            # This replica still learns from it (a wrong entry stops answering here); the others cannot.
            log.warning("collection %s: an outcome could not be shared: %s", self.collection, e)
            state = BoundState(
                dict(self.state.bands),
                dict(self.state.entry_floor),
                self.state.served_judged,
                self.state.served_wrong,
                self.state.explored,
                self.stopped,
            )
            apply_outcome(state, outcome)
        self._use(state)
        self._recorded += 1
        metrics.RETRIEVAL_VERDICTS.labels(self.collection, self.policy, "good" if correct else "bad").inc()

    def status(self) -> dict[str, Any]:
        n, k = self.state.served_judged, self.state.served_wrong
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
            "explored": self.state.explored,
            "entries_raised": len(self.state.entry_floor),
            "answering": not self.stopped,
        }


@dataclass(frozen=True, slots=True)
class PendingOutcome:
    """A retrieval answer that feedback can still judge: who asked, which bound and entry, how similar."""

    team: str | None
    policy: str
    collection: str
    bound: str  # ErrorBound.key
    entry_id: str
    similarity: float

    def to_bytes(self) -> bytes:
        return orjson.dumps([self.team, self.policy, self.collection, self.bound, self.entry_id, self.similarity])

    @classmethod
    def from_bytes(cls, raw: bytes) -> PendingOutcome | None:
        try:
            team, policy, collection, bound, entry_id, similarity = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        return cls(team, policy, collection, bound, entry_id, float(similarity))


class OutcomeLedger:
    """Retrieval answers by request id for a day, in the store: feedback finds them on any replica."""

    def __init__(self, store: CollectionStore | None = None, ttl_s: float = 86400.0):
        self._store = store if store is not None else MemoryCollectionStore()
        self._ttl = ttl_s

    async def remember(self, request_id: str, outcome: PendingOutcome) -> None:
        await self._store.remember_answer(request_id, outcome.to_bytes(), self._ttl)

    async def find(self, request_id: str) -> PendingOutcome | None:
        raw = await self._store.answer(request_id)
        return PendingOutcome.from_bytes(raw) if raw is not None else None

    async def judge(self, request_id: str) -> bool:
        """Mark a request judged; False when it already was (one verdict per request counts)."""
        return await self._store.judge_answer(request_id, self._ttl)
