"""The embedded in-process store: the default when no Redis URL is configured (one replica).

Each method runs without an await inside, so on one event loop it is as atomic as a Lua script.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque

from proxy.store.base import (
    MAX_LABELS,
    BudgetScope,
    JudgementCounts,
    Judgements,
    LimitResult,
    LimitWindow,
    PolicyLine,
    Reservation,
    SpendLine,
    TeamSpend,
    Usage,
    retry_after,
    window_position,
)

# Stored responses (`previous_response_id`) kept at most, oldest evicted first: memory stays bounded.
MAX_CONVERSATIONS = 10_000


class MemoryStore:
    name = "memory"

    def __init__(self, max_conversations: int = MAX_CONVERSATIONS, max_labels: int = MAX_LABELS) -> None:
        self._labels: dict[tuple[str, str], deque[tuple[float, bytes]]] = {}
        self._floor_stops: dict[str, tuple[float, bytes]] = {}  # policy -> (expires, stop)
        self._max_labels = max_labels
        self._conversations: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        self._max_conversations = max_conversations
        self._total: dict[str, dict[str, SpendLine]] = defaultdict(lambda: defaultdict(SpendLine))
        self._daily: dict[str, dict[str, dict[str, SpendLine]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(SpendLine))
        )
        self._policies: dict[str, dict[str, PolicyLine]] = defaultdict(lambda: defaultdict(PolicyLine))
        self._policies_daily: dict[str, dict[str, dict[str, PolicyLine]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(PolicyLine))
        )
        self._arms: dict[str, dict[tuple[str, str], list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
        self._budgets: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])  # spent, reserved
        self._windows: dict[tuple[str, str, int], float] = defaultdict(float)
        self._judgements: dict[str, dict[tuple[str, str], JudgementCounts]] = defaultdict(
            lambda: defaultdict(JudgementCounts)
        )

    async def record_usage(self, usage: Usage, day: str) -> None:
        self._total[usage.team][usage.model].add(usage)
        self._daily[usage.team][day][usage.model].add(usage)
        for policy, nano in usage.saved_by_policy:
            for line in (self._policies[usage.team][policy], self._policies_daily[usage.team][day][policy]):
                line.requests += 1
                line.saved_nano += nano

    async def record_arm(self, policy: str, model: str, arm: str, tokens: int) -> None:
        stats = self._arms[policy][(model, arm)]
        stats[0] += 1
        stats[1] += tokens
        stats[2] += tokens * tokens

    async def arm_stats(self, policy: str) -> dict[tuple[str, str], tuple[int, int, int]]:
        return {k: (v[0], v[1], v[2]) for k, v in self._arms.get(policy, {}).items()}

    async def record_judgement(self, policy: str, pair: str, day: str, outcome: str) -> None:
        counts = self._judgements[policy][(day, pair)]
        setattr(counts, outcome, getattr(counts, outcome) + 1)

    async def judgements(self, policies: list[str], days: list[str]) -> Judgements:
        wanted = set(days)
        out: dict[str, dict[tuple[str, str], JudgementCounts]] = {}
        for policy in policies:
            rows = self._judgements.get(policy, {})
            out[policy] = {
                k: JudgementCounts(c.win, c.tie, c.loss, c.unjudged) for k, c in rows.items() if k[0] in wanted
            }
        return out

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]:
        out: dict[str, TeamSpend] = {}
        for team in teams:
            ts = TeamSpend()
            if team in self._total:
                ts.total = dict(self._total[team])
                ts.by_day = {d: dict(self._daily[team][d]) for d in days if d in self._daily[team]}
                ts.policies = dict(self._policies[team])
                ts.policies_by_day = {
                    d: dict(self._policies_daily[team][d]) for d in days if d in self._policies_daily[team]
                }
            out[team] = ts
        return out

    @staticmethod
    def _key(scope: BudgetScope) -> tuple[str, str, str]:
        return (scope.team, scope.name, scope.period)

    async def reserve_budget(self, scopes: list[BudgetScope], amount_nano: int) -> Reservation:
        used = []
        for i, scope in enumerate(scopes):
            spent, reserved = self._budgets[self._key(scope)]
            if spent + reserved + amount_nano > scope.limit_nano:
                return Reservation(False, (*tuple(used), spent + reserved), i)
            used.append(spent + reserved + amount_nano)
        for scope in scopes:
            self._budgets[self._key(scope)][1] += amount_nano
        return Reservation(True, tuple(used))

    async def settle_budget(self, scopes: list[BudgetScope], reserved_nano: int, actual_nano: int) -> None:
        for scope in scopes:
            entry = self._budgets[self._key(scope)]
            entry[1] = max(0, entry[1] - reserved_nano)
            entry[0] += actual_nano

    async def budget_usage(self, scopes: list[BudgetScope]) -> list[tuple[int, int]]:
        return [tuple(self._budgets.get(self._key(s), (0, 0))) for s in scopes]  # type: ignore[misc]

    async def hit_limits(self, windows: list[LimitWindow], now: float) -> LimitResult:
        index, frac = window_position(now)
        used = []
        for i, w in enumerate(windows):
            prev = self._windows.get((w.team, w.name, index - 1), 0.0)
            curr = self._windows.get((w.team, w.name, index), 0.0)
            estimate = prev * (1 - frac) + curr
            if estimate + w.cost > w.limit:
                return LimitResult(False, (*used, estimate), i, retry_after(prev, curr, frac, w.limit, w.cost))
            used.append(estimate + w.cost)
        for w in windows:
            self._windows[(w.team, w.name, index)] += w.cost
        self._forget_old_windows(index)
        return LimitResult(True, tuple(used))

    async def add_to_limits(self, windows: list[LimitWindow], now: float) -> None:
        index, _ = window_position(now)
        for w in windows:
            key = (w.team, w.name, index)
            self._windows[key] = max(0.0, self._windows[key] + w.cost)

    def _forget_old_windows(self, index: int) -> None:
        if len(self._windows) > 4096:
            for key in [k for k in self._windows if k[2] < index - 1]:
                del self._windows[key]

    async def put_floor_stop(self, policy: str, stop: bytes, ttl_s: float) -> None:
        self._floor_stops[policy] = (time.monotonic() + ttl_s, stop)

    async def floor_stops(self, policies: list[str]) -> dict[str, bytes]:
        now = time.monotonic()
        out = {}
        for policy in policies:
            expires, stop = self._floor_stops.get(policy, (0.0, b""))
            if expires > now:
                out[policy] = stop
        return out

    async def put_label(self, team: str, policy: str, label: bytes, ttl_s: float) -> None:
        for other in self._labels.values():  # a few deques (teams x policies): nothing outlives its TTL for long
            self._drop_expired(other)
        kept = self._labels.setdefault((team, policy), deque(maxlen=self._max_labels))
        kept.append((time.monotonic() + ttl_s, label))

    async def labels(self, team: str, policy: str) -> list[bytes]:
        kept = self._labels.get((team, policy))
        if kept is None:
            return []
        self._drop_expired(kept)
        now = time.monotonic()
        return [label for expires, label in kept if expires > now]

    @staticmethod
    def _drop_expired(kept: deque[tuple[float, bytes]]) -> None:
        # Labels of one team and policy share a TTL, so they expire in the order they came.
        now = time.monotonic()
        while kept and kept[0][0] <= now:
            kept.popleft()

    async def put_conversation(self, team: str, response_id: str, data: bytes, ttl_s: float) -> None:
        key = (team, response_id)
        self._conversations.pop(key, None)
        self._conversations[key] = (time.monotonic() + ttl_s, data)
        while len(self._conversations) > self._max_conversations:
            self._conversations.popitem(last=False)

    async def get_conversation(self, team: str, response_id: str) -> bytes | None:
        entry = self._conversations.get((team, response_id))
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._conversations[(team, response_id)]
            return None
        return entry[1]

    async def delete_conversation(self, team: str, response_id: str) -> bool:
        entry = self._conversations.pop((team, response_id), None)
        return entry is not None and entry[0] > time.monotonic()

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None
