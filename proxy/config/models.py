"""Pydantic models of the policy YAML: the platform team's whole interface.

Every model forbids unknown keys so a typo in the policy file is an error, not a silent no-op.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from fnmatch import fnmatchcase
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.config.capacity import BYTES_PER_PARAM, ModelMemory
from proxy.config.evaluation import EvaluationConfig, RetainPrompts
from proxy.config.policies import PolicyConfig, RouteAction, TaskConfig
from proxy.config.references import evaluation_errors, retrieval_errors

_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PerMtok = Annotated[float, Field(ge=0)]


def _cache_read_errors(price: PriceConfig | PriceTierConfig) -> None:
    if (
        price.cached_input_per_mtok is not None
        and price.input_per_mtok is not None
        and price.cached_input_per_mtok > price.input_per_mtok
    ):
        # Every provider bills a cache read below a fresh token; more is a swapped pair of fields.
        raise ValueError("cached_input_per_mtok is above input_per_mtok: a cache read never costs more")


class PriceTierConfig(_Strict):
    """Prices for every token of a request whose prompt is longer than `above_input_tokens` (e.g. Gemini and
    Claude above 200k); a field left out keeps the model's flat price."""

    above_input_tokens: Annotated[int, Field(ge=1)]
    input_per_mtok: PerMtok | None = None
    output_per_mtok: PerMtok | None = None
    cached_input_per_mtok: PerMtok | None = None
    cache_write_per_mtok: PerMtok | None = None
    cache_write_1h_per_mtok: PerMtok | None = None
    reasoning_per_mtok: PerMtok | None = None

    @model_validator(mode="after")
    def _cache_read_below_input(self) -> PriceTierConfig:
        _cache_read_errors(self)
        return self


class PriceConfig(_Strict):
    """USD per million tokens; overrides the packaged price book for one model. A cache read, cache write or
    reasoning price left out is billed as input (reads, writes) or output (reasoning); a 1-hour cache write
    left out as a 5-minute one."""

    input_per_mtok: PerMtok
    output_per_mtok: PerMtok = 0.0
    cached_input_per_mtok: PerMtok | None = None  # prompt tokens read from the provider's cache
    cache_write_per_mtok: PerMtok | None = None  # prompt tokens written to it (Anthropic: the 5-minute TTL)
    cache_write_1h_per_mtok: PerMtok | None = None  # written with Anthropic's 1-hour TTL
    reasoning_per_mtok: PerMtok | None = None  # reasoning tokens, when priced apart from output
    tiers: list[PriceTierConfig] = []

    @model_validator(mode="after")
    def _tiers_ascend(self) -> PriceConfig:
        _cache_read_errors(self)
        thresholds = [t.above_input_tokens for t in self.tiers]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tiers must have strictly ascending above_input_tokens")
        return self


class RetryConfig(_Strict):
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    max_total_s: Annotated[float, Field(gt=0)] = 30.0
    initial_backoff_s: Annotated[float, Field(ge=0)] = 0.2
    max_backoff_s: Annotated[float, Field(ge=0)] = 8.0
    # A Retry-After above this is not waited for: the next fallback is tried instead.
    max_retry_after_s: Annotated[float, Field(ge=0)] = 10.0


class BatchingConfig(_Strict):
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_wait_ms: Annotated[float, Field(ge=0)] = 10.0
    max_queue: Annotated[int, Field(ge=1)] = 1024
    max_concurrent_batches: Annotated[int, Field(ge=1)] = 1
    mode: Literal["embeddings", "completions", "batch_endpoint"] = "completions"


# A self-hosted model's serving facts ------------------------------------------------------------------
# `hardware`, `params_b`, `dtype` and `kv_mb_per_token` on a model (proxy/config/capacity.py has the arithmetic).


class HardwareConfig(_Strict):
    """The GPUs a self-hosted model is served on."""

    gpu_memory_gb: Annotated[float, Field(gt=0, le=2048)]  # per GPU (A10G 24, A100 40/80, H100 80, H200 141)
    gpus: Annotated[int, Field(ge=1, le=64)] = 1  # the model is sharded over this many (tensor parallel)
    # Fraction of GPU memory kept free: activations, the CUDA context, fragmentation.
    memory_margin: Annotated[float, Field(ge=0, le=0.9)] = 0.1


