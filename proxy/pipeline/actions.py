"""The registry of policy actions: the YAML key of an action → the step class that applies it."""

from __future__ import annotations

from proxy.config.policies import PolicyConfig
from proxy.pipeline.deps import ActionDeps
from proxy.pipeline.step import PolicyAction
from proxy.steps.concise import Concise
from proxy.steps.reject import Reject
from proxy.steps.retrieve import Retrieve
from proxy.steps.route import Route
from proxy.steps.set_fields import SetFields

ACTIONS: dict[str, type[PolicyAction]] = {
    "reject": Reject,
    "set": SetFields,
    "route": Route,
    "concise": Concise,
    "retrieve": Retrieve,
}


def build_action(policy: PolicyConfig, deps: ActionDeps) -> PolicyAction:
    kind = policy.action
    return ACTIONS[kind](getattr(policy, kind), policy.name, deps)
