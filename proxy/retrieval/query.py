"""The retrieval query of a chat request: the last user message, and a fingerprint of what came
before it (system prompt, earlier turns), so a follow-up such as "and in Python?" only ever matches
an entry made in the same conversation, never a standalone one."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.wire.content import text_only

_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s?!.。？！]+$")
_SYSTEM_ROLES = frozenset({"system", "developer"})


def normalize(text: str) -> str:
    """The form two texts share when only case, spacing or trailing punctuation differ."""
    return _TRAILING.sub("", _SPACE.sub(" ", text).strip().lower())


def text_key(text: str) -> str:
    """The exact-match key of a normalised text."""
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class RetrievalQuery:
    text: str  # the last user message
    context: str  # "" when the message stands alone, else a fingerprint of the conversation before it
    key: str  # text_key(text)


def query_from_chat(body: dict[str, Any], system_prompt: str = "match") -> RetrievalQuery | None:
    """The query of a chat request, or None when the request is not a text question from a user."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = text_only(last.get("content"))
    if text is None or not text.strip():
        return None
    before = []
    for m in messages[:-1]:
        if not isinstance(m, dict):
            return None
        role = m.get("role")
        if role in _SYSTEM_ROLES and system_prompt == "ignore":
            continue
        content = text_only(m.get("content"))
        if content is None and (m.get("tool_calls") or m.get("content") is not None):
            content = orjson.dumps(m, option=orjson.OPT_SORT_KEYS).decode()
        before.append((role, normalize(content or "")))
    context = ""
    if before:
        context = hashlib.blake2b(orjson.dumps(before), digest_size=12).hexdigest()
    return RetrievalQuery(text=text.strip(), context=context, key=text_key(text))
