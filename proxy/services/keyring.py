"""Virtual keys: where a client presents one, its hashed form, and the ring of hashed keys → team.

Keys arrive as `Authorization: Bearer <key>`, `api-key: <key>` (Azure style) or `x-api-key: <key>`
(Anthropic's SDKs; `ANTHROPIC_AUTH_TOKEN` sends a Bearer token). The presented key
is hashed with SHA-256 and looked up; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.config.models import TeamConfig


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
