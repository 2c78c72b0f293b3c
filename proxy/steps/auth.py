"""Authentication: virtual keys (stored hashed) resolve to a team.

Keys arrive as `Authorization: Bearer <key>` or `api-key: <key>` (Azure style). The presented key
is hashed with SHA-256 and looked up; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from proxy.config.models import TeamConfig
from proxy.errors import Unauthorized
from proxy.pipeline import RequestContext

log = logging.getLogger("llm_proxy.auth")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get("api-key")
    return key.strip() if key else None


class KeyRing:
    """Hashed virtual keys → team name."""

    def __init__(self, teams: dict[str, TeamConfig]):
        self._team_of: dict[str, tuple[str, str]] = {}
        plaintext = 0
        for team, cfg in teams.items():
            for k in cfg.keys:
                if not k.startswith("sha256:"):
                    plaintext += 1
                    k = hash_key(k)
                self._team_of[k] = (k, team)
        self.plaintext_keys = plaintext

    def team_for(self, key: str) -> tuple[str, str] | None:
        """(team, key fingerprint) for a presented key, or None.

        Only SHA-256 digests are ever compared, so what a timing side channel could reveal is a digest
        prefix, which does not help find a key; the final check is constant-time all the same.
        """
        digest = hash_key(key)
        found = self._team_of.get(digest)
        if found is None:
            return None
        stored, team = found
        if not hmac.compare_digest(stored, digest):
            return None
        return team, digest[7:19]

    def __len__(self) -> int:
        return len(self._team_of)


class Authenticate:
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
        if found is None:
            raise Unauthorized("Invalid API key.")
        ctx.team, ctx.key_id = found
