"""Errors the proxy answers with, each carrying its HTTP status and OpenAI error shape.

Raise a subclass anywhere on the request path; the gateway turns it into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ExceedsModelMemory(InvalidRequest):
    """A request whose prompt plus max output tokens can never fit a self-hosted model's GPU memory."""

    code = "exceeds_model_memory"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"
    type = "insufficient_quota"


class PolicyRejected(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "policy_rejected"

    def __init__(self, message: str, status: int, **kw):
        super().__init__(message, **kw)
        self.status = status


class StoreDown(ProxyError):
    """The shared store is unreachable and the policy says fail_closed."""

    status = 503
    type = "api_error"
    code = "store_unavailable"


class BadGateway(ProxyError):
    """The upstream answered with something that is not a valid OpenAI response."""

    status = 502
    type = "upstream_error"
    code = "bad_upstream_response"


class UpstreamUnavailable(ProxyError):
    status = 503
    type = "upstream_error"
    code = "upstream_unavailable"


class GatewayTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class UpstreamMisconfigured(ProxyError):
    """The policy file's upstream settings cannot work (an unknown provider, a missing credential): the
    operator's mistake, not the client's, so never a 4xx the client would take for its own."""

    status = 500
    type = "api_error"
    code = "upstream_misconfigured"


class UpstreamHTTPError(ProxyError):
    """An upstream error response relayed as-is (status and OpenAI-shaped body)."""

    type = "upstream_error"

    def __init__(self, status: int, raw_body: bytes, headers: dict[str, str] | None = None):
        super().__init__(f"upstream returned HTTP {status}", headers=headers)
        self.status = status
        self.raw_body = raw_body

    def body(self) -> bytes:
        return self.raw_body
