"""The request pipeline: an ordered list of steps over one RequestContext.

A step is a small object with up to three hooks: `on_request(ctx)` before the upstream call (it may
raise a ProxyError to answer the client, or set `ctx.answer` to answer without an upstream call),
`on_response(ctx)` once the answer and its usage are known, and `on_settle(ctx)` after the client
has its response, successful or not (release what was reserved, record what was spent).
Steps read and write the context; they never call each other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.errors import ProxyError


class Endpoint:
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    endpoint: str
    headers: dict[str, str]
    started: float = field(default_factory=time.perf_counter)
    # who
    team: str | None = None
    key_id: str | None = None  # a short fingerprint of the virtual key, never the key
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
    policies: list[str] = field(default_factory=list)
    # estimates before the call
    cost_estimate: float = 0.0
    counterfactual_estimate: float = 0.0
    # outcome
    route: str = "upstream"
    answered_by: str | None = None  # the model that answered (after fallbacks)
    answer: dict[str, Any] | None = None  # set by a step to answer without an upstream call
    input_tokens: int = 0
    output_tokens: int = 0
    usage_known: bool = False
    cost: float = 0.0
    saved: float = 0.0
    upstream_seconds: float = 0.0
    status: int = 200
    error: ProxyError | None = None
    cancelled: bool = False
    dispatched: bool = False  # the request went (or was about to go) upstream
    dry_run: bool = False  # explain/replay: decide, change no state, call nothing
    # state owned by steps, read back in their own on_settle
    budget_scopes: list[Any] = field(default_factory=list)
    reserved_nano: int = 0
    limit_windows: list[Any] = field(default_factory=list)
    limits_hit_at: float = 0.0  # when the limit windows counted this request (an undo goes there)
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    saved_by_policy: dict[str, float] = field(default_factory=dict)
    routed_by: list[str] = field(default_factory=list)  # policies that changed the model
    fallback_to_requested: bool = False  # if the routed model fails, try the one the client asked for
    experiments: dict[str, str] = field(default_factory=dict)  # policy -> arm (treated / holdout)
    # retrieval: the request's embeddings (shared by every step that embeds), the lookups made, and
    # the upstream's answer (parsed JSON, or the relayed SSE events of a stream) for the semantic cache
    embeddings: Any = None
    retrieval: Any = None
    reply: Any = None
    _user_text: str | None = None

    def user_text(self) -> str:
        """The text of the request's user messages (or prompt/input), computed once."""
        if self._user_text is None:
            self._user_text = _user_text(self.body)
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


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            _content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
        )
    value = body.get("prompt", body.get("input"))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(v for v in value if isinstance(v, str))
    return ""


class Step(Protocol):
    async def on_request(self, ctx: RequestContext) -> None: ...


class Pipeline:
    def __init__(self, steps: list[Any], concurrent_settle: bool = True):
        self.steps = steps
        self._concurrent_settle = concurrent_settle
        self._request_hooks = [s.on_request for s in steps if hasattr(s, "on_request")]
        self._response_hooks = [s.on_response for s in steps if hasattr(s, "on_response")]
        self._settle_hooks = [s.on_settle for s in reversed(steps) if hasattr(s, "on_settle")]

    async def run_request(self, ctx: RequestContext) -> None:
        for hook in self._request_hooks:
            await hook(ctx)
            if ctx.answer is not None:
                return

    async def run_response(self, ctx: RequestContext) -> None:
        for hook in self._response_hooks:
            await hook(ctx)

    async def run_settle(self, ctx: RequestContext) -> None:
        # Settle hooks are independent (each releases or records what its own step did), so with a
        # networked store they run together: their store writes then share one round trip. With the
        # in-process store nothing waits, and one task per hook would cost more than the hooks.
        if not self._concurrent_settle or len(self._settle_hooks) == 1:
            failed: Exception | None = None
            for hook in self._settle_hooks:
                try:
                    await hook(ctx)
                except Exception as e:  # as with gather, a failing hook does not stop the others
                    failed = failed or e
            if failed is not None:
                raise failed
        elif self._settle_hooks:
            await asyncio.gather(*(hook(ctx) for hook in self._settle_hooks))