def _serving_errors(name: str, model: ModelConfig) -> list[tuple[tuple[str | int, ...], str]]:
    where = ("models", name)
    facts = [f for f in ("dtype", "kv_mb_per_token") if f in model.model_fields_set]
    if model.hardware is not None and model.params_b is None:
        return [((*where, "hardware"), "needs params_b: the model's parameters, in billions")]
    if model.params_b is not None and model.hardware is None:
        return [((*where, "params_b"), "needs hardware: {gpu_memory_gb: GB per GPU}")]
    if model.hardware is None:
        return [((*where, f), "has no effect without hardware and params_b") for f in facts]
    memory = ModelMemory.of(model)
    assert memory is not None
    if memory.weights_gb > memory.gpu_memory_gb:
        msg = (
            f"the weights alone ({model.params_b:g}B parameters at {model.dtype}: {memory.weights_gb:g} GB) exceed "
            f"the GPU memory ({memory.gpu_memory_gb:g} GB): quantise (dtype), or add GPUs (hardware.gpus)"
        )
        return [((*where, "params_b"), msg)]
    if memory.token_budget < 1:
        msg = (
            f"the weights ({memory.weights_gb:g} GB) leave no memory for requests in {memory.usable_gb:g} GB "
            f"(GPU memory less the {memory.margin:.0%} margin)"
        )
        return [((*where, "hardware"), msg)]
    if model.max_output_tokens is not None and model.max_output_tokens > memory.token_budget:
        msg = (
            f"max_output_tokens {model.max_output_tokens} cannot fit: the model holds {memory.token_budget} tokens "
            f"in flight ({memory.budget_mb:,.0f} MB at {memory.kv_mb_per_token:g} MB per token)"
        )
        return [((*where, "max_output_tokens"), msg)]
    return []


def _serving_warnings(name: str, model: ModelConfig) -> list[tuple[tuple[str | int, ...], str]]:
    memory = ModelMemory.of(model)
    window = model.max_input_tokens
    if memory is None or window is None or memory.token_budget < 1:
        return []
    if window > memory.token_budget:
        msg = (
            f"one request at the context window ({window} tokens) cannot fit the {memory.token_budget} tokens the "
            f"model holds in flight ({memory.budget_mb:,.0f} MB): longer requests get 400"
        )
        return [(("models", name, "max_input_tokens"), msg)]
    if model.batching is None:
        return []
    size = model.batching.max_batch_size * model.batching.max_concurrent_batches
    if size * window > memory.token_budget:
        msg = (
            f"{size} requests at the context window ({window} tokens) need {memory.mb(size * window):,.0f} MB; "
            f"{memory.budget_mb:,.0f} MB is left after the weights: at full context about "
            f"{memory.token_budget // window} fit at once, so memory, not max_batch_size, bounds the batch"
        )
        return [(("models", name, "batching", "max_batch_size"), msg)]
    return []


Provider = Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9_\-]+$")]


