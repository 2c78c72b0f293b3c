"""The `reject` action: refuse the request with the policy's message and status."""

from __future__ import annotations

from proxy.config.policies import RejectAction
from proxy.errors import PolicyRejected
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import PolicyAction


class Reject(PolicyAction):
    """Refuse the request with the policy's message and status."""

    def __init__(self, cfg: RejectAction, name: str, _deps: object):
        self._message = cfg.message
        self._status = cfg.status
        self._name = name

    async def apply(self, ctx: RequestContext) -> bool:
        ctx.policies.append(self._name)
        raise PolicyRejected(self._message, self._status)
