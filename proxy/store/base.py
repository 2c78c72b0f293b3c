"""The state store protocol: what every backend (embedded memory, Redis) must provide.

Money is kept as integer nano-USD so totals across replicas add up exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

NANO = 1_000_000_000


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def utc_day(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now if now is not None else time.time()))


@dataclass(frozen=True, slots=True)
class Usage:
    """One settled request, as the store records it."""

    team: str
    model: str
    cost_nano: int
    input_tokens: int
    output_tokens: int
    saved_nano: int = 0
    saved_by_policy: tuple[tuple[str, int], ...] = ()  # (policy, nano-USD) for each policy that acted


@dataclass
class SpendLine:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    saved_nano: int = 0

    def add(self, u: Usage) -> None:
        self.requests += 1
        self.input_tokens += u.input_tokens
        self.output_tokens += u.output_tokens
        self.cost_nano += u.cost_nano
        self.saved_nano += u.saved_nano

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "spend_usd": self.cost_nano / NANO,
            "saved_usd": self.saved_nano / NANO,
        }


@dataclass
class PolicyLine:
    requests: int = 0
    saved_nano: int = 0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "saved_usd": self.saved_nano / NANO}


@dataclass
class TeamSpend:
    total: dict[str, SpendLine] = field(default_factory=dict)  # by model
    by_day: dict[str, dict[str, SpendLine]] = field(default_factory=dict)  # day -> model -> line
    policies: dict[str, PolicyLine] = field(default_factory=dict)  # all-time, by policy
    policies_by_day: dict[str, dict[str, PolicyLine]] = field(default_factory=dict)


OUTCOMES = ("win", "tie", "loss", "unjudged")  # a shadow comparison, from the policy's side
MAX_LABELS = 50_000  # retained shadow labels (with their prompts) per team and policy


@dataclass
class JudgementCounts:
    """Shadow comparisons of one policy and model pair (on one day): how its answers fared."""

    win: int = 0
    tie: int = 0
    loss: int = 0
    unjudged: int = 0

    def add(self, other: JudgementCounts) -> None:
        for outcome in OUTCOMES:
            setattr(self, outcome, getattr(self, outcome) + getattr(other, outcome))


# policy -> (day, model pair) -> counts
Judgements = dict[str, dict[tuple[str, str], JudgementCounts]]


class StoreUnavailable(Exception):
    """The backing store cannot be reached."""


@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One budget a request draws on: a team's, or one key's, for one period."""

    team: str  # every key of a team shares its hash tag, so one script touches one slot
    name: str  # "team" or "key:<fingerprint>"
    period: str  # "day:2026-11-29", "week:2026-W48", "month:2026-11" or "none"
    limit_nano: int
    ttl_s: int


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    used_nano: tuple[int, ...]  # spent + reserved per scope (including this reservation when ok)
    failed: int | None = None  # index of the scope that could not fit it


@dataclass(frozen=True, slots=True)
class LimitWindow:
    """One rate limit a request counts against: `cost` units of at most `limit` per minute."""

    team: str
    name: str  # e.g. "team:rpm", "key:<fingerprint>:tpm"
    limit: int
    cost: int


@dataclass(frozen=True, slots=True)
class LimitResult:
    ok: bool
    used: tuple[float, ...]  # sliding-window estimate per limit (after this request when ok)
    failed: int | None = None
    retry_after_s: float = 0.0


WINDOW_S = 60


def window_position(now: float) -> tuple[int, float]:
    """(index of the current one-minute window, fraction of it elapsed)."""
    index, offset = divmod(now, WINDOW_S)
    return int(index), offset / WINDOW_S


def retry_after(prev: float, curr: float, frac: float, limit: int, cost: int) -> float:
    """Seconds until the sliding-window estimate leaves room for `cost`."""
    if curr + cost > limit or prev <= 0:
        return (1 - frac) * WINDOW_S + (0.0 if curr + cost <= limit else 1.0)
    # prev*(1-f') + curr + cost <= limit  ⇒  f' >= 1 - (limit - curr - cost)/prev
    needed = 1 - (limit - curr - cost) / prev
    return max(0.0, (needed - frac) * WINDOW_S)


class Store(Protocol):
    name: str

    async def record_usage(self, usage: Usage, day: str) -> None: ...

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]: ...

    async def reserve_budget(self, scopes: list[BudgetScope], amount_nano: int) -> Reservation: ...

    async def settle_budget(self, scopes: list[BudgetScope], reserved_nano: int, actual_nano: int) -> None: ...

    async def budget_usage(self, scopes: list[BudgetScope]) -> list[tuple[int, int]]: ...

    async def hit_limits(self, windows: list[LimitWindow], now: float) -> LimitResult: ...

    async def add_to_limits(self, windows: list[LimitWindow], now: float) -> None:
        """Add (or with negative costs, take back) units in the current window without checking."""

    async def record_arm(self, policy: str, model: str, arm: str, tokens: int) -> None:
        """One output-token sample for a hold-out experiment (arm: treated or holdout)."""

    async def arm_stats(self, policy: str) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(model, arm) -> (n, sum, sum of squares) of output tokens."""

    async def record_judgement(self, policy: str, pair: str, day: str, outcome: str) -> None:
        """One shadow comparison of `policy` (outcome: win, tie, loss or unjudged) for a model pair on a day."""

    async def judgements(self, policies: list[str], days: list[str]) -> Judgements:
        """policy -> (day, model pair) -> counts, for the days given."""

    async def put_floor_stop(self, policy: str, stop: bytes, ttl_s: float) -> None:
        """Keep the latest stop of `policy` by its quality floor (what the floor read, when) for `ttl_s`."""

    async def floor_stops(self, policies: list[str]) -> dict[str, bytes]:
        """policy -> its latest kept floor stop, for those of `policies` that have one."""

    async def put_label(self, team: str, policy: str, label: bytes, ttl_s: float) -> None:
        """Keep one judged shadow sample of `policy` with its prompt (a team that retains prompts) for `ttl_s`;
        at most MAX_LABELS per team and policy, the oldest forgotten first."""

    async def labels(self, team: str, policy: str) -> list[bytes]:
        """The kept labels of `team` for `policy` that have not expired, oldest first."""

    async def put_conversation(self, team: str, response_id: str, data: bytes, ttl_s: float) -> None:
        """Keep a stored response (its conversation so far) for `ttl_s`, readable only by `team`."""

    async def get_conversation(self, team: str, response_id: str) -> bytes | None:
        """A stored response of `team`, or None (never stored, expired, deleted, or another team's)."""

    async def delete_conversation(self, team: str, response_id: str) -> bool:
        """Forget a stored response of `team`; whether there was one."""

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...
