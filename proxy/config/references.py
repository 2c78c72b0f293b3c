"""Checks of a policy file that cross its sections for what embeds, judges or routes by a learned router:
the embedder each collection, task and learned route names; the router file a route reads; the judge, the
teams and the shadow settings of evaluation. `PolicyFile.reference_errors` runs them; the embedder label
helpers are shared with the loader and the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from proxy.config.evaluation import MEASUREMENT_TEAM, EvaluationConfig
from proxy.config.policies import LearnedRoute, PolicyConfig, TaskConfig
from proxy.config.router_file import RouterFileError, expected_embedder, read_router_file


class PolicySections(Protocol):
    """What these checks read of a policy file (proxy.config.models.PolicyFile, which imports this module: the
    sections are described here rather than imported, so the two never form a circle)."""

    @property
    def models(self) -> dict[str, Any]: ...  # ModelConfig by name
    @property
    def teams(self) -> dict[str, Any]: ...  # TeamConfig by name
    @property
    def tasks(self) -> dict[str, TaskConfig]: ...
    @property
    def policies(self) -> list[PolicyConfig]: ...
    @property
    def collections(self) -> dict[str, Any]: ...  # CollectionConfig by name
    @property
    def retrieval(self) -> Any: ...  # RetrievalConfig
    @property
    def evaluation(self) -> EvaluationConfig | None: ...


LOCAL_DEFAULT_MODEL = "all-MiniLM-L6-v2"  # the packaged model of `embedder: local` (proxy.retrieval.embedders)


def embedder_label(policy: PolicySections, embedder: str) -> str:
    """The model behind an embedder name, as a verifier file records it: `local:<model folder name>`
    or `model:<upstream model>` (vectors of two labels are never comparable)."""
    if embedder == "local":
        local = policy.retrieval.local_model
        return f"local:{local.rstrip('/').rsplit('/', 1)[-1] if local else LOCAL_DEFAULT_MODEL}"
    model = policy.models.get(embedder)
    return f"model:{(model.upstream_model if model else None) or embedder}"


def _embedder_error(policy: PolicySections, embedder: str) -> str | None:
    if embedder == "local":
        return None
    model = policy.models.get(embedder)
    if model is None:
        return f"unknown embedder '{embedder}' (use `local` or a model under models: with mode: embedding)"
    if model.mode != "embedding":
        return f"model '{embedder}' is not an embedding model (set mode: embedding)"
    return None


def _learned_route_errors(
    policy: PolicySections, where: tuple[str | int, ...], learned: LearnedRoute
) -> list[tuple[tuple[str | int, ...], str]]:
    if (msg := _embedder_error(policy, learned.embedder)) is not None:
        return [((*where, "embedder"), msg)]
    if learned.local_model is not None and not (Path(learned.local_model) / "modules.json").is_file():
        msg = f"{learned.local_model} is not a sentence-transformers folder (no modules.json)"
        return [((*where, "local_model"), msg)]
    try:
        router = read_router_file(learned.router)
    except RouterFileError as e:
        return [((*where, "router"), str(e))]
    local = learned.local_model or policy.retrieval.local_model
    expected = expected_embedder(learned.embedder, local, policy.models)
    if not router.embedder.startswith(expected + ":"):
        msg = f"router {learned.router} was fitted on embedder {router.embedder}; this policy embeds with {expected}"
        return [((*where, "embedder"), msg)]
    target = learned.target_quality if learned.target_quality is not None else router.target_quality
    if router.threshold_for(target).threshold is None:
        best = max((p.quality for p in router.curve[1:2]), default=0.0)
        msg = f"on its held-out curve the router keeps {target:.3f} of the quality only by routing nothing"
        return [((*where, "target_quality"), f"{msg} (routing its first 0.5% keeps {best:.3f})")]
    return []


def uses_embedder(policy: PolicySections) -> bool:
    """Whether a policy file needs embeddings: collections, tasks by examples, learned routes."""
    return (
        bool(policy.collections)
        or any(t.examples for t in policy.tasks.values())
        or any(p.route is not None and p.route.learned is not None for p in policy.policies)
    )


def retrieval_errors(policy: PolicySections) -> list[tuple[tuple[str | int, ...], str]]:
    errors: list[tuple[tuple[str | int, ...], str]] = []
    for name, coll in policy.collections.items():
        if (msg := _embedder_error(policy, coll.embedder)) is not None:
            errors.append((("collections", name, "embedder"), msg))
    for name, task in policy.tasks.items():
        if task.examples and (msg := _embedder_error(policy, task.embedder)) is not None:
            errors.append((("tasks", name, "embedder"), msg))
    for i, p in enumerate(policy.policies):
        if p.route is not None and p.route.learned is not None:
            errors += _learned_route_errors(policy, ("policies", i, "route", "learned"), p.route.learned)
        if p.retrieve is None:
            continue
        coll = policy.collections.get(p.retrieve.collection)
        if coll is None:
            msg = f"unknown collection '{p.retrieve.collection}' (define it under collections:)"
            errors.append((("policies", i, "retrieve", "collection"), msg))
        elif p.retrieve.cache and coll.kind != "cache":
            msg = f"collection '{p.retrieve.collection}' is a {coll.kind}: only a `kind: cache` collection is filled"
            errors.append((("policies", i, "retrieve", "cache"), msg))
        verify = p.retrieve.verify
        if verify is not None:
            model = policy.models.get(verify.model)
            if model is None:
                errors.append((("policies", i, "retrieve", "verify", "model"), f"unknown model '{verify.model}'"))
            elif model.mode == "embedding":
                msg = f"model '{verify.model}' is an embedding model; the check needs a chat model"
                errors.append((("policies", i, "retrieve", "verify", "model"), msg))
    return errors


def evaluation_errors(policy: PolicySections) -> list[tuple[tuple[str | int, ...], str]]:
    errors: list[tuple[tuple[str | int, ...], str]] = []
    ev = policy.evaluation
    if MEASUREMENT_TEAM in policy.teams:
        errors.append((("teams", MEASUREMENT_TEAM), "this name is reserved for measurement spend"))
    if ev is not None:
        if ev.judge is not None:
            judge = policy.models.get(ev.judge)
            if judge is None:
                errors.append((("evaluation", "judge"), f"unknown model '{ev.judge}' (define it under models:)"))
            elif judge.mode != "chat":
                errors.append((("evaluation", "judge"), f"model '{ev.judge}' is not a chat model"))
        for i, team in enumerate(ev.exclude_teams):
            if team not in policy.teams:
                errors.append((("evaluation", "exclude_teams", i), f"unknown team '{team}'"))
    for name, team in policy.teams.items():
        if team.retain_prompts is None:
            continue
        where = ("teams", name, "retain_prompts")
        if ev is None or not any(p.shadow for p in policy.policies):
            msg = "keeps the prompts of judged shadow samples: it needs `evaluation:` and a policy with `shadow:`"
            errors.append((where, msg))
        elif name in ev.exclude_teams:
            errors.append((where, "the team is in evaluation.exclude_teams: it is never shadowed, nothing to keep"))
    for i, p in enumerate(policy.policies):
        if p.shadow is None:
            continue
        if ev is None:
            msg = "shadow evaluation needs an `evaluation:` block (its measurement budget, queue and judge)"
            errors.append((("policies", i, "shadow"), msg))
        elif p.shadow.compare == "judge" and ev.judge is None:
            msg = "compare: judge needs evaluation.judge: MODEL (or compare: exact | json | number)"
            errors.append((("policies", i, "shadow", "compare"), msg))
    return errors
