"""Request validation: the body is a JSON object of the right shape for its endpoint.

Only what the proxy relies on, or what would waste an upstream call, is checked here; every other
field passes through untouched. Fields that would let a client choose the upstream are refused
(proxy/steps/upstream_fields.py).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import InvalidRequest
from proxy.pipeline.context import Endpoint, RequestContext
from proxy.steps.upstream_fields import forbidden_field
from proxy.wire.json_body import parse_body

_JSON_TYPES = {str: "a string", bool: "a boolean", float: "a number", list: "an array", dict: "an object"}
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 128
# OpenAI's limits for `metadata`: at most 16 pairs of strings, keys up to 64 and values up to 512 chars.
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(body: dict, name: str, upper: int | None = None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_int(v) or v < 1:
        # Name the type, never echo a string: a client's text does not belong in error bodies (or logs).
        got = v if _is_int(v) else _JSON_TYPES.get(type(v), "a value")
        raise InvalidRequest(f"'{name}' must be a positive integer, got {got}.", param=name)
    if upper is not None and v > upper:
        raise InvalidRequest(f"'{name}' must be at most {upper}, got {v}.", param=name)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of message objects.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object.", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}.", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list):
            _check_parts(content, i)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"'messages[{i}].name' must be a string.", param=f"messages[{i}].name")


def _check_parts(parts: list, i: int) -> None:
    for j, p in enumerate(parts):
        param = f"messages[{i}].content[{j}]"
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise InvalidRequest(f"'{param}' must be an object with a string 'type'.", param=param)
        if p["type"] == "text" and not isinstance(p.get("text"), str):
            raise InvalidRequest(f"'{param}.text' must be a string.", param=f"{param}.text")


def _check_prompt(value: Any, name: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value) or all(_is_int(x) for x in value):
            return
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
            return
    raise InvalidRequest(
        f"'{name}' must be a string, an array of strings, or an array of token arrays (non-empty).", param=name
    )


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if (
        not isinstance(metadata, dict)
        or len(metadata) > _METADATA_PAIRS
        or not all(
            len(k) <= _METADATA_KEY and isinstance(v, str) and len(v) <= _METADATA_VALUE for k, v in metadata.items()
        )
    ):
        raise InvalidRequest(
            f"'metadata' must be an object of at most {_METADATA_PAIRS} string values (keys up to "
            f"{_METADATA_KEY} characters, values up to {_METADATA_VALUE}).",
            param="metadata",
        )


class ValidateRequest:
    """Parse the JSON body and check its shape for the endpoint."""

    async def on_request(self, ctx: RequestContext) -> None:
        body = parse_body(ctx.raw)
        name = forbidden_field(body)
        if name is not None:
            raise InvalidRequest(
                f"'{name}' is not allowed: the proxy decides where requests go and with which credentials.",
                param=name,
                code="forbidden_field",
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
        if ctx.endpoint == Endpoint.CHAT:
            if "messages" not in body:
                raise InvalidRequest("'messages' is required.", param="messages")
            _check_messages(body["messages"])
            for defs in ("tools", "functions"):
                value = body.get(defs)
                if value is not None and not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
                    raise InvalidRequest(f"'{defs}' must be an array of objects.", param=defs)
        elif ctx.endpoint == Endpoint.COMPLETIONS:
            if "prompt" not in body:
                raise InvalidRequest("'prompt' is required.", param="prompt")
            _check_prompt(body["prompt"], "prompt")
        elif ctx.endpoint == Endpoint.EMBEDDINGS:
            if "input" not in body:
                raise InvalidRequest("'input' is required.", param="input")
            _check_prompt(body["input"], "input")
        _check_metadata(body.get("metadata"))
        _positive_int(body, "max_tokens")
        _positive_int(body, "max_completion_tokens")
        _positive_int(body, "n", MAX_N)
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", param="stream")
        if stream and ctx.endpoint == Endpoint.EMBEDDINGS:
            raise InvalidRequest("Embeddings cannot be streamed.", param="stream")
        opts = body.get("stream_options")
        if opts is not None:
            if not isinstance(opts, dict):
                raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
            if not stream:
                raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
            ctx.include_usage = opts.get("include_usage") is True
        ctx.body = body
        ctx.stream = stream
        ctx.model_requested = ctx.model = model
