"""The reference backend's HTTP server: OpenAI-compatible endpoints and the batch endpoint, one
forward batch per call, one call at a time."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.fakes.reference_backend.models import (
    DEFAULT_MAX_TOKENS,
    EMBEDDING_MODEL_NAME,
    MAX_N,
    TINY_MODEL_NAME,
    BadRequest,
    Embedder,
    Generator,
    _offline,
    load_causal_lm,
    minilm_path,
    tiny_causal_lm,
)

log = logging.getLogger("llm_proxy.reference_backend")


# Request parsing -------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or not low <= v <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}.", name)
    return v


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
        raise BadRequest(f"'{name}' must be a number from {low:g} to {high:g}.", name)
    return float(v)


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest("'stop' must be a string or up to 4 strings.", "stop")
    return stops


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_int(v) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return [list(v) for v in value]
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token lists.", "prompt")


@dataclass(slots=True)
class _Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stops: list[str]


def _sampling(body: dict[str, Any], max_limit: int) -> _Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest("'seed' must be an integer.", "seed")
    return _Sampling(
        max_tokens=_int({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, 1, max_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        n=_int(body, "n", 1, 1, MAX_N),
        seed=seed,
        stops=_stops(body),
    )


# The server ------------------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ReferenceBackend:
    def __init__(
        self,
        generator: Generator | None,
        embedder: Embedder | None,
        usage: str = "per_item",
        test_controls: bool = False,
        max_tokens_limit: int = 1024,
    ):
        self.generator = generator
        self.embedder = embedder
        self.usage = usage
        self.test_controls = test_controls
        self.max_tokens_limit = max_tokens_limit
        self._lock = asyncio.Lock()  # one call at a time: the naive server the batcher is for
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._gate: asyncio.Event | None = None
        self.calls: Counter[str] = Counter()
        self.forward_batches = 0
        self.rows: deque[int] = deque(maxlen=1000)
        self.waiting = 0
        self.held = 0
        self.busy = False

    # One forward batch per call, one call at a time -----------------------------------------------

    async def _forward(self, rows: int, job: Callable[[], Any]) -> Any:
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            while self._gate is not None:  # test control: hold calls here until released
                self.held += 1
                try:
                    await self._gate.wait()
                finally:
                    self.held -= 1
            self.busy = True
            self.forward_batches += 1
            self.rows.append(rows)
            return await asyncio.get_running_loop().run_in_executor(self._executor, job)
        finally:
            self.busy = False
            self._lock.release()

    def _generator(self) -> Generator:
        if self.generator is None:
            raise BadRequest("No generative model is loaded (start with --tiny or --model PATH).", "model", status=404)
        return self.generator

    def _check_context(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        gen = self._generator()
        if prompt_tokens + max_tokens > gen.context:
            raise BadRequest(
                f"This model's maximum context length is {gen.context} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} for the "
                f"completion). Please reduce the length of the {param} or the completion.",
                param,
                "context_length_exceeded",
            )

    def _complete_rows(self, prompts: list[list[int]], limits: list[int], s: _Sampling) -> list[tuple[str, int, str]]:
        """(text, completion tokens, finish reason) per row, in the forward thread."""
        gen = self._generator()
        out = []
        for ids, ended in gen.generate(prompts, limits, s.temperature, s.top_p, s.seed):
            text = gen.decode(ids)
            finish = "stop" if ended else "length"
            cut = min((i for i in (text.find(stop) for stop in s.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                out.append((text, len(gen.encode(text)) if text else 0, finish))
            else:
                out.append((text, len(ids), finish))
        return out

    # Endpoints ---------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        gen = self._generator()
        s = _sampling(body, self.max_tokens_limit)
        if body.get("stream"):
            raise BadRequest("The reference backend does not stream.", "stream")
        echo = body.get("echo") is True
        prompts = _prompts(body.get("prompt"))
        encoded = [gen.encode(p) for p in prompts]
        for ids in encoded:
            self._check_context(len(ids), s.max_tokens, "prompt")
        texts = [p if isinstance(p, str) else gen.decode(p) for p in prompts]
        rows = [ids for ids in encoded for _ in range(s.n)]

        def job() -> list[tuple[str, int, str]]:
            return self._complete_rows(rows, [s.max_tokens] * len(rows), s)

        done = await self._forward(len(rows), job)
        choices, per_input = [], []
        for p, ids in enumerate(encoded):
            completion = 0
            for j in range(s.n):
                text, tokens, finish = done[p * s.n + j]
                completion += tokens
                choices.append(
                    {
                        "index": p * s.n + j,
                        "text": texts[p] + text if echo else text,
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                )
            per_input.append(_usage(len(ids), completion))
        reply = {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": gen.name,
            "choices": choices,
        }
        return _json(self._with_usage(reply, per_input))

    def _with_usage(self, reply: dict[str, Any], per_input: list[dict[str, int]]) -> dict[str, Any]:
        prompt = sum(u["prompt_tokens"] for u in per_input)
        if all("completion_tokens" in u for u in per_input):
            reply["usage"] = _usage(prompt, sum(u["completion_tokens"] for u in per_input))
        else:
            reply["usage"] = _usage(prompt)
        if self.usage == "per_item":
            reply["usage_per_input"] = per_input
        return reply

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.embedder is None:
            raise BadRequest("No embedding model is loaded.", "model", status=404)
        embedder = self.embedder
        value = body.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'input' must be a string or a non-empty list of strings.", "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != embedder.dimensions:
            raise BadRequest(f"This model only makes {embedder.dimensions}-dimensional embeddings.", "dimensions")

        def job() -> tuple[Any, list[int]]:
            return embedder.embed(texts)

        vectors, tokens = await self._forward(len(texts), job)
        data = []
        for i, vec in enumerate(vectors):
            if fmt == "base64":
                emb: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode()
            else:
                emb = vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        reply = {"object": "list", "data": data, "model": embedder.name}
        return _json(self._with_usage(reply, [_usage(t) for t in tokens]))

    def _chat_request(self, body: Any) -> tuple[list[int], _Sampling]:
        if not isinstance(body, dict):
            raise BadRequest("Each request must be a JSON object.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of message objects.", "messages")
        if body.get("stream"):
            raise BadRequest("The reference backend does not stream.", "stream")
        gen = self._generator()
        s = _sampling(body, self.max_tokens_limit)
        ids = gen.encode(gen.chat_prompt(messages))
        self._check_context(len(ids), s.max_tokens, "messages")
        return ids, s

    def _chat_reply(self, outs: list[tuple[str, int, str]], prompt_tokens: int, usage: bool) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._generator().name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                for i, (text, _, finish) in enumerate(outs)
            ],
        }
        if usage:
            reply["usage"] = _usage(prompt_tokens, sum(tokens for _, tokens, _ in outs))
        return reply

    async def chat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids, s = self._chat_request(body)
        rows = [ids] * s.n
        done = await self._forward(len(rows), lambda: self._complete_rows(rows, [s.max_tokens] * len(rows), s))
        return _json(self._chat_reply(done, len(ids), True))

    async def batch_chat(self, request: web.Request) -> web.Response:
        """{"requests": [chat bodies]} → {"responses": [{"status_code", "body"}]}, one forward batch
        per distinct (temperature, top_p, seed) among the valid requests."""
        body = await self._body(request)
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise BadRequest("'requests' must be a non-empty list of chat completion requests.", "requests")
        parsed: list[tuple[list[int], _Sampling] | BadRequest] = []
        for req in requests:
            try:
                parsed.append(self._chat_request(req))
            except BadRequest as e:
                parsed.append(e)
        valid = [i for i, p in enumerate(parsed) if not isinstance(p, BadRequest)]

        def job() -> dict[int, list[tuple[str, int, str]]]:
            groups: dict[tuple[Any, ...], list[int]] = {}
            for i in valid:
                s = parsed[i][1]  # type: ignore[index]
                groups.setdefault((s.temperature, s.top_p, s.seed), []).append(i)
            results: dict[int, list[tuple[str, int, str]]] = {}
            for members in groups.values():
                rows, limits, owners = [], [], []
                for i in members:
                    ids, s = parsed[i]  # type: ignore[misc]
                    rows += [ids] * s.n
                    limits += [s.max_tokens] * s.n
                    owners += [i] * s.n
                first = parsed[members[0]][1]  # type: ignore[index]
                for owner, out in zip(owners, self._complete_rows(rows, limits, first), strict=True):
                    results.setdefault(owner, []).append(out)
            return results

        done = await self._forward(sum(parsed[i][1].n for i in valid), job) if valid else {}  # type: ignore[index]
        responses, per_item = [], []
        for i, p in enumerate(parsed):
            if isinstance(p, BadRequest):
                responses.append({"status_code": p.status, "body": p.body()})
                continue
            reply = self._chat_reply(done[i], len(p[0]), self.usage == "per_item")
            per_item.append(_usage(len(p[0]), sum(t for _, t, _ in done[i])))
            responses.append({"status_code": 200, "body": reply})
        out: dict[str, Any] = {"responses": responses}
        if self.usage != "per_item" and per_item:
            out["usage"] = _usage(
                sum(u["prompt_tokens"] for u in per_item), sum(u["completion_tokens"] for u in per_item)
            )
        return _json(out)

    async def models(self, request: web.Request) -> web.Response:
        names = [m.name for m in (self.generator, self.embedder) if m is not None]
        return _json({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "reference"} for n in names]})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(
            {
                "calls": dict(self.calls),
                "forward_batches": self.forward_batches,
                "rows": list(self.rows),
                "waiting": self.waiting,
                "held": self.held,
                "busy": self.busy,
                "usage": self.usage,
            }
        )

    async def control(self, request: web.Request) -> web.Response:
        """Test control: {"hold": bool, "usage": "per_item"|"aggregate", "reset": bool}."""
        if not self.test_controls:
            raise BadRequest("Test controls are off (start with --test-controls).", status=404)
        body = await request.json(loads=orjson.loads)
        if "usage" in body:
            if body["usage"] not in ("per_item", "aggregate"):
                raise BadRequest("'usage' must be 'per_item' or 'aggregate'.", "usage")
            self.usage = body["usage"]
        if body.get("hold") is True and self._gate is None:
            self._gate = asyncio.Event()
        elif body.get("hold") is False and self._gate is not None:
            self._gate.set()
            self._gate = None
        if body.get("reset"):
            self.calls.clear()
            self.rows.clear()
            self.forward_batches = 0
        return await self.stats(request)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        self.calls[request.path.removeprefix("/v1")] += 1
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        return body

    def app(self) -> web.Application:
        @web.middleware
        async def openai_errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            try:
                return await handler(request)
            except BadRequest as e:
                return _json(e.body(), e.status)
            except web.HTTPException:
                raise
            except Exception as e:
                log.exception("forward failed")
                return _json(BadRequest(f"The model failed: {type(e).__name__}", status=500).body(), 500)

        app = web.Application(middlewares=[openai_errors], client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/completions", self.completions)
            app.router.add_post(f"{prefix}/embeddings", self.embeddings)
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_post(f"{prefix}/batch/chat/completions", self.batch_chat)
            app.router.add_get(f"{prefix}/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/healthz", self.stats)
        app.router.add_post("/control", self.control)
        return app


def build_backend(args: argparse.Namespace) -> ReferenceBackend:
    _offline()
    import torch

    torch.set_num_threads(args.torch_threads)
    generator = None
    if args.tiny:
        model, tokenizer = tiny_causal_lm(args.seed)
        generator = Generator(model, tokenizer, args.served_model_name or TINY_MODEL_NAME)
    elif args.model:
        model, tokenizer = load_causal_lm(args.model)
        generator = Generator(model, tokenizer, args.served_model_name or Path(args.model).name)
    embedder = None
    if not args.no_embeddings:
        path = args.embedding_model or str(minilm_path(args.cache_dir))
        embedder = Embedder(path, EMBEDDING_MODEL_NAME if not args.embedding_model else Path(path).name)
    if generator is None and embedder is None:
        raise SystemExit("nothing to serve: pass --tiny or --model PATH, or leave embeddings on")
    return ReferenceBackend(generator, embedder, args.usage, args.test_controls, args.max_tokens_limit)


def run(args: argparse.Namespace) -> int:
    backend = build_backend(args)
    served = ", ".join(m.name for m in (backend.generator, backend.embedder) if m is not None)
    print(f"reference backend serving {served} on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(backend.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0
