"""The request log file (`log: {requests: PATH}`): buffered JSON lines, written by a background task,
never on the request's path; shared across reloads while the path stays the same."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("llm_proxy.request_log")

_FLUSH_EVERY_S = 0.5


class RequestLogWriter:
    """Appends buffered lines to the log file; shared across reloads while the path stays the same."""

    def __init__(self, path: str):
        self.path = path
        self._lines: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def append(self, line: bytes) -> None:
        self._lines.append(line)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_FLUSH_EVERY_S)  # batch the lines of half a second into one write
        self._task = None
        self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data, self._lines = b"".join(self._lines), []
        try:
            with open(self.path, "ab") as f:
                f.write(data)
        except OSError as e:
            log.error("cannot write the request log %s: %s", self.path, e.strerror)
