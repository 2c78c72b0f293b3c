"""Running the proxy under uvicorn, with a graceful shutdown on SIGTERM (or SIGINT).

Shutdown order: the listening socket closes at once, so new connections are refused; requests in
flight finish (streams included) for up to `--graceful-timeout` seconds, after which they are
cancelled and still settle what they used; then the app's lifespan closes, which flushes spend
(and the fail-open journal) to the store; the process exits 0.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT outside uvicorn's own handling: after its graceful shutdown (it re-raises the
    signal it stopped on) nothing is left to do; before it serves, there is nothing to drain."""
    raise SystemExit(0)


def _exit_zero_after_shutdown() -> None:
    # With the default handler uvicorn's re-raised signal would end a clean shutdown with status 143.
    # uvicorn restores this handler before re-raising.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)


def run_single(app: Any, options: dict[str, Any]) -> None:
    """One process serving `app`."""
    _exit_zero_after_shutdown()
    uvicorn.run(app, **options)


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, closing its own copy of the listening socket when told to stop.

    The parent holds the socket for the workers' whole life. Without this, connections opened while
    the workers drain would wait in the kernel's backlog until the parent exits, instead of being
    refused: the socket closes only when its last holder closes it."""

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()


def run_workers(factory: str, workers: int, options: dict[str, Any]) -> None:
    """`workers` processes, each building its app from the import string `factory`."""
    config = uvicorn.Config(factory, factory=True, workers=workers, **options)
    sock = config.bind_socket()
    _Supervisor(config, sockets=[sock]).run()
