"""Virtual keys: where a client presents one, its hashed form, and the ring of hashed keys → team.

Keys arrive as `Authorization: Bearer <key>`, `api-key: <key>` (Azure style) or `x-api-key: <key>`
(Anthropic's SDKs; `ANTHROPIC_AUTH_TOKEN` sends a Bearer token). The presented key
is hashed with SHA-256 and looked up; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from proxy.config.models import TeamConfig
from proxy.errors import StoreDown, Unauthorized
from proxy.services.runtime_keys import KEY_PREFIX, KeyRights, RuntimeKeys
from proxy.store.base import StoreUnavailable


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get("api-key") or headers.get("x-api-key")
    return key.strip() if key else None


class KeyRing:
    """Hashed virtual keys → team name: the policy file's, and (with Redis) the runtime keys."""

    def __init__(self, teams: dict[str, TeamConfig], runtime: RuntimeKeys | None = None):
        self._team_names = frozenset(teams)  # names only: the team configs hold the file's plaintext keys
        self.runtime = runtime
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

    async def runtime_key(self, key: str) -> tuple[str, str, KeyRights] | None:
        """(team, key id, the key's own rights) for a runtime key, None for a key that is none.

        A revoked, expired or rotated-out key, or one whose team left the policy file, is refused by name.
        """
        if self.runtime is None or not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        try:
            found = await self.runtime.find(digest)
        except StoreUnavailable as e:
            raise StoreDown("Cannot check this API key: the shared store is unavailable.") from e
        if found is None:
            return None
        record, until = found
        now = time.time()
        if record.revoked_at is not None:
            raise Unauthorized("This API key was revoked.", code="key_revoked")
        if until is not None and now >= until:
            raise Unauthorized("This API key was replaced by a rotation; use the new key.", code="key_rotated")
        if record.expires_at is not None and now >= record.expires_at:
            raise Unauthorized("This API key has expired.", code="key_expired")
        if record.team not in self._team_names:
            raise Unauthorized(f"This API key's team '{record.team}' is no longer in the policy file.")
        self.runtime.note_use(record.id, 0)
        return record.team, record.id, record.rights

    def __len__(self) -> int:
        return len(self._team_of)
