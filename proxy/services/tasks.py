"""Named request classes (`tasks:`): regex patterns over the user's text, or examples matched through
an embedder."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proxy.config.policies import TaskConfig

if TYPE_CHECKING:
    from proxy.pipeline.context import RequestContext

ExampleMatcher = Callable[["RequestContext", str], Awaitable[bool]]


class TaskClassifier:
    """Named request classes: regex patterns over the user's text; examples through an embedder."""

    def __init__(self, tasks: dict[str, TaskConfig], by_examples: ExampleMatcher | None = None):
        self._patterns = {name: [re.compile(p) for p in t.patterns] for name, t in tasks.items()}
        self._has_examples = {name for name, t in tasks.items() if t.examples}
        self._by_examples = by_examples

    async def matches(self, ctx: RequestContext, task: str) -> bool:
        text = ctx.user_text()
        if any(p.search(text) for p in self._patterns.get(task, ())):
            return True
        if task in self._has_examples and self._by_examples is not None:
            return await self._by_examples(ctx, task)
        return False
