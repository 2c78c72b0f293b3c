"""A request body as a JSON object the proxy can also serialise again, or a 400."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import InvalidRequest

# orjson parses up to 1024 levels but serialises at most 255; the proxy re-serialises every body it
# forwards or logs (inside one more object), so deeper bodies are refused here with a clear 400.
MAX_DEPTH = 128


def _depth_over(value: Any, limit: int) -> bool:
    """Whether `value` nests arrays and objects deeper than `limit` (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values() if isinstance(x, dict | list))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v if isinstance(x, dict | list))
    return False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object the proxy can also serialise again, or a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e.args[0]}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Counting brackets is cheap and bounds the depth from above: most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_over(body, MAX_DEPTH):
        raise InvalidRequest(f"The request body nests arrays and objects deeper than {MAX_DEPTH} levels.")
    return body
