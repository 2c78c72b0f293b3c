"""How two answers to one request are compared: the pairwise judge prompt (both orders), a robust parse
of the judge's verdict, and the checks that need no judge (`exact`, `json`, the final `number`).

Outcomes are told from the policy's side: `win` (its answer is better), `tie`, `loss`, or `unjudged`
(no verdict could be had). Pure functions: the shadow evaluation calls them, tests read them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

from proxy.wire.content import content_text

WIN, TIE, LOSS, UNJUDGED = "win", "tie", "loss", "unjudged"

# The pairwise prompt of MT-Bench (Zheng et al., 2023), in its usual shape: a judge that sees the question
# and two answers, explains, then gives `[[A]]`, `[[B]]` or `[[C]]` (tie). The mock upstream's judging mode
# reads these markers.
JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Choose the assistant that follows the user's instructions and "
    "answers the user's question better, considering helpfulness, relevance, accuracy, depth and level of "
    "detail. Do not let the order in which the responses were presented influence your decision, do not let "
    "the length of the responses influence it, and do not favour certain names of the assistants. Be as "
    "objective as possible. After a short explanation, output your final verdict strictly in this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
_ANSWER = "[The Start of Assistant {name}'s Answer]\n{text}\n[The End of Assistant {name}'s Answer]"


def conversation_text(body: dict[str, Any]) -> str:
    """The request as the judge reads it: each message's role and text, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    lines = []
    for m in messages:
        if isinstance(m, dict):
            text = content_text(m.get("content"))
            if text:
                lines.append(text if len(messages) == 1 else f"{m.get('role', 'user')}: {text}")
    return "\n".join(lines)


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    user = "\n\n".join(
        (
            f"[User Question]\n{question}",
            _ANSWER.format(name="A", text=answer_a),
            _ANSWER.format(name="B", text=answer_b),
        )
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_BRACKETED = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_STATED = re.compile(
    r"(?:final\s+verdict|verdict|winner|better\s+(?:answer|response))\s*(?:is|:|=)?\s*[\*\"'`\[]*\s*"
    r"(?:assistant\s+)?(A|B|C|TIE)\b",
    re.IGNORECASE,
)
_ALONE = re.compile(r"^[\s\*\"'`\[\(]*(?:assistant\s+)?(A|B|C|TIE)[\s\*\"'`\]\)\.]*$", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `tie` from a judge's reply, or None when it gives none. The last bracketed verdict wins
    (a judge that restates the format before answering has the answer last); failing that a stated
    verdict ("Final verdict: B"), or a reply that is the verdict alone."""
    found = _BRACKETED.findall(text) or _STATED.findall(text)
    if not found:
        alone = _ALONE.match(text)
        found = [alone.group(1)] if alone else []
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE") else v


def combine_orders(policy_first: str | None, policy_second: str | None) -> str:
    """The outcome for the policy from two verdicts: with its answer as A, then as B. Orders that disagree
    are a tie (position bias cancels); a missing verdict leaves the pair unjudged."""
    if policy_first is None or policy_second is None:
        return UNJUDGED
    first = {"A": WIN, "B": LOSS, "tie": TIE}[policy_first]
    second = {"A": LOSS, "B": WIN, "tie": TIE}[policy_second]
    return first if first == second else TIE


# --------------------------------------------------------------------------- checks without a judge


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def compare_exact(answer: str, reference: str) -> str:
    """The same text (whitespace and case aside): a tie; otherwise the counterfactual is taken as right."""
    if not reference.strip():
        return UNJUDGED
    return TIE if _normalised(answer) == _normalised(reference) else LOSS


_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def _json_value(text: str) -> tuple[bool, Any]:
    m = _FENCE.match(text)
    try:
        return True, orjson.loads((m.group(1) if m else text).strip())
    except orjson.JSONDecodeError:
        return False, None


def compare_json(answer: str, reference: str) -> str:
    """The same JSON value (fenced or not): a tie; other JSON or none: a loss; no JSON to compare with: unjudged."""
    ok_ref, ref = _json_value(reference)
    if not ok_ref:
        return UNJUDGED
    ok, value = _json_value(answer)
    return TIE if ok and value == ref else LOSS


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_number(text: str) -> float | None:
    """The answer's final number (a maths answer's result): inside the last `\\boxed{}` when there is one,
    else the last number in the text; thousands separators are ignored."""
    boxed = _BOXED.findall(text)
    for source in ([boxed[-1]] if boxed else []) + [text]:
        numbers = _NUMBER.findall(source)
        if numbers:
            try:
                value = float(numbers[-1].replace(",", ""))
            except ValueError:
                continue
            if math.isfinite(value):
                return value
    return None


def compare_number(answer: str, reference: str) -> str:
    ref = final_number(reference)
    if ref is None:
        return UNJUDGED
    value = final_number(answer)
    if value is None:
        return LOSS
    return TIE if math.isclose(value, ref, rel_tol=1e-9, abs_tol=1e-9) else LOSS


CHECKS = {"exact": compare_exact, "json": compare_json, "number": compare_number}