class ModelConfig(_Strict):
    provider: Provider = "openai"
    api_base: str | None = None
    api_key: str | None = None
    upstream_model: str | None = None
    mode: Literal["chat", "completion", "embedding"] = "chat"
    # `responses`: the upstream serves OpenAI's Responses API (OpenAI, recent vLLM), so /v1/responses is
    # forwarded to it as is; `chat`: it serves only Chat Completions and /v1/responses is translated.
    api: Literal["chat", "responses"] = "chat"
    price: PriceConfig | None = None
    max_input_tokens: Annotated[int, Field(ge=1)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    tokenizer: str | None = None
    fallbacks: list[str] = []
    # Models with a larger context window: a prompt too long for this one goes to the first that fits
    # (instead of a 400 context_length_exceeded).
    context_window_fallbacks: list[str] = []
    retries: RetryConfig | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # Ask OpenAI-compatible upstreams for usage in streams (stripped again when the client
    # did not ask), so streamed spend is exact rather than re-counted.
    stream_usage: bool = True
    headers: dict[str, str] = {}
    batching: BatchingConfig | None = None
    # Serving facts of a self-hosted model (both hardware and params_b, or neither): bound batches by memory.
    hardware: HardwareConfig | None = None
    params_b: Annotated[float, Field(gt=0, le=10_000)] | None = None  # billions of parameters
    dtype: str = "fp16"  # the weights' dtype: fp32 | fp16 | bf16 | int8 | int4
    kv_mb_per_token: Annotated[float, Field(gt=0, le=1000)] | None = None  # default: from params_b and dtype

    @field_validator("dtype")
    @classmethod
    def _dtype_is_known(cls, v: str) -> str:
        if v not in BYTES_PER_PARAM:
            raise ValueError(f"unknown dtype '{v}' (known: {', '.join(BYTES_PER_PARAM)})")
        return v

    @field_validator("api_base")
    @classmethod
    def _api_base_is_http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError("api_base must start with http:// or https://")
        return v.rstrip("/") if v else v


class BudgetConfig(_Strict):
    """Spend ceiling in USD per period; enforced by reserving the worst case before each call."""

    usd: Annotated[float, Field(ge=0)]
    period: Literal["day", "week", "month", "none"] = "month"
    on_exceed: Literal["reject", "downgrade"] = "reject"
    downgrade_to: str | None = None

    @model_validator(mode="after")
    def _downgrade_has_target(self) -> BudgetConfig:
        if self.on_exceed == "downgrade" and not self.downgrade_to:
            raise ValueError("on_exceed: downgrade needs downgrade_to: MODEL")
        return self


class LimitsConfig(_Strict):
    """Requests and tokens per minute (sliding window), shared by every replica through the store."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None


class TeamConfig(_Strict):
    keys: list[str] = []
    models: list[str] = ["*"]
    budget: BudgetConfig | None = None
    key_budget: BudgetConfig | None = None  # the same ceiling for each of the team's keys separately
    limits: LimitsConfig | None = None
    key_limits: LimitsConfig | None = None  # per key
    # Keep the prompt text of this team's judged shadow samples for `ttl` (labels for `router fit --from-store`).
    retain_prompts: RetainPrompts | None = None

    @field_validator("keys")
    @classmethod
    def _keys_hashed_or_plain(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if k.startswith("sha256:") and not _KEY_HASH.match(k):
                raise ValueError("a hashed key must be 'sha256:' followed by 64 lowercase hex digits")
            if not k:
                raise ValueError("empty key")
        return keys


class ServerConfig(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # Used when a request sets no max_tokens and the model's max output is unknown.
    default_max_output_tokens: Annotated[int, Field(ge=1)] = 4096
    watch_config: bool = True  # reload the policy file when it changes on disk
    # How long a Responses API response the proxy made (for a Chat Completions upstream) is kept for
    # `previous_response_id` and `GET /v1/responses/{id}`: a day by default, 30 days at most.
    responses_ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0


class LogConfig(_Strict):
    requests: str | None = None  # JSONL path of the request log (replayable traffic); none when unset
    include_prompts: bool = False  # write messages/prompt text too (off: token counts only)


class StoreConfig(_Strict):
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_:\-]+$")] = "llmp"
    on_failure: Literal["fail_open", "fail_closed"] = "fail_open"


def _batching_errors(name: str, model: ModelConfig) -> list[tuple[tuple[str | int, ...], str]]:
    batching = model.batching
    if batching is None:
        return []
    where = ("models", name, "batching")
    if model.provider != "openai":
        # litellm translates one request at a time; only an OpenAI-compatible upstream takes merged calls.
        return [(where, f"provider '{model.provider}' cannot batch: batching needs provider: openai")]
    if (batching.mode == "embeddings") != (model.mode == "embedding"):
        need = "mode: embedding" if batching.mode == "embeddings" else "mode: chat or completion"
        msg = f"batching mode '{batching.mode}' does not fit the model's mode '{model.mode}' ({need})"
        return [((*where, "mode"), msg)]
    return []


CollectionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


class CollectionConfig(_Strict):
    """A retrieval collection: a curated knowledge base (`kb`) or a semantic cache (`cache`)."""

    kind: Literal["kb", "cache"]
    embedder: str = "local"  # `local` (in-process) or a `models:` entry with mode: embedding
    ttl_s: Annotated[float, Field(gt=0)] | None = None  # default entry lifetime (cache: one day; kb: none)
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000  # beyond it the oldest are evicted
    shared: bool = False  # cache: serve an entry to every team, not only the team whose request filled it

    @property
    def entry_ttl_s(self) -> float | None:
        return self.ttl_s if self.ttl_s is not None or self.kind == "kb" else 86400.0


class RetrievalConfig(_Strict):
    """Settings of the embedders behind `collections:` and task examples."""

    local_model: str | None = None  # a sentence-transformers folder; default: the packaged all-MiniLM-L6-v2
    local_price: PriceConfig | None = None  # a notional price of in-process embeddings (free by default)
    # Torch threads of the local model. One by default: a short query takes ~15 ms on one core, while
    # two OpenMP threads on a busy 2-core machine spin against each other (hundreds of ms).
    local_threads: Annotated[int, Field(ge=1, le=256)] = 1
    embed_timeout_s: Annotated[float, Field(gt=0)] = 5.0  # slower than this, retrieval is skipped for the request


@cache
def _litellm_providers() -> frozenset[str]:
    """The providers litellm can call. litellm is imported only for a policy that names a provider
    other than `openai` or `anthropic`, which would import it at start-up anyway."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the packaged map: no fetch at import
    litellm = importlib.import_module("litellm")
    return frozenset(str(getattr(p, "value", p)) for p in litellm.provider_list)


def _provider_errors(models: dict[str, ModelConfig]) -> list[tuple[tuple[str | int, ...], str]]:
    errors: list[tuple[tuple[str | int, ...], str]] = []
    # openai and anthropic are served by the proxy's own pass-throughs: checking them needs no litellm.
    others = {name: m.provider for name, m in models.items() if m.provider not in ("openai", "anthropic")}
    if not others:
        return errors
    known = _litellm_providers()
    for name, provider in others.items():
        if provider not in known:
            close = difflib.get_close_matches(provider, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see litellm's provider list)"
            errors.append((("models", name, "provider"), f"unknown provider '{provider}'{hint}"))
    return errors


class PolicyFile(_Strict):
    version: Literal[1] = 1
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    retries: RetryConfig = RetryConfig()
    models: dict[str, ModelConfig]
    teams: dict[str, TeamConfig] = {}
    tasks: dict[str, TaskConfig] = {}
    policies: list[PolicyConfig] = []
    log: LogConfig = LogConfig()
    collections: dict[CollectionName, CollectionConfig] = {}
    retrieval: RetrievalConfig = RetrievalConfig()
    evaluation: EvaluationConfig | None = None  # shadow evaluation (off unless set and a policy has `shadow:`)

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field checks pydantic cannot express per field: (path, message) pairs."""
        errors = _provider_errors(self.models)
        for name, model in self.models.items():
            if re.search(r"[\x00-\x1f\x7f]", name):
                errors.append((("models", name), "a model name must not contain control characters"))
            for i, fb in enumerate(model.fallbacks):
                if fb not in self.models:
                    errors.append((("models", name, "fallbacks", i), f"unknown model '{fb}'"))
                elif fb == name:
                    errors.append((("models", name, "fallbacks", i), "a model cannot fall back to itself"))
            errors += self._window_fallback_errors(name, model)
            errors += _batching_errors(name, model)
            errors += _serving_errors(name, model)
            if model.api == "responses" and (model.provider != "openai" or model.mode != "chat"):
                msg = "api: responses needs provider: openai and mode: chat (other upstreams are translated)"
                errors.append((("models", name, "api"), msg))
        owner: dict[str, str] = {}
        for name, team in self.teams.items():
            for i, m in enumerate(team.models):
                if not any(c in m for c in "*?[") and m not in self.models:
                    errors.append((("teams", name, "models", i), f"unknown model '{m}'"))
            for i, k in enumerate(team.keys):
                if k in owner:
                    errors.append((("teams", name, "keys", i), f"key also belongs to team '{owner[k]}'"))
                owner[k] = name
        errors += self._policy_errors()
        errors += retrieval_errors(self)
        errors += evaluation_errors(self)
        return errors

    def _context_window(self, name: str) -> int | None:
        """The model's context window: set in the policy file or from litellm's packaged map."""
        from proxy.config.price_map import context_window  # reads the map: only when a fallback needs it

        cfg = self.models[name]
        return (
            cfg.max_input_tokens
            or context_window(cfg.upstream_model or name, cfg.provider)
            or context_window(name, cfg.provider)
        )

    def _window_fallback_errors(self, name: str, model: ModelConfig) -> list[tuple[tuple[str | int, ...], str]]:
        if not model.context_window_fallbacks:
            return []
        where = ("models", name, "context_window_fallbacks")
        window = self._context_window(name)
        if window is None:
            return [(where, f"needs the context window of '{name}': set models.{name}.max_input_tokens")]
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for i, fb in enumerate(model.context_window_fallbacks):
            if fb not in self.models:
                errors.append(((*where, i), f"unknown model '{fb}'"))
                continue
            if fb == name:
                errors.append(((*where, i), "a model cannot fall back to itself"))
                continue
            if self.models[fb].mode != model.mode:
                errors.append(((*where, i), f"'{fb}' has mode {self.models[fb].mode}, '{name}' has mode {model.mode}"))
                continue
            fb_window = self._context_window(fb)
            if fb_window is None:
                msg = f"the context window of '{fb}' is unknown: set models.{fb}.max_input_tokens"
                errors.append(((*where, i), msg))
            elif fb_window <= window:
                msg = f"'{fb}' has a context window of {fb_window} tokens, not larger than the {window} of '{name}'"
                errors.append(((*where, i), msg))
        return errors

    def capacity_warnings(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What `check` warns about but serves: batches that memory, not their size, will bound."""
        return [w for name, model in self.models.items() for w in _serving_warnings(name, model)]

    def warnings(self, interpolated: set[tuple[str | int, ...]]) -> list[tuple[tuple[str | int, ...], str]]:
        """What is allowed but likely a mistake: (path, message) pairs. `interpolated` are the paths whose
        value came from an environment variable."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        for name, model in self.models.items():
            if model.api_key and ("models", name, "api_key") not in interpolated:
                out.append((("models", name, "api_key"), "the key is written in the file: use ${ENV_VAR} instead"))
        for name, team in self.teams.items():
            for i, key in enumerate(team.keys):
                if not key.startswith("sha256:") and ("teams", name, "keys", i) not in interpolated:
                    msg = "a plaintext virtual key: store its hash instead (llm-numbers-proxy hash-key KEY)"
                    out.append((("teams", name, "keys", i), msg))
            for i, glob in enumerate(team.models):
                if any(c in glob for c in "*?[") and not any(fnmatchcase(m, glob) for m in self.models):
                    out.append((("teams", name, "models", i), f"'{glob}' matches no model under models:"))
        return out

    def _route_errors(
        self, where: tuple[str | int, ...], route: RouteAction, teams: list[str] | None
    ) -> list[tuple[tuple[str | int, ...], str]]:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        fields = [("to",)] if route.to else []
        fields += [("on_budget_pressure", i, "to") for i in range(len(route.on_budget_pressure))]
        for field, target in zip(fields, route.targets(), strict=True):
            path = (*where, "route", *field)
            if target not in self.models:
                errors.append((path, f"unknown model '{target}'"))
                continue
            if route.min_cost_multiple is not None and not self._priced(target):
                errors.append((path, f"the price of '{target}' is unknown: set models.{target}.price"))
            for team, cfg in self.teams.items():
                if teams is not None and team not in teams:
                    continue
                if not any(fnmatchcase(target, g) for g in cfg.models):
                    errors.append((path, f"team '{team}' may not use '{target}' (add it to teams.{team}.models)"))
        return errors

    def _priced(self, name: str) -> bool:
        """The model's price is known: set in the policy file or found in litellm's packaged map."""
        from proxy.config.price_map import has_price  # reads the map: only when a route needs a price

        cfg = self.models[name]
        return (
            cfg.price is not None
            or has_price(cfg.upstream_model or name, cfg.provider)
            or has_price(name, cfg.provider)
        )

    def _policy_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for name, team in self.teams.items():
            for field in ("budget", "key_budget"):
                budget = getattr(team, field)
                if budget and budget.downgrade_to and budget.downgrade_to not in self.models:
                    errors.append((("teams", name, field, "downgrade_to"), f"unknown model '{budget.downgrade_to}'"))
        seen: set[str] = set()
        for i, p in enumerate(self.policies):
            where = ("policies", i)
            if p.name in seen:
                errors.append(((*where, "name"), f"duplicate policy name '{p.name}'"))
            seen.add(p.name)
            for j, team in enumerate(p.when.teams or ()):
                if team not in self.teams:
                    errors.append(((*where, "when", "teams", j), f"unknown team '{team}'"))
            if p.when.task is not None and p.when.task not in self.tasks:
                errors.append(((*where, "when", "task"), f"unknown task '{p.when.task}' (define it under tasks:)"))
            if p.route is not None:
                errors += self._route_errors(where, p.route, p.when.teams)
        return errors
