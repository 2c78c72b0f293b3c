"""The Step protocol and the pipeline that runs an ordered list of steps over one RequestContext.

A step overrides up to three hooks: `on_request(ctx)` before the upstream call (it may raise a
ProxyError to answer the client, or set `ctx.answer` to answer without an upstream call),
`on_response(ctx)` once the answer and its usage are known, and `on_settle(ctx)` after the client has
its response, successful or not (release what was reserved, record what was spent). Steps read and
write the context and their own slot of it; they share services, never each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import ClassVar

from proxy.pipeline.context import RequestContext

Hook = Callable[[RequestContext], Awaitable[None]]
PHASES = ("on_request", "on_response", "on_settle")


class Step:
    """Base of every pipeline step; a hook it does not override is not run."""

    name: ClassVar[str] = ""

    async def on_request(self, ctx: RequestContext) -> None:
        return None

    async def on_response(self, ctx: RequestContext) -> None:
        return None

    async def on_settle(self, ctx: RequestContext) -> None:
        return None

    def hooks(self) -> tuple[str, ...]:
        """The phases this step acts in."""
        return tuple(p for p in PHASES if getattr(type(self), p) is not getattr(Step, p))

    def describe(self) -> str:
        """One line on what the step does (its class docstring's first line)."""
        doc = type(self).__doc__ or ""
        return doc.strip().split("\n", 1)[0]


def step_name(step: Step) -> str:
    return step.name or type(step).__name__


class Pipeline:
    def __init__(self, steps: list[Step], concurrent_settle: bool = True):
        self.steps = steps
        self._concurrent_settle = concurrent_settle
        self._request_hooks: list[Hook] = [s.on_request for s in steps if "on_request" in s.hooks()]
        self._response_hooks: list[Hook] = [s.on_response for s in steps if "on_response" in s.hooks()]
        self._settle_hooks: list[Hook] = [s.on_settle for s in reversed(steps) if "on_settle" in s.hooks()]

    def describe(self) -> list[dict[str, object]]:
        """The request path, step by step: what `explain --steps` prints."""
        return [{"step": step_name(s), "hooks": list(s.hooks()), "does": s.describe()} for s in self.steps]

    async def run_request(self, ctx: RequestContext) -> None:
        for hook in self._request_hooks:
            await hook(ctx)
            if ctx.answer is not None:
                return

    async def run_response(self, ctx: RequestContext) -> None:
        for hook in self._response_hooks:
            await hook(ctx)

    async def run_settle(self, ctx: RequestContext) -> None:
        # Settle hooks are independent (each releases or records what its own step did), so with a
        # networked store they run together: their store writes then share one round trip. With the
        # in-process store nothing waits, and one task per hook would cost more than the hooks.
        if not self._concurrent_settle or len(self._settle_hooks) == 1:
            failed: Exception | None = None
            for hook in self._settle_hooks:
                try:
                    await hook(ctx)
                except Exception as e:  # as with gather, a failing hook does not stop the others
                    failed = failed or e
            if failed is not None:
                raise failed
        elif self._settle_hooks:
            await asyncio.gather(*(hook(ctx) for hook in self._settle_hooks))


class PolicyAction(Step):
    """The base of a policy action: a step whose `apply` the policy engine calls when its `when:` matches.

    An action with more to do later (measure its saving, record an experiment arm) overrides the
    ordinary hooks; the runtime then puts it in the pipeline right after the policy engine, and its
    hooks act only on requests it applied to."""

    async def apply(self, ctx: RequestContext) -> bool:
        """Change the request (or answer it); True when the action applied."""
        return False
