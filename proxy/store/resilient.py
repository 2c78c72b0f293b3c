"""The store failure policy: what happens when the shared store (Redis) cannot be reached.

`fail_open` keeps serving: budgets and rate limits are not enforced while the store is down, and
every spend record (usage totals and budget settlements) goes to a local journal that is flushed,
in order, as soon as the store answers again, so no spend is lost. `fail_closed` refuses requests
with 503 until the store is back.

Each write carries a write id, kept across replays, so a write whose reply was lost after the store
ran it is not counted twice; a reservation whose reply was lost is undone if it landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from proxy import metrics
from proxy.errors import StoreDown
from proxy.store.base import (
    BudgetScope,
    Judgements,
    LimitResult,
    LimitWindow,
    Reservation,
    Store,
    StoreUnavailable,
    TeamSpend,
    Usage,
)

log = logging.getLogger("llm_proxy.store")

_FIRST_RETRY_S = 0.25
_MAX_RETRY_S = 5.0
# On shutdown, how long a journal that cannot be flushed keeps being retried: a store restarting at
# the same moment as the proxy still gets the spend, and the process still exits well inside a
# Kubernetes grace period.
_CLOSE_FLUSH_S = 5.0


class FailurePolicyStore:
    def __init__(self, inner: Store, on_failure: str):
        self.inner = inner
        self.name = inner.name
        self.fail_open = on_failure == "fail_open"
        self.journal: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._pending = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever())
        try:
            await self.inner.prepare()
        except StoreUnavailable as e:
            log.warning("store unavailable at start (%s): %s", "serving" if self.fail_open else "refusing", e)

    def _down(self, what: str, e: Exception) -> None:
        if not self.fail_open:
            raise StoreDown(f"The shared store is unavailable ({what}); try again shortly.") from e

    def _journal(self, op: str, args: tuple[Any, ...], e: Exception) -> None:
        if not self.journal:
            log.warning("store unavailable (%s): journalling spend locally until it is back", e)
        self.journal.append((op, args))
        metrics.STORE_JOURNAL.set(len(self.journal))
        self._pending.set()

    async def _write(self, op: str, args: tuple[Any, ...]) -> None:
        """One spend write, journalled (with its write id) when the store cannot take it now."""
        args = (*args, self.inner.new_write_id())
        if self.journal:  # keep order: nothing may overtake what is already waiting
            self._journal(op, args, StoreUnavailable("journal not yet flushed"))
            return
        try:
            await getattr(self.inner, op)(*args)
        except StoreUnavailable as e:
            self._journal(op, args, e)

    async def record_usage(self, usage: Usage, day: str) -> None:
        await self._write("record_usage", (usage, day))

    async def settle_budget(self, scopes: list[BudgetScope], reserved_nano: int, actual_nano: int) -> None:
        await self._write("settle_budget", (scopes, reserved_nano, actual_nano))

    async def reserve_budget(self, scopes: list[BudgetScope], amount_nano: int) -> Reservation | None:
        """None when the store is down and the policy is fail_open: the request goes unchecked."""
        write_id = self.inner.new_write_id()
        try:
            return await self.inner.reserve_budget(scopes, amount_nano, write_id)
        except StoreUnavailable as e:
            # The store may have reserved before the reply was lost: undo it, if so, once it is back.
            self._journal("release_if_reserved", (scopes, amount_nano, write_id), e)
            self._down("budget", e)
            return None

    async def budget_usage(self, scopes: list[BudgetScope]) -> list[tuple[int, int]]:
        return await self.inner.budget_usage(scopes)

    async def hit_limits(self, windows: list[LimitWindow], now: float) -> LimitResult | None:
        try:
            return await self.inner.hit_limits(windows, now)
        except StoreUnavailable as e:
            self._down("rate limits", e)
            return None

    async def add_to_limits(self, windows: list[LimitWindow], now: float) -> None:
        # A rate-limit counter missed while the store is down is not money: nothing to journal.
        with contextlib.suppress(StoreUnavailable):
            await self.inner.add_to_limits(windows, now)

    async def record_arm(self, policy: str, model: str, arm: str, tokens: int) -> None:
        await self._write("record_arm", (policy, model, arm, tokens))

    async def arm_stats(self, policy: str) -> dict[tuple[str, str], tuple[int, int, int]]:
        return await self.inner.arm_stats(policy)

    async def record_judgement(self, policy: str, pair: str, day: str, outcome: str) -> None:
        await self._write("record_judgement", (policy, pair, day, outcome))

    async def judgements(self, policies: list[str], days: list[str]) -> Judgements:
        return await self.inner.judgements(policies, days)

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]:
        return await self.inner.spend(teams, days)

    async def put_floor_stop(self, policy: str, stop: bytes, ttl_s: float) -> None:
        await self.inner.put_floor_stop(policy, stop, ttl_s)

    async def floor_stops(self, policies: list[str]) -> dict[str, bytes]:
        return await self.inner.floor_stops(policies)

    async def put_label(self, team: str, policy: str, label: bytes, ttl_s: float) -> None:
        # Never journalled: prompt text waits in no local queue; a label the store cannot take is lost.
        await self.inner.put_label(team, policy, label, ttl_s)

    async def labels(self, team: str, policy: str) -> list[bytes]:
        return await self.inner.labels(team, policy)

    async def put_conversation(self, team: str, response_id: str, data: bytes, ttl_s: float) -> None:
        # Kept after the client has its answer: a failure only means a later turn cannot continue from it.
        try:
            await self.inner.put_conversation(team, response_id, data, ttl_s)
        except StoreUnavailable as e:
            log.warning("store unavailable: response %s not kept for previous_response_id (%s)", response_id[:12], e)

    async def get_conversation(self, team: str, response_id: str) -> bytes | None:
        # Never fail open here: answering without the earlier turns would silently be a different answer.
        try:
            return await self.inner.get_conversation(team, response_id)
        except StoreUnavailable as e:
            raise StoreDown("The shared store is unavailable (stored responses); try again shortly.") from e

    async def delete_conversation(self, team: str, response_id: str) -> bool:
        try:
            return await self.inner.delete_conversation(team, response_id)
        except StoreUnavailable as e:
            raise StoreDown("The shared store is unavailable (stored responses); try again shortly.") from e

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    async def flush(self) -> bool:
        """Replay the journal in order; True when it is empty."""
        while self.journal:
            op, args = self.journal[0]
            try:
                await getattr(self.inner, op)(*args)
            except StoreUnavailable:
                return False
            self.journal.popleft()
            metrics.STORE_JOURNAL.set(len(self.journal))
        log.info("store is back: journal flushed")
        return True

    async def _flush_forever(self) -> None:
        delay = _FIRST_RETRY_S
        while True:
            await self._pending.wait()
            if await self.flush():
                self._pending.clear()
                delay = _FIRST_RETRY_S
            else:
                await asyncio.sleep(delay)  # the store is down: back off before the next try
                delay = min(delay * 2, _MAX_RETRY_S)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        deadline = asyncio.get_running_loop().time() + _CLOSE_FLUSH_S
        delay = _FIRST_RETRY_S
        while self.journal and not await self.flush():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.error("shutting down with %d spend records not written to the store", len(self.journal))
                break
            await asyncio.sleep(min(delay, left))  # the store is down: back off before the next try
            delay = min(delay * 2, _MAX_RETRY_S)
        await self.inner.close()
