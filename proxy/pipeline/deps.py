"""What a policy action may use from its runtime: shared services, built once per policy file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.services.budget_ledger import BudgetLedger
from proxy.services.estimator import Estimator
from proxy.services.pricing import PriceBook
from proxy.store.base import Store

if TYPE_CHECKING:
    from proxy.retrieval.service import RetrievalRuntime
    from proxy.services.routers.learned import LearnedRouter


@dataclass(frozen=True)
class ActionDeps:
    prices: PriceBook
    allowed: dict[str, frozenset[str]]  # team -> the models it may use
    store: Store
    estimator: Estimator
    ledger: BudgetLedger
    retrieval: RetrievalRuntime | None = None  # None when the policy file uses no retrieval (and in replay)
    routers: Mapping[str, LearnedRouter] = field(default_factory=dict)  # route.learned policy -> its router
