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


@dataclass
class SpendLine:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0

    def add(self, u: Usage) -> None:
        self.requests += 1
        self.input_tokens += u.input_tokens
        self.output_tokens += u.output_tokens
        self.cost_nano += u.cost_nano

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "spend_usd": self.cost_nano / NANO,
        }


@dataclass
class TeamSpend:
    total: dict[str, SpendLine] = field(default_factory=dict)  # by model
    by_day: dict[str, dict[str, SpendLine]] = field(default_factory=dict)  # day -> model -> line


class StoreUnavailable(Exception):
    """The backing store cannot be reached."""


class Store(Protocol):
    name: str

    async def record_usage(self, usage: Usage, day: str) -> None: ...

    async def spend(self, teams: list[str], days: list[str]) -> dict[str, TeamSpend]: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...
