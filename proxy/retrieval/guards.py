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
import unicodedata
from collections import Counter
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

# Letters and digits of any script (Zürich, Москва, 東京 are words); `_` separates, as in snake_case.
_WORD = re.compile(r"[^\W_](?:[^\W_]|['’\-])*")
_QUOTED = re.compile(
    r"\"([^\"]{1,200})\"|“([^”]{1,200})”|`([^`]{1,200})`|‘([^’]{1,200})’|(?<!\w)'([^'\s][^']{0,198}[^'\s])'(?!\w)"
    r"|「([^」]{1,200})」|『([^』]{1,200})』|«\s?([^»]{1,200}?)\s?»|„([^“”]{1,200})[“”]|‹([^›]{1,200})›"
)
# A question word asks only where a clause starts with it or an auxiliary follows it: "what does
# it mean when you..." asks "what"; its "when" is a conjunction.
_QUESTION_LEAD = 4
_AUXILIARIES = frozenset(
    """is are was were be do does did can could should would will shall may might must has have had
    much many long old far often big large tall""".split()
)
_CLAUSE_END = re.compile(r"[.?!;:？。！；]")
# Between two swapped arguments these words carry no direction: "A and B" is "B and A".
_SYMMETRIC = frozenset({"and", "or", "nor", "vs", "versus", "plus", "with", "between", "both", "either", "neither"})
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


def _fold(text: str) -> str:
    """Compatibility forms (full-width digits and letters) folded; accents kept for the case test."""
    return unicodedata.normalize("NFKC", text)


def _strip_accents(word: str) -> str:
    if word.isascii():
        return word
    decomposed = unicodedata.normalize("NFD", word)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def _normal_word(word: str) -> str:
    w = _strip_accents(word.lower().replace("’", "'"))
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("-'")
    return _NUMBER_WORDS.get(w, w)


def words(text: str) -> list[str]:
    """Lower-cased words (any script, accents stripped) with possessives stripped and small number
    words as digits."""
    return [w for w in (_normal_word(w) for w in _WORD.findall(_fold(text))) if w]


def _uncased(word: str) -> bool:
    """A word of a script without capitals (Han, kana, Hangul, Thai, Arabic, Hebrew, ...)."""
    return not word.isdigit() and word.lower() == word.upper() and not word.isascii()


def _question_words(text: str) -> frozenset[str]:
    found = set()
    for clause in _CLAUSE_END.split(text):
        ws = words(clause)
        for i, w in enumerate(ws):
            kind = _QUESTION_WORDS.get(w)
            if kind is None:
                continue
            leads = i < _QUESTION_LEAD and not any(v in _QUESTION_WORDS for v in ws[:i])
            if leads or (i + 1 < len(ws) and ws[i + 1] in _AUXILIARIES):
                found.add(kind)
    return frozenset(found)


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
    sequence: tuple[str, ...] = ()  # all words in order, for argument order


def analyse(text: str) -> TextFacts:
    text = _fold(text)
    ws = words(text)
    tokens = list(_WORD.finditer(text))
    long_words = [m.group() for m in tokens[1:] if len(m.group()) > 3]
    # In Title Case Text capitals say nothing about names.
    title_case = len(long_words) >= 3 and sum(w[0].isupper() for w in long_words) >= 0.8 * len(long_words)
    # In a text mostly of cased letters, a word of a script without capitals is a name (東京 in English).
    cased = sum(1 for m in tokens if not _uncased(m.group()))
    mostly_cased = cased >= 0.5 * len(tokens)
    names = set()
    prev_end = 0
    for i, m in enumerate(tokens):
        w = m.group()
        before, prev_end = text[prev_end : m.start()], m.end()
        if _uncased(w):
            if mostly_cased:
                names.add(_normal_word(w))
            continue
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
        question_words=_question_words(text),
        negated=bool(_NEGATION.search(text)),
        mood=_mood(text),
        content=frozenset(_stem(w) for w in ws if len(w) >= 3 and w not in _FUNCTION_WORDS and not w.isdigit()),
        sequence=tuple(ws),
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


def _argument(word: str) -> bool:
    return word.isdigit() or (word not in _FUNCTION_WORDS and word not in _QUESTION_WORDS)


def _once(sequence: tuple[str, ...]) -> dict[str, int]:
    counts = Counter(sequence)
    return {w: i for i, w in enumerate(sequence) if counts[w] == 1 and _argument(w)}


def swapped(a: TextFacts, b: TextFacts) -> bool:
    """Two words that appear once in each text, in opposite order, with the same directed words
    between them: "convert Celsius to Fahrenheit" / "convert Fahrenheit to Celsius", "Alice thinks
    of Bob" / "Bob thinks of Alice". Bags of words cannot tell these apart; "A and B" / "B and A" and
    "flights from Paris to Rome" / "flights to Rome from Paris" stay equal."""
    sa, sb = a.sequence, b.sequence
    once_a, once_b = _once(sa), _once(sb)
    shared = [w for w in once_a if w in once_b]
    for x in range(len(shared)):
        for y in range(x + 1, len(shared)):
            u, v = shared[x], shared[y]  # u before v in a
            if once_b[v] >= once_b[u]:
                continue
            between_a = sa[once_a[u] + 1 : once_a[v]]
            between_b = sb[once_b[v] + 1 : once_b[u]]
            if between_a and between_a == between_b and not set(between_a) <= _SYMMETRIC:
                return True
    return False


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
    if swapped(query, entry):
        return "order"
    return None


REASONS = ("number", "quoted", "code", "name", "question_word", "negation", "mood", "polarity", "added_detail", "order")


def _missing_kinds(a: TextFacts, b: TextFacts) -> set[str]:
    kinds = set()
    if any(n not in b.words and n not in b.numbers for n in a.numbers):
        kinds.add("number")
    if any(q and q not in b.joined for q in a.quoted):
        kinds.add("quoted")
    if any(c not in b.lowered for c in a.code):
        kinds.add("code")
    if any(not _has_name(name, b) for name in a.names):
        kinds.add("name")
    return kinds


def disagreements(query: TextFacts, entry: TextFacts) -> frozenset[str]:
    """Every way the two texts disagree (the verifier's features); `disagreement` stops at the first."""
    kinds = _missing_kinds(query, entry) | _missing_kinds(entry, query)
    if query.question_words != entry.question_words:
        kinds.add("question_word")
    if query.negated != entry.negated:
        kinds.add("negation")
    if query.mood and entry.mood and query.mood != entry.mood:
        kinds.add("mood")
    if any((o := _OPPOSITE.get(w)) is not None and o in entry.words and w not in entry.words for w in query.words):
        kinds.add("polarity")
    only_query, only_entry = len(query.content - entry.content), len(entry.content - query.content)
    if max(only_query, only_entry) >= _ADDED_WORDS and min(only_query, only_entry) <= 1:
        kinds.add("added_detail")
    if swapped(query, entry):
        kinds.add("order")
    return frozenset(kinds)
