"""The labels shadow evaluation leaves behind: for teams that retain prompts (`teams.T.retain_prompts`), each
judged sample of a policy is kept, until its TTL, as a RouteLLM pairwise label `{prompt, winner}` (the
policy's answer is the `weak` one). `GET /admin/shadow/labels` exports them; `router fit --from-store`
fits a learned router from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.config.models import PolicyFile
from proxy.store.base import Store


class NoLabels(Exception):
    """No labels can be read for this policy: the message says why."""


@dataclass(frozen=True)
class RetainedLabels:
    policy: str
    teams: list[str]  # the teams that retain prompts, whose labels were read
    rows: list[dict[str, Any]]  # oldest first, per team


def retaining_teams(policy: PolicyFile) -> list[str]:
    return sorted(name for name, team in policy.teams.items() if team.retain_prompts is not None)


async def retained_labels(policy: PolicyFile, store: Store, name: str) -> RetainedLabels:
    """The unexpired labels of shadowed policy `name`, from every team that retains prompts."""
    shadowed = {p.name for p in policy.policies if p.shadow is not None}
    if name not in shadowed:
        known = ", ".join(sorted(shadowed)) or "none"
        raise NoLabels(f"policy '{name}' is not a shadowed policy of this policy file (shadowed: {known})")
    teams = retaining_teams(policy)
    if not teams:
        raise NoLabels("no team retains prompts: set teams.TEAM.retain_prompts: {ttl: 7d} to keep labels")
    rows: list[dict[str, Any]] = []
    for team in teams:
        for raw in await store.labels(team, name):
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # not one of ours: never fit on it
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "winner" in row:
                rows.append({**row, "team": team})
    return RetainedLabels(name, teams, rows)


def labels_jsonl(labels: RetainedLabels) -> bytes:
    """One label a line: what `router fit --labels FILE` reads."""
    return b"".join(orjson.dumps(row) + b"\n" for row in labels.rows)
