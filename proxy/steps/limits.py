"""Rate limits per team and per key: requests and tokens per minute, sliding window, shared via the store.

Prompt tokens count when the request arrives; completion tokens (and the tokens of embeddings the proxy
made to decide the request) are added when it settles. A request
that never reaches the upstream (rejected by a later step) is taken back out of the windows.
"""

from __future__ import annotations

import math
import time
from typing import Any

from proxy import metrics
from proxy.config.models import LimitsConfig, PolicyFile
from proxy.errors import RateLimited
from proxy.pipeline.context import LimitSlot, RequestContext
from proxy.pipeline.step import Step
from proxy.store.base import WINDOW_S, LimitWindow, Store


def _windows(team: str, scope: str, cfg: LimitsConfig | None, prompt_tokens: int) -> list[LimitWindow]:
    if cfg is None:
        return []
    out = []
    if cfg.rpm:
        out.append(LimitWindow(team, f"{scope}:rpm", cfg.rpm, 1))
    if cfg.tpm:
        out.append(LimitWindow(team, f"{scope}:tpm", cfg.tpm, prompt_tokens))
    return out


def _header_kind(w: LimitWindow) -> str:
    return "requests" if w.name.endswith(":rpm") else "tokens"


# The names (and the reset value) of the x-ratelimit-* headers, encoded once rather than per request.
_HEADER_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}".encode(), f"x-ratelimit-remaining-{kind}".encode(),
           f"x-ratelimit-reset-{kind}".encode())
    for kind in ("requests", "tokens")
}  # fmt: skip
_RESET = f"{WINDOW_S}s".encode()


class EnforceRateLimits(Step):
    """Count the request and its prompt tokens in every rpm/tpm window (429 past a limit); add the rest after."""

    def __init__(self, policy: PolicyFile, store: Store):
        self._teams = policy.teams
        self._store = store
        # (team, key) -> its windows, built once: names and limits come from the config.
        self._plans: dict[tuple[str | None, str | None], list[tuple[LimitWindow, bool]]] = {}

    def windows(self, ctx: RequestContext) -> list[LimitWindow]:
        plan = self._plans.get((ctx.team, ctx.key_id))
        if plan is None:
            plan = self._plan(ctx.team, ctx.key_id, ctx.key_rights)
        # A request window (cost 1) is the same object every time; token windows carry the prompt's count.
        return [LimitWindow(w.team, w.name, w.limit, ctx.prompt_tokens) if tpm else w for w, tpm in plan]

    def _plan(self, team: str | None, key_id: str | None, rights: Any = None) -> list[tuple[LimitWindow, bool]]:
        cfg = self._teams.get(team)
        own = rights.limits if rights is not None else None  # a runtime key's own limits, on top of the team's
        if cfg is None or (cfg.limits is None and cfg.key_limits is None and own is None):
            plan = []
        else:
            windows = _windows(team, "team", cfg.limits, 0) + _windows(team, f"key:{key_id}", cfg.key_limits, 0)
            windows += _windows(team, f"vkey:{key_id}", own, 0)
            plan = [(w, w.name.endswith(":tpm")) for w in windows]
        if len(self._plans) > 65536:  # keys are bounded by the config; this bounds a pathological one
            self._plans.clear()
        self._plans[(team, key_id)] = plan
        return plan

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.dry_run:
            return
        windows = self.windows(ctx)
        if not windows:
            return
        now = time.time()
        result = await self._store.hit_limits(windows, now)
        if result is None:  # store down, fail_open
            return
        if not result.ok:
            w = windows[result.failed]
            wait = max(1, math.ceil(result.retry_after_s))
            kind = _header_kind(w)
            scope = "your team" if w.name.startswith("team:") else "this key"
            metrics.RATE_LIMITED.labels(ctx.team, w.name.rsplit(":", 1)[1]).inc()
            raise RateLimited(
                f"Rate limit reached for {scope}: {w.limit} {kind} per minute. Retry in {wait}s.",
                headers={
                    "retry-after": str(wait),
                    f"x-ratelimit-limit-{kind}": str(w.limit),
                    f"x-ratelimit-remaining-{kind}": str(max(0, int(w.limit - result.used[-1]))),
                    f"x-ratelimit-reset-{kind}": f"{wait}s",
                },
            )
        ctx.limits = LimitSlot(windows, now)
        seen = set()
        for w, used in zip(windows, result.used, strict=True):
            kind = _header_kind(w)
            if kind in seen:  # the first (team) window of each kind is the one reported
                continue
            seen.add(kind)
            limit_name, remaining_name, reset_name = _HEADER_NAMES[kind]
            ctx.extra_headers += [
                (limit_name, str(w.limit).encode()),
                (remaining_name, str(max(0, int(w.limit - used))).encode()),
                (reset_name, _RESET),
            ]

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.limits is None:
            return
        windows = ctx.limits.windows
        if not ctx.sent_upstream:
            # Taken back out of the window that counted it, even if a new minute began meanwhile.
            undo = [LimitWindow(w.team, w.name, w.limit, -w.cost) for w in windows]
            await self._store.add_to_limits(undo, ctx.limits.hit_at)
            return
        # The output, and the embeddings the proxy made to decide the request, count as tokens too.
        later = ctx.output_tokens + (ctx.embeddings.tokens() if ctx.embeddings is not None else 0)
        if later:
            tpm = [LimitWindow(w.team, w.name, w.limit, later) for w in windows if w.name.endswith(":tpm")]
            if tpm:
                await self._store.add_to_limits(tpm, time.time())
