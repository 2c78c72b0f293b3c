"""Pydantic models of `tasks:` and `policies:`: a `when:` matcher and exactly one action per policy.

Adding an action: a config class here, a field on PolicyConfig, and a step module in proxy/steps/
registered in proxy/steps/actions.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.config.evaluation import ShadowConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    """A named request class: by regex patterns over the user's text, or by similarity to examples."""

    patterns: list[str] = []
    examples: list[str] = []
    min_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.8
    embedder: str = "local"  # `local` (in-process) or a `models:` entry with mode: embedding

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, p in enumerate(patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {i} does not compile: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _has_a_rule(self) -> TaskConfig:
        if not self.patterns and not self.examples:
            raise ValueError("a task needs `patterns` or `examples`")
        return self


class TokenRange(_Strict):
    min: Annotated[int, Field(ge=0)] | None = None
    max: Annotated[int, Field(ge=0)] | None = None


class WhenConfig(_Strict):
    """All given conditions must hold (AND); an empty `when` matches every request."""

    teams: list[str] | None = None
    models: list[str] | None = None  # globs over the model as it stands when the policy is evaluated
    endpoints: list[Literal["chat", "completions", "embeddings", "responses", "messages"]] | None = None
    task: str | None = None
    prompt_tokens: TokenRange | None = None
    tools: bool | None = None
    response_format: bool | None = None
    stream: bool | None = None
    headers: dict[str, str] | None = None  # request header equals (names case-insensitive)
    budget_used_above: Annotated[float, Field(ge=0, le=1)] | None = None


class RejectAction(_Strict):
    message: str = "This request is not allowed by policy."
    status: Literal[400, 403, 422, 429] = 403


class FieldRule(_Strict):
    """For one request field: a value to use when absent, and/or bounds to clamp to."""

    default: Any = None
    min: float | None = None
    max: float | None = None
    value: Any = None  # force this value


class SetAction(_Strict):
    fields: dict[str, FieldRule]

    @model_validator(mode="before")
    @classmethod
    def _fields_inline(cls, data: Any) -> Any:
        # `set: {max_tokens: {max: 512}}` is sugar for `set: {fields: {max_tokens: {max: 512}}}`.
        if isinstance(data, dict) and "fields" not in data:
            return {"fields": data}
        return data

    @field_validator("fields")
    @classmethod
    def _no_routing_fields(cls, fields: dict[str, FieldRule]) -> dict[str, FieldRule]:
        if "model" in fields:
            raise ValueError("use a `route` action to change the model")
        return fields


class PressureStep(_Strict):
    """Downgrade to `to` once the team has used more than `above` of its budget."""

    above: Annotated[float, Field(ge=0, le=1)]
    to: str


class LearnedRoute(_Strict):
    """Route only when a learned router (a file from `llm-numbers-proxy router fit`) predicts the cheap
    model's answer is good enough for this prompt."""

    router: Annotated[str, Field(min_length=1)]  # path of the router file, relative to the policy file
    # The quality to keep against the requested model: the threshold is read off the file's held-out
    # curve (default: the target the router was fitted for).
    target_quality: Annotated[float, Field(gt=0, le=1)] | None = None
    embedder: str = "local"  # must be the embedder the router was fitted on
    # With `embedder: local`: this router's own in-process model, a sentence-transformers folder relative to
    # the policy file (e.g. from `llm-numbers-proxy router embedder`); default: `retrieval.local_model`.
    local_model: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _local_model_is_local(self) -> LearnedRoute:
        if self.local_model is not None and self.embedder != "local":
            raise ValueError("`local_model` is the folder of `embedder: local`; this route embeds with a model")
        return self

    @property
    def embedder_key(self) -> str:
        """The runtime's name for this route's embedder: `local`, or `local@FOLDER` for its own local model."""
        return self.embedder if self.local_model is None else f"local@{self.local_model}"


class RouteAction(_Strict):
    to: str | None = None
    # Route only when the requested model costs at least this many times the target for this request.
    min_cost_multiple: Annotated[float, Field(gt=0)] | None = None
    # A downgrade chain by budget pressure: the step with the highest `above` that is exceeded wins
    # (over `to`), e.g. [{above: 0.8, to: gpt-4o-mini}, {above: 0.95, to: local-llm}].
    on_budget_pressure: list[PressureStep] = []
    # The output length assumed when weighing prices (capped by the request's own max_tokens).
    expected_output_tokens: Annotated[int, Field(ge=0)] = 256
    # If the cheap model fails after its retries and fallbacks, try the model the client asked for.
    fallback_to_requested: bool = False
    learned: LearnedRoute | None = None

    @model_validator(mode="after")
    def _has_a_target(self) -> RouteAction:
        if self.to is None and not self.on_budget_pressure:
            raise ValueError("a route needs `to` or `on_budget_pressure`")
        if self.learned is not None and self.to is None:
            raise ValueError("a learned route needs `to`: the cheap model the router was fitted for")
        return self

    def targets(self) -> list[str]:
        return ([self.to] if self.to else []) + [s.to for s in self.on_budget_pressure]


class ConciseAction(_Strict):
    """Ask for shorter answers, and measure what that saves with a hold-out arm left untouched."""

    instruction: Annotated[str, Field(min_length=1)] = "Be concise."
    # system: a new system message first; append_system: appended to the first system message (a new
    # one when there is none); user: appended to the last user message.
    placement: Literal["system", "append_system", "user"] = "system"
    # Fraction of requests left untouched (chosen by a hash of the request id) to observe the saving.
    holdout: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # default max_tokens for treated requests
    skip_json: bool = True  # leave requests with a response_format alone
    skip_tools: bool = True  # leave requests with tools alone
    # A client may opt out by sending this header with any non-empty value (none: no opt-out).
    opt_out_header: str | None = "x-llm-proxy-no-concise"
    # Samples each arm needs before the realised saving is used for saved-USD figures.
    min_samples: Annotated[int, Field(ge=2)] = 30


class VerifyConfig(_Strict):
    """Ask a cheap chat model whether a borderline hit's stored question answers the new one."""

    model: Annotated[str, Field(min_length=1)]
    # Hits with similarity in [low, high) are checked; at or above `high` they need no check.
    band: tuple[Annotated[float, Field(ge=-1, le=1)], Annotated[float, Field(ge=-1, le=1)]] = (0.90, 0.96)
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 3.0

    @model_validator(mode="after")
    def _band_ordered(self) -> VerifyConfig:
        if self.band[0] >= self.band[1]:
            raise ValueError("band must be [low, high] with low < high")
        return self


class RetrieveAction(_Strict):
    """Answer from a `collections:` entry (knowledge base or semantic cache) instead of generating."""

    collection: str
    # Cosine similarity of the best entry; the default is calibrated for all-MiniLM-L6-v2 on STS-B
    # (bench/RESULTS.md): recalibrate with `llm-numbers-proxy kb calibrate` for another embedder.
    min_similarity: Annotated[float, Field(ge=-1, le=1)] = 0.96
    # The best entry must beat the best entry with a different answer by this much.
    min_margin: Annotated[float, Field(ge=0, le=2)] = 0.02
    # Answer from retrieval only when generating would cost at least this many times the lookup.
    min_cost_multiple: Annotated[float, Field(gt=0)] | None = None
    # Numbers, quoted strings, code identifiers and proper names must agree between query and entry.
    decisive_tokens: bool = True
    # `match`: the system prompt is part of the conversation an entry must share; `ignore`: it is not.
    system_prompt: Literal["match", "ignore"] = "match"
    # Store upstream answers to the requests this policy matches (a `kind: cache` collection).
    cache: bool = False
    # The answer length assumed for min_cost_multiple before an entry is found.
    expected_output_tokens: Annotated[int, Field(ge=0)] = 256
    # A learned pair verifier (`llm-numbers-proxy kb calibrate --write-verifier FILE`), relative to the
    # policy file: a hit also needs its probability; `min_similarity`/`min_margin` then apply only when given.
    verifier: Annotated[str, Field(min_length=1)] | None = None
    # An error bound: each entry answers only at similarities its verified outcomes (feedback, exact
    # re-generations) show to be right, starting conservative; a collection whose realised error's
    # lower bound exceeds this stops answering until reload. Outcomes are shared through the store.
    max_error: Annotated[float, Field(gt=0, lt=0.5)] | None = None
    # An LLM check of borderline hits; its cost is the lookup's, and part of min_cost_multiple's.
    verify: VerifyConfig | None = None

    def explicit(self, field: str) -> bool:
        return field in self.model_fields_set


_NOT_ACTIONS = frozenset({"name", "when", "shadow", "min_quality", "min_samples"})
COST_ACTIONS = frozenset({"route", "concise", "retrieve"})  # the actions shadow evaluation measures


class PolicyConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    when: WhenConfig = WhenConfig()
    reject: RejectAction | None = None
    set: SetAction | None = None
    route: RouteAction | None = None
    retrieve: RetrieveAction | None = None
    concise: ConciseAction | None = None
    # Shadow evaluation of a cost policy (route, concise, retrieve): what it keeps of the answer's quality.
    shadow: ShadowConfig | None = None
    # The quality floor: once the upper end of the measured quality-retained interval (Wilson 95%) is
    # below this with at least `min_samples` judged pairs, the policy stops acting until a reload.
    min_quality: Annotated[float, Field(gt=0, le=1)] | None = None
    min_samples: Annotated[int, Field(ge=1)] = 30

    @model_validator(mode="after")
    def _exactly_one_action(self) -> PolicyConfig:
        actions = [name for name in self.action_names() if getattr(self, name) is not None]
        if len(actions) != 1:
            found = ", ".join(actions) or "none"
            raise ValueError(f"a policy needs exactly one action of {', '.join(self.action_names())} (found {found})")
        return self

    @model_validator(mode="after")
    def _shadow_on_a_cost_policy(self) -> PolicyConfig:
        action = next((n for n in self.action_names() if getattr(self, n) is not None), None)
        if self.shadow is not None and action not in COST_ACTIONS:
            raise ValueError(f"shadow evaluation measures cost policies (route, concise, retrieve), not {action}")
        if self.min_quality is not None and self.shadow is None:
            raise ValueError("min_quality needs shadow: {rate: ...}: the floor is read off shadow judgements")
        return self

    @classmethod
    def action_names(cls) -> list[str]:
        return [n for n in cls.model_fields if n not in _NOT_ACTIONS]

    @property
    def action(self) -> str:
        return next(n for n in self.action_names() if getattr(self, n) is not None)
