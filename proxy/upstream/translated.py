"""A request in a format its upstream does not speak (the Responses API or Anthropic Messages to a Chat
Completions server): sent as the chat request it translates to, answered in the client's format. The
translation itself is the wire adapter's; this module only runs it around an upstream call or stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.upstream.reply import UpstreamReply
from proxy.wire.adapter import ChatStreamTranslator, WireAdapter
from proxy.wire.chat import CHAT
from proxy.wire.usage import usage_from


def reply_in_format(
    wire: WireAdapter, chat_reply: UpstreamReply, body: dict[str, Any], prompt_tokens: int
) -> UpstreamReply:
    """A chat reply as the client's format; usage is read from the chat reply (its details are exact there:
    cached and reasoning tokens, which Anthropic's usage shape has no field for)."""
    CHAT.check_reply(chat_reply.data or {})  # a bad chat reply is the upstream's fault: a fallback may help
    data = wire.reply_from_chat(chat_reply.data or {}, body, prompt_tokens)
    usage = chat_reply.usage or usage_from((chat_reply.data or {}).get("usage"))
    return UpstreamReply(data, orjson.dumps(data), usage, translated=True)


class TranslatedStream:
    """A chat SSE stream relayed as the client's format's stream, run by run."""

    translated = True

    def __init__(self, stream: Any, translator: ChatStreamTranslator):
        self._stream = stream
        self._translator = translator

    @property
    def usage(self) -> dict[str, Any] | None:
        """The chat usage the stream carried (exact for cached and reasoning tokens)."""
        return self._translator.usage

    async def events(self) -> AsyncIterator[bytes]:
        yield self._translator.start()
        async for run in self._stream.events():
            out = self._translator.feed(run)
            if out:
                yield out
        yield self._translator.finish()

    def close(self) -> None:
        self._stream.close()
