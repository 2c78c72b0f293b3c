"""Request validation: the body is a JSON object of the right shape for its endpoint.

Only what the proxy relies on, or what would waste an upstream call, is checked here; every other
field passes through untouched. Fields that would let a client choose the upstream are refused.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import InvalidRequest
from proxy.pipeline import Endpoint, RequestContext

# Fields some SDKs and gateways honour to pick the upstream, its credentials or its headers.
FORBIDDEN_FIELDS = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "custom_llm_provider",
        "extra_headers",
        "headers",
        "organization",
        "azure_ad_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_region_name",
        "vertex_project",
        "vertex_location",
        "vertex_credentials",
        "litellm_params",
        "user_config",
        "mock_response",
    }
)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 128


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(body: dict, name: str, upper: int | None = None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_int(v) or v < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer, got {orjson.dumps(v).decode()[:40]}.", param=name)
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
        if role not in _ROLES:
            raise InvalidRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}.", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )


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


class ValidateRequest:
    """Parse the JSON body and check its shape for the endpoint."""

    async def on_request(self, ctx: RequestContext) -> None:
        try:
            body = orjson.loads(ctx.raw)
        except orjson.JSONDecodeError as e:
            raise InvalidRequest(f"The request body is not valid JSON: {e.args[0]}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        forbidden = FORBIDDEN_FIELDS.intersection(body)
        if forbidden:
            name = sorted(forbidden)[0]
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
            tools = body.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise InvalidRequest("'tools' must be an array.", param="tools")
        elif ctx.endpoint == Endpoint.COMPLETIONS:
            if "prompt" not in body:
                raise InvalidRequest("'prompt' is required.", param="prompt")
            _check_prompt(body["prompt"], "prompt")
        elif ctx.endpoint == Endpoint.EMBEDDINGS:
            if "input" not in body:
                raise InvalidRequest("'input' is required.", param="input")
            _check_prompt(body["input"], "input")
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
