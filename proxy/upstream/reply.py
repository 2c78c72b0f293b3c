"""The normalised reply every upstream returns: the parsed JSON (or, for a stream, the events relayed),
the raw bytes to relay, and the usage as the upstream reported it (None when it reported none: the
estimator then counts it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.wire.usage import TokenUsage, usage_from


@dataclass(slots=True)
class UpstreamReply:
    data: dict[str, Any] | None
    raw: bytes
    usage: TokenUsage | None = None
    events: list[bytes] | None = None  # a stream's relayed events
    batched: bool = False  # answered as part of a micro-batch
    translated: bool = False  # made by the proxy from a chat reply (the upstream does not speak the format)

    def read_usage(self) -> UpstreamReply:
        """Fill `usage` from the reply's own usage object (any supported shape)."""
        if self.usage is None and self.data is not None:
            self.usage = usage_from(self.data.get("usage"))
        return self


def stream_reply(
    events: list[bytes], usage: Any, final: dict[str, Any] | None = None, translated: bool = False
) -> UpstreamReply:
    """A finished (or broken-off) stream: what was relayed, the usage its events carried, if any, and the
    finished object it ended with (a Response), if its format has one."""
    return UpstreamReply(final, b"", usage_from(usage), events, translated=translated)
