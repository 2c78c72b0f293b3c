"""Hot reload of the policy file: on a file change, SIGHUP, or POST /admin/reload.

The new file is validated in full and a complete runtime is built from it before the swap; on any
error the running config stays, the error is logged with file:line, and counted. Requests in flight
finish under the runtime they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from proxy import metrics
from proxy.config.loader import ConfigError, load_policy_file
from proxy.config.models import PolicyFile

log = logging.getLogger("llm_proxy.reload")


class Reloader:
    def __init__(self, path: str, apply: Callable[[PolicyFile], None]):
        self.path = Path(path)
        self._apply = apply
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: str | None = None
        self.generation = 0

    async def reload(self, reason: str) -> list[str]:
        """Reload now; the errors that kept the running config (empty on success)."""
        async with self._lock:
            try:
                policy = load_policy_file(self.path)
                self._apply(policy)
            except ConfigError as e:
                self.last_error = str(e)
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.error("policy reload (%s) rejected, keeping the running config:\n%s", reason, e)
                return [str(i) for i in e.issues]
            except Exception as e:  # a runtime that cannot be built is as bad as an invalid file
                self.last_error = f"{type(e).__name__}: {e}"
                metrics.CONFIG_RELOADS.labels("error").inc()
                log.exception("policy reload (%s) failed, keeping the running config", reason)
                return [self.last_error]
            self.last_error = None
            self.generation += 1
            metrics.CONFIG_RELOADS.labels("success").inc()
            log.info("policy reloaded (%s) from %s", reason, self.path)
            return []

    def start(self, watch: bool = True) -> None:
        loop = asyncio.get_running_loop()
        # Not possible off the main thread or on platforms without signals: reload by file or admin call then.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self._tasks.append(loop.create_task(self.reload("SIGHUP"))))
        if watch:
            self._tasks.append(loop.create_task(self._watch()))

    async def _watch(self) -> None:
        from watchfiles import awatch

        # Watch the directory: editors and Kubernetes ConfigMaps replace the file (or a symlink to it).
        directory = self.path.resolve().parent
        names = {self.path.name, "..data"}
        async for _ in awatch(
            directory,
            debounce=200,
            step=50,
            recursive=False,
            watch_filter=lambda _change, path: Path(path).name in names,
        ):
            await self.reload("file changed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
