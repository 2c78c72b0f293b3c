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

    def read_usage(self) -> UpstreamReply:
        """Fill `usage` from the reply's own usage object (any supported shape)."""
        if self.usage is None and self.data is not None:
            self.usage = usage_from(self.data.get("usage"))
        return self


def stream_reply(events: list[bytes], usage: Any) -> UpstreamReply:
    """A finished (or broken-off) stream: what was relayed, and the usage its events carried, if any."""
    return UpstreamReply(None, b"", usage_from(usage), events)
