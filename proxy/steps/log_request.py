"""The request log (`log: {requests: PATH}`): one JSON line per request, replayable with
`llm-numbers-proxy replay`. Prompt text (messages, prompt, input) is left out unless
`include_prompts: true`; the prompt's token count is kept so replay can still price it.
Lines are buffered and written by a background task, never on the request's path."""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.config.models import LogConfig
from proxy.pipeline.context import RequestContext
from proxy.pipeline.step import Step
from proxy.services.request_log import RequestLogWriter

_PROMPT_FIELDS = ("messages", "prompt", "input", "tools", "functions")


class LogRequests(Step):
    """Append one JSON line per request to the request log (prompt text only when allowed)."""

    def __init__(self, cfg: LogConfig, writer: RequestLogWriter):
        self._include_prompts = cfg.include_prompts
        self._writer = writer

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.dry_run or not ctx.body:
            return
        body: dict[str, Any] = ctx.body
        if not self._include_prompts:
            body = {k: v for k, v in body.items() if k not in _PROMPT_FIELDS}
        record = {
            "ts": round(time.time(), 3),
            "request_id": ctx.request_id,
            "team": ctx.team,
            "endpoint": ctx.endpoint,
            "status": ctx.status,
            "model_chosen": ctx.answered_by or ctx.model,
            "route": ctx.route,
            "policies": ctx.policies,
            "prompt_tokens": ctx.prompt_tokens,
            # counted: the upstream reported no usage, so these are the proxy's own count (its tokenizer)
            "usage": {
                "prompt_tokens": ctx.input_tokens,
                "completion_tokens": ctx.output_tokens,
                "counted": ctx.usage is not None and ctx.usage.counted,
            },
            "cost_usd": ctx.billed(),
            "saved_usd": ctx.saved,
            "body": {**body, "model": ctx.model_requested},
        }
        if self._include_prompts:
            del record["prompt_tokens"]  # the text is there: replay counts it under its own policy
        self._writer.append(orjson.dumps(record) + b"\n")
