"""Retries with tenacity: connect errors, timeouts, 429 and 5xx; exponential backoff with jitter,
`Retry-After` honoured, bounded attempts and total time.

The first attempt runs without tenacity (it costs ~30 µs per request to set up, and most requests
never retry); tenacity takes over from the first retryable failure.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from proxy.config.models import RetryConfig
from proxy.errors import BadGateway, GatewayTimeout, ProxyError, UpstreamHTTPError, UpstreamUnavailable

T = TypeVar("T")


class RetryableUpstreamError(Exception):
    """A failure worth another attempt: connect error, timeout, 429 or 5xx."""

    def __init__(
        self, kind: str, message: str, *, status: int | None = None, body: bytes = b"", retry_after: float | None = None
    ):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.body = body
        self.retry_after = retry_after

    def as_proxy_error(self, model: str | None = None) -> ProxyError:
        """What the client sees once retries and fallbacks are exhausted (`model`: the configured model
        that failed last, named so an operator knows which entry of the policy file to look at)."""
        of = f" of model '{model}'" if model else ""
        if self.kind == "timeout":
            return GatewayTimeout(f"The upstream{of} did not answer in time: {self}")
        if self.kind == "connect":
            hint = f": is the server at models.{model}.api_base running and reachable from the proxy?" if model else ""
            return UpstreamUnavailable(f"Cannot reach the upstream{of} ({self}){hint}")
        if self.status is not None and self.body[:1] == b"{" and b'"error"' in self.body:
            headers = {"retry-after": str(int(self.retry_after + 0.999))} if self.retry_after else {}
            return UpstreamHTTPError(self.status, self.body, headers)
        return BadGateway(f"The upstream failed: {self}")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Backoff:
    """Exponential backoff with jitter, but never shorter than the upstream's Retry-After."""

    def __init__(self, cfg: RetryConfig, deadline: float):
        self._exp = wait_exponential_jitter(
            multiplier=cfg.initial_backoff_s, max=cfg.max_backoff_s, jitter=cfg.initial_backoff_s
        )
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None) or 0.0
        wait = max(retry_after, self._exp(state))
        return max(0.0, min(wait, self._deadline - time.monotonic()))


class _StopWhen:
    def __init__(self, cfg: RetryConfig, deadline: float):
        self._attempts = stop_after_attempt(cfg.max_attempts)
        self._cfg = cfg
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        if self._attempts(state) or time.monotonic() >= self._deadline:
            return True
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        # A long Retry-After means "not soon": better to move on to a fallback than to wait.
        return retry_after is not None and (
            retry_after > self._cfg.max_retry_after_s or time.monotonic() + retry_after > self._deadline
        )


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    cfg: RetryConfig,
    on_retry: Callable[[RetryableUpstreamError], None] | None = None,
) -> T:
    started = time.monotonic()
    try:
        return await attempt()
    except RetryableUpstreamError as e:
        first = e
    deadline = started + cfg.max_total_s
    pending = [first]

    async def replay_then_attempt() -> T:
        # Tenacity counts the failed first attempt as its own first, so backoff and stop rules line up.
        if pending:
            raise pending.pop()
        return await attempt()

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(exc, RetryableUpstreamError):
            on_retry(exc)

    retrying = AsyncRetrying(
        stop=_StopWhen(cfg, deadline),
        wait=_Backoff(cfg, deadline),
        retry=retry_if_exception_type(RetryableUpstreamError),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(replay_then_attempt)
