"""Which configured models each team may use (its `models:` globs, expanded once per policy file)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from proxy.config.models import PolicyFile


def allowed_models(policy: PolicyFile) -> dict[str, frozenset[str]]:
    """Team → the configured model names its `models:` globs admit."""
    return {
        team: frozenset(m for m in policy.models if any(fnmatchcase(m, pattern) for pattern in cfg.models))
        for team, cfg in policy.teams.items()
    }
