"""The `set` action: default, force or clamp request fields (e.g. cap `max_tokens`)."""

from __future__ import annotations

from typing import Any

from proxy.config.policies import FieldRule, SetAction
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import PolicyAction


def _apply_rule(value: Any, rule: FieldRule) -> Any:
    if rule.value is not None:
        return rule.value
    if value is None:
        return rule.default
    if isinstance(value, int | float) and not isinstance(value, bool):
        if rule.max is not None and value > rule.max:
            value = type(value)(rule.max)
        if rule.min is not None and value < rule.min:
            value = type(value)(rule.min)
    return value


class SetFields(PolicyAction):
    """Default, force or clamp request fields."""

    def __init__(self, cfg: SetAction, name: str, _deps: object):
        self._fields = cfg.fields

    async def apply(self, ctx: RequestContext) -> bool:
        changed = False
        body = ctx.body
        for field, rule in self._fields.items():
            old = body.get(field)
            new = _apply_rule(old, rule)
            if new is not None and new != old:
                body[field] = new
                changed = True
        return changed
