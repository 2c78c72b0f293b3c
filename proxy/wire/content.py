"""The text inside OpenAI-shaped request bodies: message content (a string or typed parts) and the
user's text of a chat, completions, embeddings, Responses or Messages body."""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    """The text parts of a message's content ("" for none); other parts (images, audio) are skipped."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")
        )
    return ""


def text_only(content: Any) -> str | None:
    """The content when it is text alone, else None (an image, audio or file part makes it no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                return None
            parts.append(p["text"])
        return "\n".join(parts)
    return None


def user_text(body: dict[str, Any]) -> str:
    """The text of a request's user messages, or of its prompt/input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
        )
    value = body.get("prompt", body.get("input"))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # Strings (completions, embeddings), or the Responses API's input items (the user's messages).
        return "\n".join(
            v if isinstance(v, str) else content_text(v.get("content"))
            for v in value
            if isinstance(v, str) or (isinstance(v, dict) and v.get("role") == "user")
        )
    return ""


def choice_texts(choice: dict[str, Any]) -> list[str]:
    """Every generated text of one choice of a reply or a stream chunk (content, reasoning, refusal, tool
    call names and arguments, completions text): what the proxy counts when the upstream reports no usage."""
    out: list[str] = []
    text = choice.get("text")
    if isinstance(text, str):
        out.append(text)
    for key in ("delta", "message"):
        msg = choice.get(key)
        if not isinstance(msg, dict):
            continue
        for field in ("content", "reasoning_content", "refusal"):
            v = msg.get(field)
            if isinstance(v, str):
                out.append(v)
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
    return out


def reply_text(data: dict[str, Any]) -> str:
    """All generated text of a non-stream chat or completions reply."""
    parts: list[str] = []
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            parts.extend(choice_texts(choice))
    return "".join(parts)
