"""The runtime: everything built from one policy file, services first, then the steps over them in
the order a request crosses them. Hot reload swaps it whole; a request keeps the runtime it started
with until it ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.config.models import PolicyFile
from proxy.config.references import uses_embedder
from proxy.pipeline.actions import build_action
from proxy.pipeline.deps import ActionDeps
from proxy.pipeline.step import Pipeline, PolicyAction, Step
from proxy.services.budget_ledger import BudgetLedger
from proxy.services.embedding_client import EmbeddingClient
from proxy.services.estimator import Estimator
from proxy.services.evaluation import ShadowEvaluator
from proxy.services.keyring import KeyRing
from proxy.services.pricing import PriceBook
from proxy.services.request_log import RequestLogWriter
from proxy.services.runtime_keys import RuntimeKeys
from proxy.services.tasks import TaskClassifier
from proxy.services.team_models import allowed_models
from proxy.steps.accounting import RecordUsage
from proxy.steps.apply_policies import ApplyPolicies
from proxy.steps.auth import Authenticate
from proxy.steps.budget import EnforceBudget
from proxy.steps.conversation import KeepConversation
from proxy.steps.count_tokens import CountTokens
from proxy.steps.key_usage import NoteKeyUse
from proxy.steps.limits import EnforceRateLimits
from proxy.steps.log_request import LogRequests
from proxy.steps.model_access import ResolveModel
from proxy.steps.model_memory import FitModelMemory
from proxy.steps.retrieve import SettleRetrieval
from proxy.steps.shadow import SampleForShadow
from proxy.steps.translate import TranslateForUpstream
from proxy.steps.validate import ValidateRequest
from proxy.store.base import Store
from proxy.upstream.dispatch import Dispatcher

if TYPE_CHECKING:
    from proxy.retrieval.service import Retrieval
    from proxy.services.routers.learned import LearnedRouter


class Runtime:
    def __init__(
        self,
        policy: PolicyFile,
        store: Store,
        session: aiohttp.ClientSession | None,
        source: str = "",
        log_writer: RequestLogWriter | None = None,
        retrieval: Retrieval | None = None,
        runtime_keys: RuntimeKeys | None = None,
    ):
        self.policy = policy
        self.source = source
        # services: plain objects shared by the steps
        self.prices = PriceBook(policy.models)
        self.keyring = KeyRing(policy.teams, runtime_keys)
        self.allowed = allowed_models(policy)
        self.estimator = Estimator(policy, self.prices, self.allowed)
        self.ledger = BudgetLedger(policy, store)
        self.dispatcher = Dispatcher(policy, session, self.allowed) if session is not None else None
        self.embedding_client = EmbeddingClient(self.dispatcher, self.estimator)
        # Retrieval (collections, tasks by examples) is bound only when the policy file uses it, so the
        # base proxy never imports numpy or an embedding model.
        self.retrieval = None
        if retrieval is not None and uses_embedder(policy):
            self.retrieval = retrieval.bind(policy, self.embedding_client, self.prices)
        # Learned routers (route.learned), one per policy, over the runtime's embedders.
        self.routers: dict[str, LearnedRouter] = {}
        if self.retrieval is not None and any(p.route and p.route.learned for p in policy.policies):
            from proxy.services.routers.learned import build_routers  # numpy: only for learned routes

            self.routers = build_routers(policy, self.retrieval.embedders)
        self.tasks = TaskClassifier(policy.tasks, self.retrieval.tasks.matches if self.retrieval else None)
        # Shadow evaluation runs only where the runtime can call upstreams (not in explain or replay).
        self.evaluation: ShadowEvaluator | None = None
        if policy.evaluation is not None and self.dispatcher is not None and any(p.shadow for p in policy.policies):
            self.evaluation = ShadowEvaluator(policy, self.dispatcher, self.estimator, store)
        deps = ActionDeps(self.prices, self.allowed, store, self.estimator, self.ledger, self.retrieval, self.routers)
        rules = [(p, build_action(p, deps)) for p in policy.policies]
        # Actions with work after the answer (conciseness measures its arms) are steps of their own.
        followers: list[PolicyAction] = [a for _, a in rules if a.hooks()]
        # steps, in the order a request crosses them
        self.authenticate = Authenticate(self.keyring)
        self.model_memory = FitModelMemory(policy)
        self.conversations = KeepConversation(store, policy.server.responses_ttl_s)
        validate, resolve, count = ValidateRequest(), ResolveModel(policy, self.allowed), CountTokens(self.estimator)
        # The token-counting endpoints (Anthropic's count_tokens, the Responses API's input_tokens) take
        # only the checks: nothing is generated, reserved or billed.
        self.counting = Pipeline([self.authenticate, validate, resolve], concurrent_settle=False)
        steps: list[Step] = [
            self.authenticate,
            validate,
            resolve,
            self.conversations,
            count,
            EnforceRateLimits(policy, store),
            *([SampleForShadow(policy, self.evaluation)] if self.evaluation else []),  # before policies change it
            ApplyPolicies(rules, self.tasks, self.ledger, self.estimator, self.evaluation and self.evaluation.floor),
            *followers,
            *([self.model_memory] if self.model_memory.memory else []),  # after routing, before the budget
            TranslateForUpstream(policy),
            EnforceBudget(self.ledger, self.estimator, self.allowed),
            RecordUsage(policy, self.estimator, store),
        ]
        if self.retrieval is not None:
            steps.append(SettleRetrieval(store))
        if log_writer is not None:
            steps.append(LogRequests(policy.log, log_writer))
        if runtime_keys is not None:
            steps.append(NoteKeyUse(runtime_keys))
        # Only a networked store (or retrieval, which may embed remotely) makes settle hooks wait.
        self.pipeline = Pipeline(steps, concurrent_settle=store.name != "memory" or self.retrieval is not None)

    def models_for(self, team: str, rights: Any = None) -> list[str]:
        allowed = self.allowed.get(team, ())
        return sorted(m for m in allowed if rights is None or rights.allows(m))
