"""What the mock upstream (proxy.fakes.mock_upstream) is told and how it words its replies: the injected
faults and settings (`MockState`, changed through `POST /mock/faults` and `/mock/config`), the deterministic
reply text seeded by the prompt, and the verdicts of its judging mode."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

_WORDS = (
    "the proxy counts every token and prices each request so that spend stays within budget while "
    "answers remain useful to the people who asked for them across all teams"
).split()


@dataclass
class Fault:
    """One injected failure, applied to the next `count` matching requests."""

    status: int | None = None
    retry_after: str | None = None
    body: str = "json"  # json | html | malformed | detail (FastAPI's validation error, as infinity and TEI send)
    reset: bool = False
    stall_s: float = 0.0
    count: int = 1
    path: str | None = None  # only requests to this path (e.g. /v1/chat/completions)
    model: str | None = None  # only requests for this upstream model
    after_chunks: int | None = None  # for streams: break the stream after this many chunks
    hold: bool = False  # wait for POST /mock/release before answering
    results: str | None = None  # list replies: fewer | duplicate_index | malformed_entry
    hold_after_chunks: int | None = None  # for streams: after this many chunks, wait for POST /mock/release

    def matches(self, path: str, model: str | None) -> bool:
        return (self.path is None or self.path == path) and (self.model is None or self.model == model)


@dataclass
class MockState:
    latency_s: float = 0.0
    reply_tokens: int = 32
    chunk_delay_s: float = 0.0
    usage: bool = True
    embedding_dim: int = 16
    # The verbosity model: a brevity instruction anywhere in the prompt ("be concise", "be brief",
    # "briefly", ...) scales the reply to this fraction; jitter varies lengths by prompt (±fraction).
    concise_ratio: float = 0.5
    length_jitter: float = 0.0
    faults: deque[Fault] = field(default_factory=deque)
    calls: Counter[str] = field(default_factory=Counter)
    last_bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    completion_tokens_served: int = 0
    prompt_tokens_served: int = 0
    faults_applied: Counter[str] = field(default_factory=Counter)  # by kind: status:503, reset, stall, ...
    abandoned: int = 0  # replies nobody was left to receive (the client gave up during a stall)
    held: int = 0
    gate: asyncio.Event | None = None
    judge: str | None = None  # judging mode: longer | shorter | A | B | tie | garbage (None: answer as usual)
    judge_only_on: str | None = None  # a regex: questions it does not match are judged a tie
    reply_tokens_by_model: dict[str, int] = field(default_factory=dict)
    # (substring, reply): a chat prompt containing the substring gets that reply, first match wins
    # (a deterministic answer for a prompt the proxy sends for itself, e.g. retrieval's LLM check)
    scripted: list[tuple[str, str]] = field(default_factory=list)


_JUDGE_ANSWER = re.compile(
    r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.DOTALL
)
BREVITY = re.compile(r"(?i)\b(be (concise|brief)|concisely|briefly|keep it short)\b")


def reply_text(seed: str, n_words: int) -> str:
    h = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "big")
    return " ".join(_WORDS[(h + i) % len(_WORDS)] for i in range(n_words))


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
        return "\n".join(parts)
    p = body.get("prompt", body.get("input", ""))
    return p if isinstance(p, str) else " ".join(map(str, p))


_JUDGE_QUESTION = re.compile(r"\[User Question\]\n(.*?)\n\n\[The Start of Assistant A", re.DOTALL)


def verdict(mode: str, prompt: str, only_on: str | None = None) -> str | None:
    """The judge's reply to a pairwise judge prompt in judging mode `mode`, or None for any other prompt."""
    if "[[A]]" not in prompt or "[[C]]" not in prompt:
        return None
    answers = dict(_JUDGE_ANSWER.findall(prompt))
    question = _JUDGE_QUESTION.search(prompt)
    if only_on is not None and not (question and re.search(only_on, question.group(1))):
        mode = "tie"
    if mode == "garbage":
        return "Both answers have their merits; I would rather not choose."
    if mode in ("longer", "shorter") and len(answers) == 2:
        a, b = len(answers["A"].split()), len(answers["B"].split())
        better = "C" if a == b else ("A" if (a > b) == (mode == "longer") else "B")
    else:
        better = {"A": "A", "B": "B"}.get(mode, "C")
    return f"Having compared both answers: [[{better}]]"
