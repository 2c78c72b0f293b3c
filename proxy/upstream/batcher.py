"""Micro-batcher: coalesce concurrent non-stream requests to one self-hosted model into one upstream call.

Many self-hosted servers run one request at a time; one call carrying 25 prompts costs them little more
than one carrying a single prompt. The batcher wraps a model's OpenAI-compatible upstream and, per the
model's `batching:` block, merges queued requests into one call and splits the reply back
(docs/batching.md has the scheduling rules and the batch endpoint protocol). With the model's serving
facts (`hardware`, `params_b`) a batch is also bounded by the GPU memory its tokens in flight hold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import metrics
from proxy.config.capacity import ModelMemory
from proxy.errors import BadGateway, ExceedsModelMemory, ProxyError, RateLimited, UpstreamHTTPError
from proxy.services.tokens import TokenCounter, counter_for
from proxy.upstream.openai_compat import OpenAICompatUpstream, StreamHandle
from proxy.upstream.reply import UpstreamReply
from proxy.upstream.retries import RetryableUpstreamError
from proxy.wire.adapter import Endpoint, is_int
from proxy.wire.content import reply_text

log = logging.getLogger("llm_proxy.batcher")

BATCH_CHAT_PATH = "/batch/chat/completions"

_ENDPOINT_OF_MODE = {
    "embeddings": Endpoint.EMBEDDINGS,
    "completions": Endpoint.COMPLETIONS,
    "batch_endpoint": Endpoint.CHAT,
}
_MERGED_FIELD = {"embeddings": "input", "completions": "prompt"}
_NOT_SAMPLING = frozenset({"model", "stream", "prompt", "input"})
_Outcome = UpstreamReply | ProxyError | RetryableUpstreamError


@dataclass(slots=True)
class BatchedReply(UpstreamReply):
    """A reply that came through the micro-batcher (the client sees route `batch`)."""


class _Misfit(Exception):
    """The upstream's batched reply does not fit the batch that was sent."""


@dataclass(slots=True, eq=False)
class _Item:
    body: dict[str, Any]
    rows: list[Any]  # the prompts/inputs this request adds to a merged call
    key: Any  # requests merge only with requests of the same key
    enqueued: float
    future: asyncio.Future[_Outcome]
    tokens: int  # prompt + max output tokens: what the request holds in the model's memory once sent
    sent: bool = False


class _Group:
    __slots__ = ("items", "rows", "tokens")

    def __init__(self) -> None:
        self.items: deque[_Item] = deque()
        self.rows = 0
        self.tokens = 0


