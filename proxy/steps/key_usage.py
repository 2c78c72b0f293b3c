"""Runtime keys' use: each settled request's cost noted against its key (written to the store about once a
second, off the request path) for the last-used time and all-time spend `/admin/keys` lists."""

from __future__ import annotations

from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.services.runtime_keys import RuntimeKeys
from proxy.store.base import to_nano


class NoteKeyUse(Step):
    """Notes each runtime key's last use and spend (written about once a second, off the request path)."""

    def __init__(self, keys: RuntimeKeys):
        self._keys = keys

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.key_rights is not None:
            self._keys.note_use(ctx.key_id, to_nano(ctx.billed()))
