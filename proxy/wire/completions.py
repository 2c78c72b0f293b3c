"""Completions (`POST /v1/completions`): a prompt (or a batch of them) in, a text_completion out."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadGateway, InvalidRequest
from proxy.wire.adapter import Counter, Endpoint, OpenAIWire, check_prompt, prompts_in
from proxy.wire.content import reply_text


class CompletionsWire(OpenAIWire):
    endpoint = Endpoint.COMPLETIONS
    paths = ("/v1/completions", "/completions")
    prompt_param = "prompt"

    def validate(self, body: dict[str, Any]) -> None:
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required.", param="prompt")
        check_prompt(body["prompt"], "prompt")

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        return counter.prompt(body["prompt"]), prompts_in(body["prompt"])

    def check_reply(self, data: dict[str, Any]) -> None:
        if not isinstance(data.get("choices"), list):
            raise BadGateway("The upstream's reply has no 'choices' list.")

    def reply_text(self, data: dict[str, Any]) -> str:
        return reply_text(data)

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        return orjson.dumps(answer), False


COMPLETIONS = CompletionsWire()
