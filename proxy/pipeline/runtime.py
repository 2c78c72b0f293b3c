"""The runtime: everything built from one policy file. Hot reload swaps it whole; a request keeps
the runtime it started with until it ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.config.models import PolicyFile
from proxy.pipeline.context import Pipeline
from proxy.services.keyring import KeyRing
from proxy.services.pricing import PriceBook
from proxy.services.request_log import RequestLogWriter
from proxy.steps.accounting import RecordUsage
from proxy.steps.actions import ActionDeps
from proxy.steps.apply_policies import ApplyPolicies, TaskClassifier
from proxy.steps.auth import Authenticate
from proxy.steps.budget import EnforceBudget
from proxy.steps.count_tokens import CountTokens
from proxy.steps.limits import EnforceRateLimits
from proxy.steps.log_request import LogRequests
from proxy.steps.model_access import ResolveModel, allowed_models
from proxy.steps.model_memory import FitModelMemory
from proxy.steps.retrieve import SettleRetrieval
from proxy.steps.validate import ValidateRequest
from proxy.store.base import Store
from proxy.upstream.dispatch import Dispatcher

if TYPE_CHECKING:
    from proxy.retrieval.service import Retrieval


class Runtime:
    def __init__(
        self,
        policy: PolicyFile,
        store: Store,
        session: aiohttp.ClientSession | None,
        source: str = "",
        log_writer: RequestLogWriter | None = None,
        retrieval: Retrieval | None = None,
    ):
        self.policy = policy
        self.source = source
        self.prices = PriceBook(policy.models)
        self.keyring = KeyRing(policy.teams)
        self.allowed = allowed_models(policy)
        self.tokens = CountTokens(policy, self.prices)
        self.budget = EnforceBudget(policy, store, self.tokens.reprice, self.allowed)
        # Retrieval (collections, tasks by examples) is bound only when the policy file uses it, so the
        # base proxy never imports numpy or an embedding model.
        self.retrieval = None
        if retrieval is not None and (policy.collections or any(t.examples for t in policy.tasks.values())):
            self.retrieval = retrieval.bind(policy, self._send, self.prices)
        self.tasks = TaskClassifier(policy.tasks, self.retrieval.tasks.matches if self.retrieval else None)
        deps = ActionDeps(
            prices=self.prices,
            allowed=self.allowed,
            extras={"retrieval": self.retrieval},
            store=store,
            tokens=self.tokens,
            budget_fraction=self.budget.used_fraction,
        )
        self.authenticate = Authenticate(self.keyring)
        self.model_memory = FitModelMemory(policy)
        self.pipeline = Pipeline(
            [
                self.authenticate,
                ValidateRequest(),
                ResolveModel(policy, self.allowed),
                self.tokens,
                EnforceRateLimits(policy, store),
                ApplyPolicies(policy, deps, self.tasks, self.budget.used_fraction, self.tokens.reprice),
                *([self.model_memory] if self.model_memory.memory else []),  # after routing, before the budget
                self.budget,
                RecordUsage(policy, self.prices, store),
            ]
            + ([SettleRetrieval(store, self.budget)] if self.retrieval is not None else [])
            + ([LogRequests(policy.log, log_writer)] if log_writer is not None else []),
            # Only a networked store (or retrieval, which may embed remotely) makes settle hooks wait.
            concurrent_settle=store.name != "memory" or self.retrieval is not None,
        )
        self.dispatcher = Dispatcher(policy, session) if session is not None else None

    async def _send(self, ctx: Any) -> Any:
        """An upstream call on behalf of a step (an embedding), with this runtime's retries and fallbacks."""
        return await self.dispatcher.send(ctx)

    def models_for(self, team: str) -> list[str]:
        return sorted(self.allowed.get(team, ()))
