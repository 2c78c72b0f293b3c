"""The wire formats the gateway serves, by path and by canonical endpoint."""

from __future__ import annotations

from proxy.wire.adapter import WireAdapter
from proxy.wire.chat import CHAT
from proxy.wire.completions import COMPLETIONS
from proxy.wire.embeddings import EMBEDDINGS
from proxy.wire.messages_api import MESSAGES, MESSAGES_COUNT_TOKENS
from proxy.wire.responses_api import RESPONSES, RESPONSES_INPUT_TOKENS

ADAPTERS: tuple[WireAdapter, ...] = (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    RESPONSES_INPUT_TOKENS,
    MESSAGES,
    MESSAGES_COUNT_TOKENS,
)
BY_PATH: dict[str, WireAdapter] = {path: a for a in ADAPTERS for path in a.paths}
BY_ENDPOINT: dict[str, WireAdapter] = {a.endpoint: a for a in ADAPTERS}
