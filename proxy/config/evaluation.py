"""Pydantic models of shadow evaluation: the `evaluation:` block (judge, measurement budget, queue, who
is measured) and a cost policy's `shadow:` sampling and `min_quality` floor."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# The pseudo-team measurement spend is recorded and budgeted under: apart from every team's spend.
MEASUREMENT_TEAM = "__measurement__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_RETENTION_S = 30 * 86400


def duration_s(value: object) -> object:
    """`90s`, `30m`, `12h`, `7d`, or a number of seconds, as seconds (other values are left to the type check)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. 90s, 30m, 12h or 7d")
        return float(m.group(1)) * _UNIT_S[m.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(duration_s)]


class RetainPrompts(_Strict):
    """A team's opt-in: the prompt text of its judged shadow samples is kept (with the judgement) for `ttl`,
    so `router fit --from-store` can learn from them. Off unless a team sets it; nothing else keeps prompts."""

    ttl: Annotated[Duration, Field(ge=1, le=MAX_RETENTION_S)]


class EvaluationConfig(_Strict):
    """How the proxy measures the quality its cost policies keep, off the client's path."""

    # A `models:` entry that judges pairs of answers (needed by any `shadow: {compare: judge}`).
    judge: str | None = None
    # Shadow and judge calls are real spend: at most this many USD per UTC day, reserved before each
    # measurement like any budget, never counted against a team.
    budget_usd_per_day: Annotated[float, Field(ge=0)] = 1.0
    # Measurements waiting for a worker; beyond it new ones are dropped (llm_proxy_shadow_dropped_total).
    queue: Annotated[int, Field(ge=1, le=100_000)] = 256
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    # One shadow or judge call slower than this is abandoned (counted, nothing recorded for the pair).
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    judge_max_tokens: Annotated[int, Field(ge=1, le=8192)] = 512
    # The days of judgements a `min_quality` floor is read over.
    window_days: Annotated[int, Field(ge=1, le=90)] = 7
    # How often each replica reads the stops other replicas' floors made (shared through the store).
    floor_refresh_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    # Teams whose requests are never shadowed (their prompts never leave for a second call).
    exclude_teams: list[str] = []


class ShadowConfig(_Strict):
    """Sample a policy's changed requests and compare its answer with the counterfactual's."""

    rate: Annotated[float, Field(gt=0, le=1)] = 0.02
    # judge: the `evaluation.judge` model compares (both orders); exact | json | number: the policy's answer
    # must equal the counterfactual's text, JSON value or final number (checkable tasks, no judge spend).
    compare: Literal["judge", "exact", "json", "number"] = "judge"
