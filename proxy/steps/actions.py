"""The registry of policy actions: the YAML key of an action → the step class that applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.policies import PolicyConfig
from proxy.services.pricing import PriceBook
from proxy.steps.concise import Concise
from proxy.steps.reject import Reject
from proxy.steps.retrieve import Retrieve
from proxy.steps.route import Route
from proxy.steps.set_fields import SetFields

ACTIONS: dict[str, type] = {
    "reject": Reject,
    "set": SetFields,
    "route": Route,
    "concise": Concise,
    "retrieve": Retrieve,
}


@dataclass(frozen=True)
class ActionDeps:
    """What an action may need from the runtime; built once per policy file."""

    prices: PriceBook
    allowed: dict[str, frozenset[str]]
    extras: dict[str, Any]
    store: Any = None
    tokens: Any = None  # the CountTokens step: per-model token counters
    budget_fraction: Any = None  # async (ctx) -> fraction of the team's budget used


def build_action(policy: PolicyConfig, deps: ActionDeps) -> Any:
    kind = policy.action
    return ACTIONS[kind](getattr(policy, kind), policy.name, deps)
