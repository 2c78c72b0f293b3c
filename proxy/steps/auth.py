"""Authentication: the first step; who is calling (a virtual key → its team), or 401."""

from __future__ import annotations

from proxy.errors import Unauthorized
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.services.keyring import KeyRing, presented_key


class Authenticate(Step):
    """First step: who is calling. Missing or unknown key → 401."""

    def __init__(self, keyring: KeyRing):
        self.keyring = keyring

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.dry_run and ctx.team is not None:  # explain/replay for a named team
            return
        key = presented_key(ctx.headers)
        if key is None:
            raise Unauthorized(
                "Missing API key: send it as 'Authorization: Bearer <key>' or an 'api-key' header.",
                code="missing_api_key",
            )
        found = self.keyring.team_for(key)
        if found is not None:
            ctx.team, ctx.key_id = found
            return
        granted = await self.keyring.runtime_key(key)  # a key made through /admin/keys (None: no such key)
        if granted is None:
            raise Unauthorized("Invalid API key.")
        ctx.team, ctx.key_id, ctx.key_rights = granted
