"""Request validation: the body is a JSON object of the right shape for its endpoint.

The fields every format shares are checked here, the format's own by its wire adapter. Only what
the proxy relies on, or what would waste an upstream call, is checked here; every other
field passes through untouched. Fields that would let a client choose the upstream are refused
(proxy/wire/upstream_fields.py).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.errors import InvalidRequest
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.wire.adapter import is_int
from proxy.wire.formats import BY_ENDPOINT
from proxy.wire.json_body import parse_body
from proxy.wire.upstream_fields import forbidden_field

_JSON_TYPES = {str: "a string", bool: "a boolean", float: "a number", list: "an array", dict: "an object"}
MAX_N = 128
MAX_MODEL_CHARS = 256
# The model name is copied into response headers and log lines: no control characters (a line break or NUL
# there would break the response), and a bounded length.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# OpenAI's limits for `metadata`: at most 16 pairs of strings, keys up to 64 and values up to 512 chars.
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


def _positive_int(body: dict, name: str, upper: int | None = None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not is_int(v) or v < 1:
        # Name the type, never echo a string: a client's text does not belong in error bodies (or logs).
        got = v if is_int(v) else _JSON_TYPES.get(type(v), "a value")
        raise InvalidRequest(f"'{name}' must be a positive integer, got {got}.", param=name)
    if upper is not None and v > upper:
        raise InvalidRequest(f"'{name}' must be at most {upper}, got {v}.", param=name)


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


class ValidateRequest(Step):
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
        if len(model) > MAX_MODEL_CHARS or _CONTROL.search(model):
            raise InvalidRequest(
                f"'model' must be at most {MAX_MODEL_CHARS} characters without control characters (line breaks, NUL).",
                param="model",
                code="invalid_model",
            )
        wire = ctx.wire or BY_ENDPOINT[ctx.endpoint]
        wire.validate(body)  # the format's own fields
        ctx.upstream_headers = wire.upstream_headers(ctx.headers)  # validated where they enter
        _check_metadata(body.get("metadata"))
        _positive_int(body, "max_tokens")
        _positive_int(body, "max_completion_tokens")
        _positive_int(body, "n", MAX_N)
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean.", param="stream")
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
