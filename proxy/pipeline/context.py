"""The request context: what one request carries through the pipeline, from the canonical request the
wire adapter made to the outcome the settle hooks record.

Fields shared by several steps live on the context itself; state a step keeps for its own later hook
lives in that step's typed slot (`ctx.budget`, `ctx.limits`, `ctx.lookups`, ...), written and read by
that step alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.errors import ProxyError
from proxy.wire.adapter import Endpoint
from proxy.wire.content import user_text
from proxy.wire.usage import TokenUsage

__all__ = ["BudgetSlot", "ConversationSlot", "Endpoint", "LimitSlot", "RequestContext", "ShadowSlot"]

if TYPE_CHECKING:
    from proxy.retrieval.embedders import RequestEmbeddings
    from proxy.store.base import BudgetScope, LimitWindow
    from proxy.upstream.reply import UpstreamReply
    from proxy.wire.adapter import WireAdapter


@dataclass(slots=True, eq=False)
class BudgetSlot:
    """EnforceBudget's: the scopes it reserved in and how much, settled to the real cost."""

    scopes: list[BudgetScope]
    reserved_nano: int = 0


@dataclass(slots=True, eq=False)
class LimitSlot:
    """EnforceRateLimits': the windows that counted this request, and when (an undo goes there)."""

    windows: list[LimitWindow]
    hit_at: float


@dataclass(slots=True, eq=False)
class ShadowSlot:
    """SampleForShadow's: the request as the client sent it (before any policy changed it), for a
    sampled request, and its sampling draw (which policies' rates it falls under)."""

    draw: float
    body: dict[str, Any]
    model: str


@dataclass(slots=True, eq=False)
class ConversationSlot:
    """KeepConversation's: the kept response a request continues (`previous_response_id`), if any, and
    the input items of the whole conversation so far (what the next turn's history will be)."""

    previous: str | None
    items: list[Any]


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    endpoint: str
    headers: dict[str, str]
    wire: WireAdapter | None = None  # the format the client speaks (None for explain's canned bodies)
    started: float = field(default_factory=time.perf_counter)
    # who
    team: str | None = None
    key_id: str | None = None  # a short fingerprint of the virtual key, never the key
    key_rights: Any = None  # a runtime key's own narrowed rights (KeyRights); None for policy-file keys
    trace: Any = None  # the request's trace (RequestTrace) when tracing is on
    # what
    raw: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)
    model_requested: str | None = None
    model: str | None = None  # the model chosen by policy (the one that is called)
    stream: bool = False
    include_usage: bool = False  # the client asked for stream usage
    prompt_tokens: int = 0
    prompt_count: int = 1  # prompts in a completions/embeddings batch
    known_prompt_tokens: int | None = None  # replay of a log without prompt text
    max_output_tokens: int = 0
    upstream_headers: dict[str, str] = field(default_factory=dict)  # client headers its format forwards
    chat_body: dict[str, Any] | None = None  # the request translated to chat, for an upstream that speaks only chat
    policies: list[str] = field(default_factory=list)
    # estimates before the call
    cost_estimate: float = 0.0
    counterfactual_estimate: float = 0.0
    # outcome
    route: str = "upstream"
    answered_by: str | None = None  # the model that answered (after fallbacks)
    answer: dict[str, Any] | None = None  # set by a step to answer without an upstream call
    sent_upstream: bool = False  # the gateway handed the request to the dispatcher
    reply: UpstreamReply | None = None  # the upstream's normalised reply, once it has answered
    usage: TokenUsage | None = None  # the real usage, reported by the upstream or counted
    cost: float = 0.0
    saved: float = 0.0
    upstream_seconds: float = 0.0
    status: int = 200
    error: ProxyError | None = None
    cancelled: bool = False
    dry_run: bool = False  # explain/replay: decide, change no state, call nothing
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    saved_by_policy: dict[str, float] = field(default_factory=dict)
    routed_by: list[str] = field(default_factory=list)  # policies that changed the model
    fallback_to_requested: bool = False  # if the routed model fails, try the one the client asked for
    experiments: dict[str, str] = field(default_factory=dict)  # policy -> arm (treated / holdout)
    # the embeddings made to decide this request (task matching, retrieval), shared by every step that embeds
    embeddings: RequestEmbeddings | None = None
    # per-step slots, made by their step when it has something to keep (most requests need few of them)
    budget: BudgetSlot | None = None
    limits: LimitSlot | None = None
    lookups: list[Any] | None = None  # Retrieve's lookups (proxy.steps.retrieve.Lookup)
    shadow: ShadowSlot | None = None
    router_predictions: dict[str, Any] | None = None  # Route's learned routers: policy -> what its router predicted
    conversation: ConversationSlot | None = None
    _user_text: str | None = None

    def key_allows(self, model: str) -> bool:
        """Whether the runtime key (if one sent this request) may use `model`: it narrows its team's list."""
        return self.key_rights is None or self.key_rights.allows(model)

    def may_use(self, model: str, allowed: Mapping[str, frozenset[str]]) -> bool:
        """Whether this request's team, and its runtime key, may use `model` (for a step that picks another)."""
        return model in allowed.get(self.team, ()) and self.key_allows(model)

    @property
    def input_tokens(self) -> int:
        return self.usage.input if self.usage is not None else 0

    @property
    def output_tokens(self) -> int:
        return self.usage.output if self.usage is not None else 0

    def user_text(self) -> str:
        """The text of the request's user messages (or prompt/input), computed once."""
        if self._user_text is None:
            self._user_text = user_text(self.body)
        return self._user_text

    def billed(self) -> float:
        """What this request costs its team: the answer, plus the embeddings made to decide it on a
        retrieval miss (recorded as spend of the embedding model; on a hit they are the answer's cost)."""
        if self.embeddings is None or self.route == "retrieval":
            return self.cost
        return self.cost + self.embeddings.cost()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def overhead(self) -> float:
        return max(0.0, self.elapsed() - self.upstream_seconds)
