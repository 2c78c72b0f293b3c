"""The runtime: everything built from one policy file. Hot reload swaps it whole; a request keeps
the runtime it started with until it ends."""

from __future__ import annotations

import aiohttp

from proxy.config.models import PolicyFile
from proxy.pipeline import Pipeline
from proxy.pricing import PriceBook
from proxy.steps.accounting import RecordUsage
from proxy.steps.actions import ActionDeps
from proxy.steps.auth import Authenticate, KeyRing
from proxy.steps.budget import EnforceBudget
from proxy.steps.limits import EnforceRateLimits
from proxy.steps.model_access import ResolveModel, allowed_models
from proxy.steps.policies import ApplyPolicies, TaskClassifier
from proxy.steps.request_log import LogRequests, RequestLogWriter
from proxy.steps.tokens import CountTokens
from proxy.steps.validate import ValidateRequest
from proxy.store.base import Store
from proxy.upstream.dispatch import Dispatcher


class Runtime:
    def __init__(
        self,
        policy: PolicyFile,
        store: Store,
        session: aiohttp.ClientSession | None,
        source: str = "",
        log_writer: RequestLogWriter | None = None,
    ):
        self.policy = policy
        self.source = source
        self.prices = PriceBook(policy.models)
        self.keyring = KeyRing(policy.teams)
        self.allowed = allowed_models(policy)
        self.tokens = CountTokens(policy, self.prices)
        self.budget = EnforceBudget(policy, store, self.tokens.reprice, self.allowed)
        self.tasks = TaskClassifier(policy.tasks)
        deps = ActionDeps(prices=self.prices, allowed=self.allowed, extras={})
        self.authenticate = Authenticate(self.keyring)
        self.pipeline = Pipeline(
            [
                self.authenticate,
                ValidateRequest(),
                ResolveModel(policy, self.allowed),
                self.tokens,
                EnforceRateLimits(policy, store),
                ApplyPolicies(policy, deps, self.tasks, self.budget.used_fraction, self.tokens.reprice),
                self.budget,
                RecordUsage(policy, self.prices, store),
            ]
            + ([LogRequests(policy.log, log_writer)] if log_writer is not None else [])
        )
        self.dispatcher = Dispatcher(policy, session) if session is not None else None

    def models_for(self, team: str) -> list[str]:
        return sorted(self.allowed.get(team, ()))
