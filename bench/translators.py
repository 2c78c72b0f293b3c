"""CPU per request of the Responses and Messages translators beside what chat costs the same code path.

Data: ../shared/data/routellm_mmlu_dev (lm-sys/RouteLLM MMLU prompts, the first N of the files in name
order) as the user turn of an agent-like request (instructions, one function tool). Per request and
format: parse the client's body, translate it to chat and serialise it (chat: parse and serialise only,
what the pass-through does), then turn a 32-word chat reply into the client's format, non-stream and as a
33-chunk stream. This is the translators' own cost, not the endpoints' (no HTTP, no pipeline); the
endpoint comparison belongs beside bench/overhead.py once the gateway serves these paths.

    python -m bench.translators [--n 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import time
from pathlib import Path

import orjson

from proxy.wire import anthropic as messages_wire
from proxy.wire import responses as responses_wire

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "routellm_mmlu_dev"
REPLY_WORDS = ("the proxy counts every token and prices each request so that spend stays within " * 3).split()[:32]
TOOL = {
    "name": "lookup",
    "description": "Look a fact up",
    "schema": {"type": "object", "properties": {"q": {"type": "string"}}},
}


def _prompts(n: int) -> list[str]:
    prompts: list[str] = []
    for path in sorted(DATA.glob("mmlu_*.csv")):
        with path.open(newline="") as f:
            prompts += [row["prompt"] for row in csv.DictReader(f)]
        if len(prompts) >= n:
            break
    return prompts[:n]


def _bodies(prompt: str) -> dict[str, bytes]:
    tool = TOOL
    chat = {
        "model": "m",
        "messages": [{"role": "system", "content": "Answer with one letter."}, {"role": "user", "content": prompt}],
        "tools": [
            {
                "type": "function",
                "function": {"name": tool["name"], "description": tool["description"], "parameters": tool["schema"]},
            }
        ],
        "max_tokens": 64,
    }
    responses = {
        "model": "m",
        "instructions": "Answer with one letter.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": prompt}]}],
        "tools": [
            {"type": "function", "name": tool["name"], "description": tool["description"], "parameters": tool["schema"]}
        ],
        "max_output_tokens": 64,
    }
    messages = {
        "model": "m",
        "system": "Answer with one letter.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "tools": [{"name": tool["name"], "description": tool["description"], "input_schema": tool["schema"]}],
        "max_tokens": 64,
    }
    return {k: orjson.dumps(v) for k, v in (("chat", chat), ("responses", responses), ("messages", messages))}


def _reply() -> tuple[bytes, bytes]:
    text = " ".join(REPLY_WORDS)
    usage = {"prompt_tokens": 120, "completion_tokens": 32, "total_tokens": 152}
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage,
    }
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w}, "finish_reason": None}]}
        for i, w in enumerate(REPLY_WORDS)
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": usage})
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return orjson.dumps(completion), stream


def _one(fmt: str, raw: bytes, reply: bytes, stream: bytes) -> None:
    body = orjson.loads(raw)
    if fmt == "chat":
        orjson.dumps(body)
        orjson.dumps(orjson.loads(reply))
        for event in stream.split(b"\n\n"):  # the chat relay looks at each event once
            if b'"usage"' in event:
                orjson.loads(event[6:])
        return
    if fmt == "responses":
        orjson.dumps(responses_wire.chat_request(body))
        orjson.dumps(responses_wire.response_from_chat(orjson.loads(reply), body, model="m"))
        s = responses_wire.ResponsesStream(body, "m")
        s.start(), s.feed(stream), s.finish()
        return
    orjson.dumps(messages_wire.chat_request(body))
    orjson.dumps(messages_wire.message_from_chat(orjson.loads(reply), "m"))
    m = messages_wire.MessagesStream("m", 120)
    m.start(), m.feed(stream), m.finish()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    prompts = _prompts(args.n)
    bodies = [_bodies(p) for p in prompts]
    reply, stream = _reply()
    results: dict[str, list[float]] = {"chat": [], "responses": [], "messages": []}
    for _ in range(args.rounds):
        for fmt in results:  # alternating within a round: the machine's load hits all three alike
            start = time.process_time()
            for b in bodies:
                _one(fmt, b[fmt], reply, stream)
            results[fmt].append((time.process_time() - start) / len(bodies) * 1e3)
    chat = statistics.median(results["chat"])
    rows = []
    for fmt, values in results.items():
        med = statistics.median(values)
        rows.append(f"| {fmt} | {med:.3f} | {min(values):.3f}–{max(values):.3f} | {med / chat:.2f}x |")
    table = "| format | CPU ms/request (median) | min–max of rounds | × chat |\n|---|---|---|---|\n" + "\n".join(rows)
    print(table)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(
            f"\n## Responses / Messages translators — {date} — 2-core x86_64 shared, loaded — commit {commit} "
            f"(`python -m bench.translators --n {args.n} --rounds {args.rounds}`)\n\n"
            f"Data: ../shared/data/routellm_mmlu_dev, the first {len(prompts)} MMLU prompts as the user turn; per "
            f"request: body parsed, translated to chat and serialised, a 32-word reply turned into the format "
            f"(non-stream) and a 34-event chat stream into its events. Chat row: the same parse/serialise work "
            f"without translation. Translator cost only (no HTTP, no pipeline); {args.rounds} alternating rounds.\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
