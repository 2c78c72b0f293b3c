"""OpenAI's Responses API (`POST /v1/responses`, `POST /v1/responses/input_tokens`) as a wire adapter: its
shape checks and prompt counting, its stream's usage (from `response.completed`), and the translation to and
from chat (proxy/wire/responses.py) for upstreams that serve only Chat Completions."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadGateway, InvalidRequest, NotFound, ProxyError
from proxy.wire import responses as translate
from proxy.wire import sse
from proxy.wire.adapter import Counter, Endpoint, OpenAIWire, UpstreamModel, is_int
from proxy.wire.sse_events import RelayedEvents

_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DELTAS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta", "response.reasoning_text.delta"}
)


class ResponsesAccount(RelayedEvents):
    """Watches a Responses stream: relays every event, keeps the finished response and its usage."""

    __slots__ = ()

    def _watch(self, events: bytes) -> None:
        if b'"response.completed"' in events or b'"response.incomplete"' in events or b'"response.failed"' in events:
            for data in sse.json_payloads([events]):
                if isinstance(data, dict) and data.get("type") in _TERMINAL and isinstance(data.get("response"), dict):
                    self.final = data["response"]
                    self.usage = self.final.get("usage")


def _check_input(value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidRequest("'input' must be a string or an array of input items (objects).", param="input")


def _text_of_output(response: dict[str, Any]) -> str:
    parts: list[str] = []
    for item in response.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            parts += [v for v in (item.get("name"), item.get("arguments")) if isinstance(v, str)]
        for part in item.get("content") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
    return "".join(parts)


class ResponsesWire(OpenAIWire):
    endpoint = Endpoint.RESPONSES
    paths = ("/v1/responses", "/responses")
    prompt_param = "input"
    conversational = True

    def validate(self, body: dict[str, Any]) -> None:
        if "input" not in body:
            raise InvalidRequest("'input' is required.", param="input")
        _check_input(body["input"])
        for name, kind, what in (
            ("instructions", str, "a string"),
            ("previous_response_id", str, "a string"),
            ("tools", list, "an array of tool objects"),
            ("text", dict, "an object"),
            ("reasoning", dict, "an object"),
            ("store", bool, "a boolean"),
        ):
            value = body.get(name)
            if value is not None and not isinstance(value, kind):
                raise InvalidRequest(f"'{name}' must be {what}.", param=name)
        if body.get("tools") and not all(isinstance(t, dict) for t in body["tools"]):
            raise InvalidRequest("'tools' must be an array of tool objects.", param="tools")
        limit = body.get("max_output_tokens")
        if limit is not None and (not is_int(limit) or limit < 1):
            raise InvalidRequest("'max_output_tokens' must be a positive integer.", param="max_output_tokens")

    def count_prompt(self, counter: Counter, body: dict[str, Any]) -> tuple[int, int]:
        instructions = body.get("instructions")
        try:
            messages = translate.input_messages(body["input"])
            tools = translate._tools(body["tools"]) if body.get("tools") else None
        except InvalidRequest:
            # Items only a native upstream takes (built-in tools, files by id): counted as their JSON text.
            return counter.text(orjson.dumps([instructions, body["input"], body.get("tools")]).decode()), 1
        if instructions:
            messages = [{"role": "system", "content": instructions}, *messages]
        return counter.chat_prompt(messages, tools), 1

    def check_reply(self, data: dict[str, Any]) -> None:
        if not isinstance(data.get("output"), list):
            raise BadGateway("The upstream's reply has no 'output' list: it is not a Response.")

    def reply_text(self, data: dict[str, Any]) -> str:
        return _text_of_output(data)

    def stream_text(self, events: list[bytes]) -> str:
        return "".join(
            d["delta"]
            for d in sse.json_payloads(events)
            if isinstance(d, dict) and d.get("type") in _DELTAS and isinstance(d.get("delta"), str)
        )

    def answer_bytes(
        self, answer: dict[str, Any], stream: bool, include_usage: bool, body: dict[str, Any] | None = None
    ) -> tuple[bytes, bool]:
        response = translate.response_from_chat(answer, body or {}, model=answer.get("model"))
        if stream:
            return translate.response_as_events(response), True
        return orjson.dumps(response), False

    def stream_error(self, error: ProxyError) -> bytes:
        return translate.error_event(error, 0)

    def stream_account(self, include_usage: bool) -> ResponsesAccount:
        return ResponsesAccount()

    def max_output(self, body: dict[str, Any]) -> int | None:
        return body.get("max_output_tokens")

    def limit_output(self, body: dict[str, Any], tokens: int) -> None:
        body["max_output_tokens"] = tokens

    def add_instruction(self, body: dict[str, Any], text: str, placement: str) -> bool:
        """Into `instructions` (the Responses API's system message); `user` placement ends a string input."""
        instructions = body.get("instructions") or ""
        if text in instructions or (isinstance(body["input"], str) and text in body["input"]):
            return False
        if placement == "user" and isinstance(body["input"], str):
            body["input"] = f"{body['input']}\n\n{text}"
        else:
            body["instructions"] = f"{instructions}\n\n{text}" if instructions else text
        return True

    def offers_tools(self, body: dict[str, Any]) -> bool:
        return bool(body.get("tools"))

    def wants_structured(self, body: dict[str, Any]) -> bool:
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        return isinstance(fmt, dict) and fmt.get("type") not in (None, "text")

    def asks_plain_text(self, body: dict[str, Any]) -> bool:
        return not (self.offers_tools(body) or self.wants_structured(body) or body.get("top_logprobs"))

    def spoken_by(self, model: UpstreamModel) -> bool:
        return model.provider == "openai" and model.api == "responses"

    def to_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        previous = body.get("previous_response_id")
        if previous is not None:
            # The proxy replaces a response id it kept with that conversation; any other one only the
            # upstream that made it knows, and a Chat Completions upstream keeps no state.
            raise NotFound(
                f"Previous response with id '{previous}' not found (responses are kept for a limited time).",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return translate.chat_request(body)

    def reply_from_chat(self, completion: dict[str, Any], body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        return translate.response_from_chat(completion, body)

    def chat_stream(self, body: dict[str, Any], model: str, prompt_tokens: int) -> translate.ResponsesStream:
        return translate.ResponsesStream(body, model)


class ResponsesInputTokensWire(ResponsesWire):
    """`POST /v1/responses/input_tokens`: a Responses request's prompt tokens, nothing generated."""

    endpoint = Endpoint.RESPONSES_INPUT_TOKENS
    paths = ("/v1/responses/input_tokens", "/responses/input_tokens")
    conversational = False
    counts_only = True

    def count_answer(self, tokens: int) -> bytes:
        return orjson.dumps(translate.input_tokens_object(tokens))


RESPONSES = ResponsesWire()
RESPONSES_INPUT_TOKENS = ResponsesInputTokensWire()
