"""An OpenAI-compatible fake upstream for demos, tests and load tests.

Deterministic replies (chat, streaming, completions, embeddings, models, and Anthropic's messages
API for the litellm path), a configurable latency and reply length, and fault injection through
`POST /mock/faults`: status codes with or without Retry-After, HTML error pages, malformed JSON,
connection resets and stalls. `GET /mock/stats` tells what it received, which faults it applied, and
the tokens it served: counted only once a reply was delivered (or, for a stream, the prompt and the
chunks actually written), so a test can hold the proxy's recorded spend against them.

For the micro-batcher: the batch endpoint (`POST /v1/batch/chat/completions`, docs/batching.md), faults
that make a list reply not fit its request (`results`: fewer, duplicate_index, malformed_entry), and
`hold` faults that keep a request waiting until `POST /mock/release` (so tests can fill a queue), or
`hold_after_chunks` that holds a stream part-way.

A judging mode for shadow evaluation (`POST /mock/config {"judge": ...}`): a request carrying the pairwise
judge prompt (MT-Bench's `[[A]]`/`[[B]]`/`[[C]]` markers) is answered with a verdict: `longer` or
`shorter` (the answer with more or fewer words wins; same length: a tie), `A`, `B`, `tie`, or `garbage`
(no verdict). With `reply_tokens_by_model` one upstream model answers shorter, so a judge on `longer`
makes its answers lose. With `judge_only_on` (a regex) the mode applies only to questions it matches; the
others are judged a tie (a deterministic judge whose verdict depends on the prompt: labels a router can learn).
`scripted` ([[substring, reply], ...]) answers a chat prompt containing the substring with that reply,
e.g. "yes" to retrieval's LLM check.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.fakes.mock_agent_apis import register_agent_apis
from proxy.fakes.mock_state import BREVITY, Fault, MockState, prompt_text, reply_text, verdict
from proxy.services.tokens import counter_for


def _misfit(entries: list[Any], how: str | None) -> list[Any]:
    """A list reply (data, choices, responses) that no longer fits its request, as a fault asks."""
    if how == "fewer":
        return entries[:-1]
    if how == "duplicate_index" and len(entries) > 1:
        return [*entries[:-1], {**entries[-1], "index": entries[0].get("index", 0)}]
    if how == "malformed_entry" and entries:
        return [{"unexpected": True}, *entries[1:]]
    return entries


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class MockUpstream:
    def __init__(self, state: MockState):
        self.state = state
        self._counter = counter_for("gpt-4o")
        # Load the encoding now: the first requests of a load test must not wait seconds for it.
        self._counter.text("warm")

    def _take_fault(self, path: str, model: str | None) -> Fault | None:
        for fault in self.state.faults:
            if fault.matches(path, model):
                fault.count -= 1
                if fault.count <= 0:
                    self.state.faults.remove(fault)
                return fault
        return None

    def _count_fault(self, fault: Fault) -> None:
        kinds = [
            kind
            for kind, on in (
                ("stall", fault.stall_s > 0),
                ("reset", fault.reset),
                (f"status:{fault.status}" + ("" if fault.body == "json" else f":{fault.body}"), fault.status),
                ("stream_cut", fault.after_chunks is not None),
                ("hold", fault.hold or fault.hold_after_chunks is not None),
                (f"results:{fault.results}", fault.results),
            )
            if on
        ]
        for kind in kinds:
            self.state.faults_applied[kind] += 1

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        if fault.stall_s:
            await asyncio.sleep(fault.stall_s)
        if fault.reset:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if fault.status is None:
            return None
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        if fault.body == "html":
            return web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                status=fault.status,
                content_type="text/html",
                headers=headers,
            )
        if fault.body == "detail":
            detail = [
                {
                    "type": "string_type",
                    "loc": ["body", "input", "str"],
                    "msg": "Input should be a valid string",
                    "input": [1, 2, 3],
                }
            ]
            return web.Response(
                body=orjson.dumps({"detail": detail}),
                status=fault.status,
                content_type="application/json",
                headers=headers,
            )
        if fault.body == "malformed":
            return web.Response(
                body=b'{"id": "x", "choices": [', status=fault.status, content_type="application/json", headers=headers
            )
        err = {
            "error": {"message": f"injected fault {fault.status}", "type": "server_error", "param": None, "code": None}
        }
        return web.Response(
            body=orjson.dumps(err), status=fault.status, content_type="application/json", headers=headers
        )

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], Fault | None, web.StreamResponse | None]:
        body = await request.json(loads=orjson.loads)
        self.state.calls[request.path] += 1
        self.state.last_bodies.append(body)
        fault = self._take_fault(request.path, body.get("model"))
        if fault is not None:
            self._count_fault(fault)
        if fault is not None and fault.hold:
            await self._hold()
        if self.state.latency_s:
            await asyncio.sleep(self.state.latency_s)
        early = await self._apply_fault(request, fault) if fault else None
        return body, fault, early

    async def _hold(self) -> None:
        if self.state.gate is None:
            self.state.gate = asyncio.Event()
        gate = self.state.gate
        self.state.held += 1
        try:
            await gate.wait()
        finally:
            self.state.held -= 1

    def _release(self) -> None:
        if self.state.gate is not None:
            self.state.gate.set()
            self.state.gate = None

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _served(self, prompt: int, completion: int) -> None:
        self.state.prompt_tokens_served += prompt
        self.state.completion_tokens_served += completion

    async def _client_gone(self, request: web.Request) -> bool:
        """True (and counted as abandoned) when the client has closed the connection, e.g. a proxy that
        timed out during a stall: whatever was generated for it is not served."""
        # One loop turn first, so a close that has already arrived is seen before anything is written:
        # a write into a half-closed connection would succeed locally and be lost on the other side.
        await asyncio.sleep(0)
        if request.transport is None or request.transport.is_closing():
            self.state.abandoned += 1
            return True
        return False

    async def _deliver(self, request: web.Request, data: Any, prompt: int, completion: int) -> web.StreamResponse:
        """Send a JSON reply, then count its tokens as served."""
        resp = _json(data)
        if await self._client_gone(request):
            return resp
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            self.state.abandoned += 1
            raise
        self._served(prompt, completion)
        return resp

    def _n_words(self, body: dict[str, Any]) -> int:
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        n = float(self.state.reply_tokens_by_model.get(body.get("model"), self.state.reply_tokens))
        prompt = prompt_text(body)
        if self.state.length_jitter:
            h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "big") / 2**32
            n *= 1 + self.state.length_jitter * (2 * h - 1)
        if BREVITY.search(prompt):
            n *= self.state.concise_ratio
        words = max(1, round(n))
        return min(words, limit) if isinstance(limit, int) and limit > 0 else words

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._begin(request)
        if early is not None:
            return early
        prompt = prompt_text(body)
        judged = verdict(self.state.judge, prompt, self.state.judge_only_on) if self.state.judge else None
        scripted = next((reply for part, reply in self.state.scripted if part in prompt), None)
        text = judged or scripted or reply_text(prompt, self._n_words(body))
        model = body.get("model", "mock")
        prompt_tokens = self._counter.chat_prompt(body["messages"])
        created = int(time.time())
        if body.get("stream"):
            return await self._stream_chat(request, body, text, model, prompt_tokens, created, fault)
        reply = self._chat_reply(body, text, model, prompt_tokens, created)
        return await self._deliver(request, reply, prompt_tokens, self._counter.text(text) * (body.get("n") or 1))

    def _chat_reply(self, body: dict[str, Any], text: str, model: str, prompt_tokens: int, created: int) -> dict:
        completion_tokens = self._counter.text(text)
        n = body.get("n") or 1
        reply = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                for i in range(n)
            ],
        }
        if self.state.usage:
            reply["usage"] = self._usage(prompt_tokens, completion_tokens * n)
        return reply

    async def batch_chat(self, request: web.Request) -> web.StreamResponse:
        """The batch endpoint: {"requests": [chat bodies]} → {"responses": [{"status_code", "body"}]}."""
        body, fault, early = await self._begin(request)
        if early is not None:
            return early
        responses, prompt_total, completion_total = [], 0, 0
        for req in body["requests"]:
            text = reply_text(prompt_text(req), self._n_words(req))
            prompt_tokens = self._counter.chat_prompt(req["messages"])
            reply = self._chat_reply(req, text, req.get("model", "mock"), prompt_tokens, int(time.time()))
            responses.append({"status_code": 200, "body": reply})
            prompt_total += prompt_tokens
            completion_total += self._counter.text(text) * (req.get("n") or 1)
        data = {"responses": _misfit(responses, fault.results if fault else None)}
        return await self._deliver(request, data, prompt_total, completion_total)

    async def _stream_chat(
        self,
        request: web.Request,
        body: dict[str, Any],
        text: str,
        model: str,
        prompt_tokens: int,
        created: int,
        fault: Fault | None,
    ) -> web.StreamResponse:
        head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(index: int, piece: str, first: bool) -> dict[str, Any]:
            # As OpenAI does, a choice's first delta names the role (the Node SDK's stream helper needs it).
            delta = {"role": "assistant", "content": piece} if first else {"content": piece}
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}

        final = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
        return await self._stream(request, body, fault, [text], prompt_tokens, head, chunk, final)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        fault: Fault | None,
        texts: list[str],
        prompt_tokens: int,
        head: dict[str, Any],
        chunk: Callable[[int, str, bool], dict[str, Any]],
        final: list[dict[str, Any]],
    ) -> web.StreamResponse:
        """Stream each choice's text (`texts[index]`) one word per SSE event (`chunk(index, piece, first)`),
        then each of the `final` choices (finish_reason), then a usage-only chunk when the client asked for it
        (`stream_options.include_usage`), then `[DONE]`, as OpenAI does."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if await self._client_gone(request):
            return resp
        await resp.prepare(request)
        pieces = [
            (index, word if i == 0 else " " + word, i == 0)
            for index, text in enumerate(texts)
            for i, word in enumerate(text.split(" "))
        ]
        sent_text: list[str] = []
        try:
            for n, (index, piece, first) in enumerate(pieces):
                if fault is not None and fault.hold_after_chunks == n:
                    await self._hold()
                if fault is not None and fault.after_chunks is not None and n >= fault.after_chunks:
                    # close, not abort: the chunks already written still reach the client, then the
                    # connection ends without the chunked terminator (a stream cut mid-way)
                    if request.transport is not None:
                        request.transport.close()
                    return resp
                await resp.write(b"data: " + orjson.dumps(chunk(index, piece, first)) + b"\n\n")
                sent_text.append(piece)
                if self.state.chunk_delay_s:
                    await asyncio.sleep(self.state.chunk_delay_s)
            for choice in final:  # one chunk per choice, as OpenAI sends them
                await resp.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
            opts = body.get("stream_options") or {}
            if self.state.usage and opts.get("include_usage"):
                completion = sum(self._counter.text(t) for t in texts)
                usage = {**head, "choices": [], "usage": self._usage(prompt_tokens, completion)}
                await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.state.calls["stream_cancelled"] += 1
            raise
        finally:
            # Once a stream has delivered its first chunk (headers go out with it) the prompt is billed,
            # and every chunk written was served.
            if sent_text:
                self._served(prompt_tokens, self._counter.text("".join(sent_text)))
        await resp.write_eof()
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._begin(request)
        if early is not None:
            return early
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if prompts and isinstance(prompts[0], int):
            prompts = [" ".join(map(str, prompts))]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, p in enumerate(prompts):
            p = p if isinstance(p, str) else " ".join(map(str, p))
            text = reply_text(p, self._n_words(body))
            choices.append({"index": i, "text": text, "finish_reason": "stop", "logprobs": None})
            prompt_tokens += self._counter.text(p)
            completion_tokens += self._counter.text(text)
        head = {
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "mock"),
        }
        if body.get("stream"):
            # Streamed completions are text_completion objects too, one choice's piece of text each.
            def chunk(index: int, piece: str, first: bool) -> dict[str, Any]:
                return {**head, "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": None}]}

            final = [{"index": c["index"], "text": "", "logprobs": None, "finish_reason": "stop"} for c in choices]
            texts = [c["text"] for c in choices]
            return await self._stream(request, body, fault, texts, prompt_tokens, head, chunk, final)
        reply = {**head, "choices": _misfit(choices, fault.results if fault else None)}
        if self.state.usage:
            reply["usage"] = self._usage(prompt_tokens, completion_tokens)
        return await self._deliver(request, reply, prompt_tokens, completion_tokens)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._begin(request)
        if early is not None:
            return early
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if inputs and isinstance(inputs[0], int):
            inputs = [" ".join(map(str, inputs))]
        data, tokens = [], 0
        dim = body.get("dimensions") or self.state.embedding_dim
        as_base64 = body.get("encoding_format") == "base64"
        for i, text in enumerate(inputs):
            text = text if isinstance(text, str) else " ".join(map(str, text))
            seed = hashlib.blake2b(text.encode(), digest_size=8).digest()
            vec = [math.sin(seed[j % 8] + j) for j in range(dim)]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            unit = [v / norm for v in vec]
            # base64 is the little-endian float32 bytes of the vector, as OpenAI (and the SDKs' decoders) have it.
            embedding: Any = base64.b64encode(struct.pack(f"<{dim}f", *unit)).decode() if as_base64 else unit
            data.append({"object": "embedding", "index": i, "embedding": embedding})
            tokens += self._counter.text(text)
        reply = {
            "object": "list",
            "data": _misfit(data, fault.results if fault else None),
            "model": body.get("model", "mock"),
        }
        if self.state.usage:
            reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return await self._deliver(request, reply, tokens, 0)

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        """Enough of Anthropic's Messages API for litellm's anthropic provider (non-streaming)."""
        body, _, early = await self._begin(request)
        if early is not None:
            return early
        prompt = prompt_text(body)
        text = reply_text(prompt, self._n_words(body))
        usage = self._usage(self._counter.text(prompt), self._counter.text(text))
        return await self._deliver(
            request,
            {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": body.get("model", "mock"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
            },
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}]})

    async def add_faults(self, request: web.Request) -> web.Response:
        items = await request.json(loads=orjson.loads)
        for item in items if isinstance(items, list) else [items]:
            self.state.faults.append(Fault(**item))
        return _json({"queued": len(self.state.faults)})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(
            {
                "calls": dict(self.state.calls),
                "last_bodies": list(self.state.last_bodies),
                "prompt_tokens_served": self.state.prompt_tokens_served,
                "completion_tokens_served": self.state.completion_tokens_served,
                "faults_pending": len(self.state.faults),
                "faults_applied": dict(self.state.faults_applied),
                "abandoned": self.state.abandoned,
                "held": self.state.held,
            }
        )

    async def release(self, request: web.Request) -> web.Response:
        held = self.state.held
        self._release()
        return _json({"released": held})

    async def reset(self, request: web.Request) -> web.Response:
        self._release()
        self.state.faults.clear()
        self.state.calls.clear()
        self.state.last_bodies.clear()
        self.state.prompt_tokens_served = self.state.completion_tokens_served = 0
        self.state.faults_applied.clear()
        self.state.abandoned = 0
        return _json({"reset": True})

    async def configure(self, request: web.Request) -> web.Response:
        cfg = await request.json(loads=orjson.loads)
        for key in (
            "reply_tokens",
            "usage",
            "embedding_dim",
            "concise_ratio",
            "length_jitter",
            "judge",
            "judge_only_on",
        ):
            if key in cfg:
                setattr(self.state, key, cfg[key])
        if "reply_tokens_by_model" in cfg:
            self.state.reply_tokens_by_model = dict(cfg["reply_tokens_by_model"] or {})
        if "scripted" in cfg:
            self.state.scripted = [(str(part), str(reply)) for part, reply in cfg["scripted"] or []]
        if "latency_ms" in cfg:
            self.state.latency_s = cfg["latency_ms"] / 1000
        if "chunk_delay_ms" in cfg:
            self.state.chunk_delay_s = cfg["chunk_delay_ms"] / 1000
        return _json({"ok": True})


def build_mock_app(state: MockState | None = None) -> web.Application:
    mock = MockUpstream(state or MockState())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", mock.chat)
        app.router.add_post(f"{prefix}/completions", mock.completions)
        app.router.add_post(f"{prefix}/embeddings", mock.embeddings)
        app.router.add_post(f"{prefix}/batch/chat/completions", mock.batch_chat)
        app.router.add_get(f"{prefix}/models", mock.models)
    app.router.add_post("/mock/faults", mock.add_faults)
    app.router.add_get("/mock/stats", mock.stats)
    app.router.add_post("/mock/reset", mock.reset)
    app.router.add_post("/mock/release", mock.release)
    app.router.add_post("/mock/config", mock.configure)
    register_agent_apis(
        app, mock, reply_text, prompt_text
    )  # /v1/responses, /v1/messages, tool calls, cached and reasoning usage
    return app


def run_mock_upstream(host: str, port: int, state: MockState) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional for the mock
        pass
    web.run_app(build_mock_app(state), host=host, port=port, access_log=None, print=None)
