"""Precision guards beyond one similarity threshold: the tokens that decide an answer must agree.

Embeddings place "How many moons does Jupiter have?" next to "How many moons does Saturn have?", and
"Python 3.11" next to "Python 3.12". A lookup may only answer when the query and the entry agree on
numbers, quoted strings, code identifiers, proper names, the question word (who/when/where...),
negation, polar words (higher/lower, before/after...) and whether each is a question, and when
neither adds several details the other lacks. Each text is analysed once: entries when
they are indexed, the query once per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Function words: never decisive, and ignored when capitalised at the start of a sentence.
_FUNCTION_WORDS = frozenset(
    """a an the i me my we our you your he him his she her it its they them their this that these those
    there here is are was were be been being am do does did doing done can could should would will shall
    may might must has have had having if in on at of for to from by with about as and or but so than then
    into onto over under out off again once what which who whom whose when where why how all any both each
    few most other some such only own same too very just also not no nor yes don doesn didn isn aren wasn
    weren won wouldn shouldn couldn cannot please tell know use using used way thing things really one
    someone something anyone anything everyone everything hi hello hey thanks thank ok okay""".split()
)
_QUESTION_WORDS = {
    "who": "who",
    "whom": "who",
    "whose": "whose",
    "what": "what",
    "which": "what",
    "when": "when",
    "where": "where",
    "why": "why",
    "how": "how",
}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_POLAR_PAIRS = (
    ("higher", "lower"),
    ("high", "low"),
    ("up", "down"),
    ("rise", "fall"),
    ("rose", "fell"),
    ("gain", "loss"),
    ("increase", "decrease"),
    ("before", "after"),
    ("more", "less"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("open", "close"),
    ("win", "lose"),
    ("won", "lost"),
    ("buy", "sell"),
    ("bought", "sold"),
    ("enable", "disable"),
    ("add", "remove"),
    ("start", "stop"),
    ("first", "last"),
    ("male", "female"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("true", "false"),
    ("above", "below"),
    ("inside", "outside"),
    ("import", "export"),
    ("input", "output"),
    ("upload", "download"),
    ("encrypt", "decrypt"),
    ("push", "pull"),
    ("min", "max"),
)
_OPPOSITE = {a: b for a, b in _POLAR_PAIRS} | {b: a for a, b in _POLAR_PAIRS}
_ADDED_WORDS = 3
# A name and its adjective or demonym (Italy/Italian, China/Chinese, Iraq/Iraqi) are the same name.
_DEMONYM_ENDINGS = frozenset({"", "n", "an", "ian", "ese", "ish", "i", "ic", "ans", "ians", "ns"})

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’\-]*")
_QUOTED = re.compile(
    r"\"([^\"]{1,200})\"|“([^”]{1,200})”|`([^`]{1,200})`|‘([^’]{1,200})’|(?<!\w)'([^'\s][^']{0,198}[^'\s])'(?!\w)"
)
_NUMBER = re.compile(r"(?<![\w.])\$?\d[\d,]*(?:\.\d+)*")
_CODE = re.compile(
    r"\b[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::|->)[A-Za-z_][A-Za-z0-9_]+)+\b"  # os.path.join, std::vector
    r"|\b[A-Za-z0-9]*_[A-Za-z0-9_]+\b"  # snake_case
    r"|\b[a-z]+[A-Z][A-Za-z0-9]*\b"  # camelCase
    r"|\b[A-Za-z_]\w*\(\)"  # call()
    r"|(?<![\w-])--?[a-z][\w-]+"  # --flags
)
_SENTENCE_END = re.compile(r"[.!?:;\"“(\n]\s*$")
_NEGATION = re.compile(r"\b(?:not|never|nothing|none|nobody|cannot|without)\b|n[’']t\b", re.IGNORECASE)


def _normal_word(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("-'")
    return _NUMBER_WORDS.get(w, w)


def words(text: str) -> list[str]:
    """Lower-cased words with possessives stripped and small number words as digits."""
    return [_normal_word(w) for w in _WORD.findall(text)]


@dataclass(frozen=True, slots=True)
class TextFacts:
    """What the guards compare, computed once per text."""

    words: frozenset[str]
    joined: str  # the words joined by single spaces, for phrase containment
    lowered: str
    numbers: frozenset[str]
    quoted: frozenset[str]
    code: frozenset[str]
    names: frozenset[str]
    question_words: frozenset[str]
    negated: bool
    mood: str  # "?" a question, "." a statement, "" unmarked (chat messages often end without punctuation)
    content: frozenset[str]  # stems of the content words


def analyse(text: str) -> TextFacts:
    ws = words(text)
    tokens = list(_WORD.finditer(text))
    long_words = [m.group() for m in tokens[1:] if len(m.group()) > 3]
    # In Title Case Text capitals say nothing about names.
    title_case = len(long_words) >= 3 and sum(w[0].isupper() for w in long_words) >= 0.8 * len(long_words)
    names = set()
    prev_end = 0
    for i, m in enumerate(tokens):
        w = m.group()
        before, prev_end = text[prev_end : m.start()], m.end()
        if not any(c.isupper() for c in w):
            continue
        lw = _normal_word(w)
        if lw in _FUNCTION_WORDS or len(lw) < 2 or lw.isdigit():
            continue
        # Acronyms, inner capitals and digits mark a name anywhere (AWS, iPhone, GPT4).
        marked = (w.isupper() and len(w) >= 2) or any(c.isupper() for c in w[1:]) or any(c.isdigit() for c in w)
        at_sentence_start = i == 0 or bool(_SENTENCE_END.search(before))
        if marked or not (at_sentence_start or title_case):
            names.add(lw)
    return TextFacts(
        words=frozenset(ws),
        joined=" ".join(ws),
        lowered=text.lower(),
        numbers=frozenset(m.group().replace(",", "").lstrip("$") for m in _NUMBER.finditer(text)),
        quoted=frozenset(" ".join(words(next(g for g in m.groups() if g))) for m in _QUOTED.finditer(text)),
        code=frozenset(m.group().lower() for m in _CODE.finditer(text)),
        names=frozenset(names),
        question_words=frozenset(_QUESTION_WORDS[w] for w in ws if w in _QUESTION_WORDS),
        negated=bool(_NEGATION.search(text)),
        mood=_mood(text),
        content=frozenset(_stem(w) for w in ws if len(w) >= 3 and w not in _FUNCTION_WORDS and not w.isdigit()),
    )


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:6]


def _mood(text: str) -> str:
    end = text.rstrip().rstrip("\"'”’)")[-1:]
    return "?" if end in ("?", "？") else "." if end in (".", "!", "。") else ""


def _same_name(name: str, word: str) -> bool:
    short, long = (name, word) if len(name) <= len(word) else (word, name)
    p = 0
    while p < len(short) and short[p] == long[p]:
        p += 1
    rest = long[p:]
    return p >= 4 and len(short) - p <= 1 and (rest in _DEMONYM_ENDINGS or len(rest) <= 1)


def _has_name(name: str, facts: TextFacts) -> bool:
    return name in facts.words or any(_same_name(name, w) for w in facts.words if w[:4] == name[:4])


def _contained(a: TextFacts, b: TextFacts) -> str | None:
    """Why a decisive token of `a` is missing from `b`, or None."""
    for n in a.numbers:
        if n not in b.words and n not in b.numbers:
            return "number"
    for q in a.quoted:
        if q and q not in b.joined:
            return "quoted"
    for c in a.code:
        if c not in b.lowered:
            return "code"
    for name in a.names:
        if not _has_name(name, b):
            return "name"
    return None


def disagreement(query: TextFacts, entry: TextFacts) -> str | None:
    """The first way the two texts disagree on what decides the answer, or None when they agree."""
    reason = _contained(query, entry) or _contained(entry, query)
    if reason:
        return reason
    if query.question_words != entry.question_words:
        return "question_word"
    if query.negated != entry.negated:
        return "negation"
    if query.mood and entry.mood and query.mood != entry.mood:
        return "mood"  # a question is not answered by an entry that is a statement, and vice versa
    for w in query.words:
        opposite = _OPPOSITE.get(w)
        if opposite is not None and opposite in entry.words and w not in entry.words:
            return "polarity"
    # Several content words on one side only, and (almost) none only on the other: one text adds a
    # detail the other does not have ("...on the corporate laptop"), not a rewording of it.
    only_query, only_entry = len(query.content - entry.content), len(entry.content - query.content)
    if max(only_query, only_entry) >= _ADDED_WORDS and min(only_query, only_entry) <= 1:
        return "added_detail"
    return None
