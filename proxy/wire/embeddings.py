"""Embeddings (`POST /v1/embeddings`): input text(s) or token ids in, a list of vectors out; never streamed."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadGateway, InvalidRequest
from proxy.wire.adapter import Counter, Endpoint, OpenAIWire, check_prompt, prompts_in


class EmbeddingsWire(OpenAIWire):
    endpoint = Endpoint.EMBEDDINGS
    paths = ("/v1/embeddings", "/embeddings")
    prompt_param = "input"

    def validate(self, body: dict[str, Any]) -> None:
        if "input" not in body:
            raise InvalidRequest("'input' is required.", param="input")
        check_prompt(body["input"], "input")
        if body.get("stream") is True:
            raise InvalidRequest("Embeddings cannot be streamed.", param="stream")

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        return counter.prompt(body["input"]), prompts_in(body["input"])

    def check_reply(self, data: dict[str, Any]) -> None:
        if not isinstance(data.get("data"), list):
            raise BadGateway("The upstream's embeddings reply has no 'data' list.")

    def reply_text(self, data: dict[str, Any]) -> str:
        return ""  # nothing is generated: an embedding has no output tokens

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        return orjson.dumps(answer), False


EMBEDDINGS = EmbeddingsWire()