def _rows(value: Any) -> tuple[str, list[Any]] | None:
    """(kind, rows) of a `prompt`/`input` value, or None when it cannot be merged with others."""
    if isinstance(value, str):
        return "text", [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return "text", value
        if all(is_int(v) for v in value):
            return "tokens", [value]
        if all(isinstance(v, list) for v in value):
            return "tokens", value
    return None


def _row_count(value: Any) -> int:
    if isinstance(value, list) and value and not is_int(value[0]):
        return len(value)
    return 1


def _usage_rows(value: Any, total: int) -> list[dict[str, int]] | None:
    """The optional `usage_per_input` list of a batched reply, when it is well formed."""
    if not isinstance(value, list) or len(value) != total:
        return None
    for u in value:
        if not isinstance(u, dict) or not is_int(u.get("prompt_tokens")):
            return None
        if "completion_tokens" in u and not is_int(u["completion_tokens"]):
            return None
    return value


def _usage(prompt: int, completion: int | None) -> dict[str, int]:
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _by_index(entries: Any, total: int, what: str) -> list[dict[str, Any]]:
    """Entries placed by their `index`: every index in range(total) exactly once, or _Misfit."""
    if not isinstance(entries, list) or len(entries) != total:
        got = len(entries) if isinstance(entries, list) else "no"
        raise _Misfit(f"it answered {got} {what} for {total} expected")
    placed: list[dict[str, Any] | None] = [None] * total
    for e in entries:
        idx = e.get("index") if isinstance(e, dict) else None
        if not is_int(idx) or not 0 <= idx < total or placed[idx] is not None:
            raise _Misfit(f"a {what[:-1]} index ({orjson.dumps(idx).decode()}) is missing, repeated or out of range")
        placed[idx] = e
    return placed  # type: ignore[return-value]


class MicroBatcher:
    """One model's upstream with micro-batching in front of its non-stream calls.

    Scheduling: at most `max_concurrent_batches` calls are in flight and `max_queue` requests wait
    (then 429). Once a slot is free, the oldest batch leaves when it is full, when as many requests
    have arrived since calls finished as those calls answered (their clients are back: a closed loop
    of clients shares the next call instead of splitting into cohorts), or `max_wait_ms` after the
    later of its first request and the slot freeing. At low load that count is met by the request
    itself: a request that finds the queue empty and a slot free is sent at once, as it is.

    With the model's serving facts, a call also leaves only while the tokens of all calls in flight fit
    the model's memory budget: a batch takes requests in order while they fit, and a request that does
    not fit what is left waits for a call to finish. A request that alone can never fit gets a 400.
    """

    def __init__(self, inner: OpenAICompatUpstream):
        cfg = inner.cfg
        assert cfg.batching is not None
        self.name = inner.name
        self.cfg = cfg
        self._inner = inner
        self._batching = cfg.batching
        self._mode = cfg.batching.mode
        self._endpoint = _ENDPOINT_OF_MODE[self._mode]
        self._field = _MERGED_FIELD.get(self._mode)
        self._max_rows = cfg.batching.max_batch_size
        self._max_wait = cfg.batching.max_wait_ms / 1000
        self._timeout_s = cfg.timeout_s
        self._upstream_model = cfg.upstream_model or inner.name
        self._counter: TokenCounter = counter_for(self._upstream_model, cfg.tokenizer)
        self._groups: dict[Any, _Group] = {}
        self._queued = 0
        self._in_flight = 0
        # Requests answered since the last arrival-to-answer cycle whose clients have not sent again:
        # a closed loop of clients is about to, so a batch waits for them (within max_wait_ms).
        self._returning = 0
        self._window_opened: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._call_seconds = 1.0  # moving average, for Retry-After
        self._tasks: set[asyncio.Task[None]] = set()
        self._alone_keys = itertools.count()
        self._queue_depth = metrics.BATCH_QUEUE_DEPTH.labels(self.name)
        self._calls_in_flight = metrics.BATCHES_IN_FLIGHT.labels(self.name)
        self._batch_size = metrics.BATCH_SIZE.labels(self.name)
        self._queue_wait = metrics.BATCH_QUEUE_WAIT.labels(self.name)
        self._item_errors = metrics.BATCH_ITEM_ERRORS.labels(self.name)
        self._memory = ModelMemory.of(cfg)
        # Tokens reserved by calls in flight, and the most they may hold (no bound without serving facts).
        self.tokens_in_flight = 0
        self.token_budget = self._memory.token_budget if self._memory is not None else math.inf
        if self._memory is not None:
            self._memory_reserved = metrics.BATCH_MEMORY_RESERVED.labels(self.name)
            self._memory_in_flight = metrics.BATCH_MEMORY_IN_FLIGHT.labels(self.name)
            metrics.BATCH_MEMORY_BUDGET.labels(self.name).set(self._memory.budget_mb)

    # The Upstream protocol -------------------------------------------------------------------------

    async def open_stream(self, endpoint: str, body: dict[str, Any], include_usage: bool) -> StreamHandle:
        return await self._inner.open_stream(endpoint, body, include_usage)  # streams are never batched

    async def send(self, endpoint: str, body: dict[str, Any], held_tokens: int | None = None) -> UpstreamReply:
        """`held_tokens`: the request's prompt plus max output tokens, as the pipeline counted them
        (counted here when not given); they bound the batch when the model has serving facts."""
        if endpoint != self._endpoint:
            return await self._inner.send(endpoint, body)
        tokens = 0
        if self._memory is not None:
            tokens = held_tokens if held_tokens is not None else self._held_tokens(body)
            if (why := self._memory.misfit(self.name, tokens)) is not None:
                raise ExceedsModelMemory(why, param="max_tokens")
        if self._returning:
            self._returning -= 1
        if (
            not self._queued
            and not self._returning
            and self._in_flight < self._batching.max_concurrent_batches
            and self.tokens_in_flight + tokens <= self.token_budget
        ):
            return await self._send_at_once(body, tokens)
        if self._queued >= self._batching.max_queue:
            seconds = self._retry_after()
            raise RateLimited(
                f"The batch queue of model '{self.name}' is full ({self._batching.max_queue} requests waiting); "
                f"retry after {seconds}s.",
                headers={"retry-after": str(seconds)},
            )
        item = self._enqueue(body, tokens)
        try:
            async with asyncio.timeout(self._timeout_s):
                outcome = await item.future
        except TimeoutError:
            raise RetryableUpstreamError(
                "timeout", f"no answer within the model's timeout of {self._timeout_s:g}s, batch queue included"
            ) from None
        finally:
            if not item.sent:  # cancelled or timed out while queued: it must never be sent
                self._dequeue(item)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # Queue -----------------------------------------------------------------------------------------

    def _held_tokens(self, body: dict[str, Any]) -> int:
        """Prompt plus max output tokens of a request whose caller did not count them."""
        if self._mode == "batch_endpoint":
            prompt = self._counter.chat_prompt(body.get("messages") or [], body.get("tools"), body.get("functions"))
            rows = 1
        else:
            value = body.get(self._field or "")
            prompt, rows = self._counter.prompt(value), _row_count(value)
        if self._mode == "embeddings":
            return prompt
        per_choice = body.get("max_completion_tokens") or body.get("max_tokens") or self.cfg.max_output_tokens or 0
        return prompt + per_choice * (body.get("n") or 1) * rows

    def _enqueue(self, body: dict[str, Any], tokens: int) -> _Item:
        loop = asyncio.get_running_loop()
        key: Any = None
        rows: list[Any] = [body]
        if self._field is not None:
            parsed = _rows(body.get(self._field))
            if parsed is None:
                key = ("alone", next(self._alone_keys))
            else:
                kind, rows = parsed
                rest = {k: v for k, v in body.items() if k not in _NOT_SAMPLING}
                key = (kind, orjson.dumps(rest, option=orjson.OPT_SORT_KEYS))
        item = _Item(body, rows, key, loop.time(), loop.create_future(), tokens)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        group.items.append(item)
        group.rows += len(rows)
        group.tokens += tokens
        self._queued += 1
        self._queue_depth.inc()
        self._pump()
        return item

    def _dequeue(self, item: _Item) -> None:
        group = self._groups.get(item.key)
        if group is None or item not in group.items:
            return
        group.items.remove(item)
        group.rows -= len(item.rows)
        group.tokens -= item.tokens
        if not group.items:
            del self._groups[item.key]
        self._queued -= 1
        self._queue_depth.dec()

    def _pump(self) -> None:
        """Send every batch that may leave now; otherwise wake up when the next one may."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._queued and self._in_flight < self._batching.max_concurrent_batches:
            now = loop.time()
            if self._window_opened is None:
                self._window_opened = now
            left = self.token_budget - self.tokens_in_flight
            # Full: its size cap is reached, or its tokens fill the memory left (waiting cannot grow it).
            group = next((g for g in self._groups.values() if g.rows >= self._max_rows or g.tokens > left), None)
            if group is None:
                group = min(self._groups.values(), key=lambda g: g.items[0].enqueued)
                if self._returning:  # the clients of a finished call are not all back yet
                    deadline = max(group.items[0].enqueued, self._window_opened) + self._max_wait
                    if now < deadline:
                        self._timer = loop.call_at(deadline, self._pump)
                        return
                    self._returning = 0  # they are not coming: stop waiting for them
            if group.items[0].tokens > left:
                break  # the oldest request waits for memory: a finishing call frees it and pumps again
            self._window_opened = None
            self._launch(self._take(group, left), now)
        self._window_opened = None

    def _take(self, group: _Group, left: float) -> list[_Item]:
        """The oldest requests of a group, in order, while they fit the size cap and the memory left."""
        taken: list[_Item] = []
        rows = tokens = 0
        while group.items:
            head = group.items[0]
            if taken and (rows + len(head.rows) > self._max_rows or tokens + head.tokens > left):
                break
            taken.append(group.items.popleft())
            rows += len(head.rows)
            tokens += head.tokens
        group.rows -= rows
        group.tokens -= tokens
        if not group.items:
            del self._groups[taken[0].key]
        self._queued -= len(taken)
        self._queue_depth.dec(len(taken))
        return taken

    def _retry_after(self) -> int:
        calls_ahead = math.ceil(self._queued / self._max_rows) / self._batching.max_concurrent_batches
        return max(1, math.ceil(self._call_seconds * (calls_ahead + 1)))

    # Calls -----------------------------------------------------------------------------------------

    def _call_started(self, rows: int, tokens: int) -> float:
        self._in_flight += 1
        self._calls_in_flight.inc()
        self._batch_size.observe(rows)
        if self._memory is not None:
            self.tokens_in_flight += tokens
            self._memory_reserved.observe(self._memory.mb(tokens))
            self._memory_in_flight.set(self._memory.mb(self.tokens_in_flight))
        return asyncio.get_running_loop().time()

    def _call_ended(self, started: float, requests: int, tokens: int) -> None:
        self._returning += requests
        self._in_flight -= 1
        self._calls_in_flight.dec()
        if self._memory is not None:
            self.tokens_in_flight -= tokens
            self._memory_in_flight.set(self._memory.mb(self.tokens_in_flight))
        self._call_seconds = 0.8 * self._call_seconds + 0.2 * (asyncio.get_running_loop().time() - started)
        self._pump()

    async def _send_at_once(self, body: dict[str, Any], tokens: int) -> BatchedReply:
        rows = _row_count(body.get(self._field)) if self._field else 1
        started = self._call_started(rows, tokens)
        self._queue_wait.observe(0.0)
        try:
            reply = await self._inner.send(self._endpoint, body)
        finally:  # cancelled (the client hung up) or not, its memory is released
            self._call_ended(started, 1, tokens)
        return BatchedReply(reply.data, reply.raw)

    def _launch(self, items: list[_Item], now: float) -> None:
        for item in items:
            item.sent = True
            self._queue_wait.observe(now - item.enqueued)
        tokens = sum(i.tokens for i in items)
        started = self._call_started(sum(len(i.rows) for i in items), tokens)
        task = asyncio.get_running_loop().create_task(self._run(items, started, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[_Item], started: float, tokens: int) -> None:
        outcomes: list[_Outcome] | None = None
        try:
            if len(items) == 1:
                outcomes = [await self._call_alone(items[0])]
            elif self._mode == "batch_endpoint":
                outcomes = await self._call_batch_endpoint(items)
            else:
                outcomes = await self._call_merged(items)
        except Exception:  # a bug or a closed session: this batch's clients get a 502, the batcher goes on
            log.exception("batched call for model %s failed unexpectedly", self.name)
        finally:
            self._call_ended(started, len(items), tokens)
            if outcomes is None:  # failed above, or cancelled (shutdown): nobody may wait forever
                outcomes = [BadGateway("The batched upstream call was abandoned.") for _ in items]
            for item, outcome in zip(items, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(outcome)

    async def _call_alone(self, item: _Item) -> _Outcome:
        try:
            reply = await self._inner.send(self._endpoint, item.body)
        except (ProxyError, RetryableUpstreamError) as e:
            return e
        return BatchedReply(reply.data, reply.raw)

    def _whole_call_failed(self, e: Exception, n: int, what: str) -> Callable[[], _Outcome]:
        """A factory of each waiting request's error (one exception object per request)."""
        if isinstance(e, RetryableUpstreamError):
            if e.kind == "5xx":
                # The upstream's error body is about the batch, not this request: it is not relayed,
                # so once retries are spent the client gets a 502 that says what happened.
                msg = f"the batched call for {n} requests failed with HTTP {e.status}"
                return lambda: RetryableUpstreamError("5xx", msg, status=e.status, retry_after=e.retry_after)
            return lambda: RetryableUpstreamError(
                e.kind, str(e), status=e.status, body=e.body, retry_after=e.retry_after
            )
        msg = f"The upstream's reply to a batched call for {n} requests is unusable: {what}."
        return lambda: BadGateway(msg)

    async def _call_merged(self, items: list[_Item]) -> list[_Outcome]:
        assert self._field is not None
        merged = [row for item in items for row in item.rows]
        try:
            reply = await self._inner.send(self._endpoint, {**items[0].body, self._field: merged})
        except UpstreamHTTPError:
            return await self._isolate(items)
        except (ProxyError, RetryableUpstreamError) as e:
            make = self._whole_call_failed(e, len(items), getattr(e, "message", str(e)))
            return [make() for _ in items]
        try:
            if self._mode == "embeddings":
                return self._split_embeddings(items, reply.data)
            return self._split_completions(items, reply.data)
        except _Misfit as e:
            make = self._whole_call_failed(e, len(items), str(e))
            return [make() for _ in items]

    async def _isolate(self, items: list[_Item]) -> list[_Outcome]:
        """One bad request fails a whole merged call: send each request alone, so only it fails."""
        outcomes = await asyncio.gather(*(self._call_alone(item) for item in items))
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self._item_errors.inc()
        return list(outcomes)

    def _split_embeddings(self, items: list[_Item], data: dict[str, Any]) -> list[_Outcome]:
        total = sum(len(i.rows) for i in items)
        placed = _by_index(data.get("data"), total, "embeddings")
        per_row = _usage_rows(data.get("usage_per_input"), total)
        out: list[_Outcome] = []
        start = 0
        for item in items:
            n = len(item.rows)
            if per_row is not None:
                usage = _usage(sum(u["prompt_tokens"] for u in per_row[start : start + n]), None)
            else:
                usage = _usage(self._counter.prompt(item.rows), None)
            own = [{**placed[start + i], "index": i} for i in range(n)]
            reply = {"object": "list", "data": own, "model": data.get("model", self._upstream_model), "usage": usage}
            out.append(BatchedReply(reply, orjson.dumps(reply)))
            start += n
        return out

    def _split_completions(self, items: list[_Item], data: dict[str, Any]) -> list[_Outcome]:
        n_choices = items[0].body.get("n") or 1  # the same for all: `n` is part of the group key
        total_rows = sum(len(i.rows) for i in items)
        placed = _by_index(data.get("choices"), total_rows * n_choices, "choices")
        per_row = _usage_rows(data.get("usage_per_input"), total_rows)
        base = {k: v for k, v in data.items() if k not in ("choices", "usage", "usage_per_input")}
        out: list[_Outcome] = []
        start = 0
        for item in items:
            n = len(item.rows)
            first = start * n_choices
            own = [{**placed[first + i], "index": i} for i in range(n * n_choices)]
            if per_row is not None:
                rows = per_row[start : start + n]
                usage = _usage(sum(u["prompt_tokens"] for u in rows), sum(u.get("completion_tokens", 0) for u in rows))
            else:
                usage = _usage(self._counter.prompt(item.rows), self._counter.text(reply_text({"choices": own})))
            reply = {**base, "choices": own, "usage": usage}
            out.append(BatchedReply(reply, orjson.dumps(reply)))
            start += n
        return out

    async def _call_batch_endpoint(self, items: list[_Item]) -> list[_Outcome]:
        payload = {"requests": [{**item.body, "model": self._upstream_model} for item in items]}
        try:
            reply = await self._inner.post_json(BATCH_CHAT_PATH, payload)
        except UpstreamHTTPError as e:
            what = f"it refused the call with HTTP {e.status} (does it serve POST {BATCH_CHAT_PATH}?)"
            make = self._whole_call_failed(e, len(items), what)
            return [make() for _ in items]
        except (ProxyError, RetryableUpstreamError) as e:
            make = self._whole_call_failed(e, len(items), getattr(e, "message", str(e)))
            return [make() for _ in items]
        responses = reply.data.get("responses")
        if not isinstance(responses, list) or len(responses) != len(items):
            got = len(responses) if isinstance(responses, list) else "no"
            make = self._whole_call_failed(_Misfit(), len(items), f"it answered {got} responses for {len(items)}")
            return [make() for _ in items]
        out = [self._batch_response(item, r) for item, r in zip(items, responses, strict=True)]
        for outcome in out:
            if isinstance(outcome, Exception):
                self._item_errors.inc()
        return out

    def _batch_response(self, item: _Item, entry: Any) -> _Outcome:
        """One entry of a batch endpoint reply: {"status_code": int, "body": object}."""
        status = entry.get("status_code") if isinstance(entry, dict) else None
        body = entry.get("body") if isinstance(entry, dict) else None
        if not is_int(status) or not isinstance(body, dict):
            return BadGateway("The upstream's batch reply has a malformed entry for this request.")
        if status >= 400:
            raw = orjson.dumps(body)
            if "error" not in body:
                return BadGateway(f"The upstream failed this request with HTTP {status} and no OpenAI error.")
            if status == 429 or status >= 500:
                return RetryableUpstreamError(
                    "429" if status == 429 else "5xx", f"HTTP {status}", status=status, body=raw
                )
            return UpstreamHTTPError(status, raw)
        if not isinstance(body.get("choices"), list):
            return BadGateway("The upstream's batch reply for this request has no 'choices' list.")
        usage = body.get("usage")
        if not isinstance(usage, dict) or not is_int(usage.get("prompt_tokens")):
            prompt = self._counter.chat_prompt(
                item.body["messages"], item.body.get("tools"), item.body.get("functions")
            )
            body = {**body, "usage": _usage(prompt, self._counter.text(reply_text(body)))}
        return BatchedReply(body, orjson.dumps(body))
