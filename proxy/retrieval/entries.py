"""Collection entries: one or more questions, an answer, an optional source, tags, a lifetime and a
team scope; how they are validated (from an admin request or a JSONL/YAML file) and how they are
stored (JSON with their vectors, tagged with the embedder identity that made them)."""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

MAX_QUESTIONS = 32
MAX_QUESTION_CHARS = 4000
MAX_ANSWER_CHARS = 100_000
MAX_TAGS = 32
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_FILE_ENTRIES = 100_000
MAX_TTL_S = 10 * 365 * 86400
_ID = re.compile(r"^[A-Za-z0-9_.:/@+\-]{1,200}$")
_ENTRY_KEYS = frozenset({"id", "question", "questions", "answer", "source", "tags", "ttl_s", "teams"})


class EntryError(ValueError):
    """An entry (or a file of entries) that cannot be stored; the message says where and why."""


@dataclass(slots=True)
class Entry:
    id: str
    questions: list[str]
    answer: str
    source: str | None = None
    tags: list[str] = field(default_factory=list)
    teams: list[str] | None = None  # None: every team
    context: str = ""  # fingerprint of the conversation before the question ("" when standalone)
    ttl_s: float | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    embedder: str | None = None  # identity of the embedder that made `vectors`
    vectors: np.ndarray | None = None  # (len(questions), dim) float32

    def public(self) -> dict[str, Any]:
        """The entry as the admin API shows it (no vectors)."""
        out: dict[str, Any] = {"id": self.id, "questions": self.questions, "answer": self.answer}
        if self.source is not None:
            out["source"] = self.source
        if self.tags:
            out["tags"] = self.tags
        if self.teams is not None:
            out["teams"] = self.teams
        if self.context:
            out["context"] = self.context
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        out["created_at"] = self.created_at
        return out

    def dump(self) -> bytes:
        """The stored form: JSON with the vectors as base64 float32."""
        data = self.public()
        data["embedder"] = self.embedder
        if self.vectors is not None:
            data["dim"] = int(self.vectors.shape[1])
            data["vectors"] = base64.b64encode(np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()).decode()
        return orjson.dumps(data)


def load_stored(raw: bytes) -> Entry | None:
    """An entry as stored; None when the bytes are not a readable entry (skipped, never served)."""
    try:
        data = orjson.loads(raw)
        entry = Entry(
            id=data["id"],
            questions=list(data["questions"]),
            answer=data["answer"],
            source=data.get("source"),
            tags=list(data.get("tags") or ()),
            teams=data.get("teams"),
            context=data.get("context") or "",
            expires_at=data.get("expires_at"),
            created_at=float(data.get("created_at") or 0.0),
            embedder=data.get("embedder"),
        )
        if data.get("vectors"):
            dim = int(data["dim"])
            vectors = np.frombuffer(base64.b64decode(data["vectors"]), dtype="<f4").astype(np.float32)
            if dim <= 0 or vectors.size != dim * len(entry.questions):
                entry.embedder = None  # vectors that do not fit their questions: re-embed
            else:
                entry.vectors = vectors.reshape(len(entry.questions), dim)
        return entry
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


# Control characters (C0, DEL, C1) split a header or a log line; the fields that reach one (source:
# x-llm-proxy-retrieval-source; tags, teams, questions in logs and admin views) may not hold them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _text(value: Any, what: str, limit: int, controls: bool = False, allowed: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        raise EntryError(f"{what} must be a non-empty string")
    if len(value) > limit:
        raise EntryError(f"{what} is longer than {limit} characters")
    if not controls:
        for m in _CONTROL.finditer(value):
            if m.group() not in allowed:
                raise EntryError(f"{what} holds a control character (U+{ord(m.group()):04X})")
    return value


def parse_entry(obj: Any, teams: frozenset[str] | None = None, now: float | None = None) -> Entry:
    """Validate one entry as given by a user; raise EntryError with what is wrong."""
    if not isinstance(obj, dict):
        raise EntryError("an entry must be an object")
    unknown = sorted(set(obj) - _ENTRY_KEYS)
    if unknown:
        raise EntryError(f"unknown field(s) {', '.join(unknown)}")
    entry_id = obj.get("id")
    if not isinstance(entry_id, str) or not _ID.match(entry_id):
        raise EntryError("'id' must be 1-200 characters of letters, digits and _.:/@+-")
    if "question" in obj and "questions" in obj:
        raise EntryError("give 'question' or 'questions', not both")
    questions = obj.get("questions", [obj["question"]] if "question" in obj else None)
    if not isinstance(questions, list) or not questions:
        raise EntryError("'questions' must be a non-empty list of strings (or give one 'question')")
    if len(questions) > MAX_QUESTIONS:
        raise EntryError(f"at most {MAX_QUESTIONS} questions per entry")
    # A question may span lines (a pasted snippet), nothing else: it is shown and matched, never a header.
    questions = [
        _text(q, f"questions[{i}]", MAX_QUESTION_CHARS, allowed="\t\n").strip() for i, q in enumerate(questions)
    ]
    if "answer" not in obj:
        raise EntryError("'answer' is missing")
    answer = _text(obj["answer"], "'answer'", MAX_ANSWER_CHARS, controls=True)  # a body, never a header
    source = obj.get("source")
    if source is not None:
        source = _text(source, "'source'", 2000)
    tags = obj.get("tags") or []
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags)
    ):
        raise EntryError(f"'tags' must be a list of at most {MAX_TAGS} strings of 1-64 characters")
    for i, t in enumerate(tags):
        _text(t, f"tags[{i}]", 64)
    ttl = obj.get("ttl_s")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S):
        raise EntryError(f"'ttl_s' must be a number of seconds between 0 and {MAX_TTL_S}")
    entry_teams = obj.get("teams")
    if entry_teams is not None:
        if not isinstance(entry_teams, list) or not entry_teams or not all(isinstance(t, str) for t in entry_teams):
            raise EntryError("'teams' must be a non-empty list of team names")
        for i, t in enumerate(entry_teams):
            _text(t, f"teams[{i}]", 200)
        if teams is not None and (missing := sorted(set(entry_teams) - teams)):
            raise EntryError(f"unknown team(s) {', '.join(missing)}")
    return Entry(
        id=entry_id,
        questions=questions,
        answer=answer,
        source=source,
        tags=list(tags),
        teams=sorted(set(entry_teams)) if entry_teams is not None else None,
        ttl_s=float(ttl) if ttl is not None else None,
        created_at=time.time() if now is None else now,
    )


def parse_entries(objs: Any, teams: frozenset[str] | None = None, where: list[str] | None = None) -> list[Entry]:
    """Validate a batch: every entry, and ids unique within it. All errors are reported together."""
    if not isinstance(objs, list):
        raise EntryError("expected a list of entries")
    if not objs:
        raise EntryError("no entries")
    now = time.time()
    entries: list[Entry] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for i, obj in enumerate(objs):
        label = where[i] if where else f"entries[{i}]"
        try:
            entry = parse_entry(obj, teams, now)
        except EntryError as e:
            problems.append(f"{label}: {e}")
            continue
        if entry.id in seen:
            problems.append(f"{label}: duplicate id '{entry.id}' (also at {seen[entry.id]})")
            continue
        seen[entry.id] = label
        entries.append(entry)
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise EntryError("; ".join(problems[:20]) + more)
    return entries


def read_entries_file(path: str | Path) -> tuple[list[Any], list[str]]:
    """The raw entries of a JSONL or YAML file and where each came from (file:line)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise EntryError(f"{p}: cannot read: {e.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise EntryError(f"{p}: the file is {size} bytes; the limit is {MAX_FILE_BYTES} (split it)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EntryError(f"{p}: not UTF-8 text") from None
    if not text.strip():
        raise EntryError(f"{p}: the file has no entries")
    objs: list[Any] = []
    where: list[str] = []
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise EntryError(f"{p}:{mark.line + 1 if mark else 1}: YAML syntax error: {problem}") from None
        if isinstance(data, dict) and isinstance(data.get("entries"), list):
            data = data["entries"]
        if not isinstance(data, list):
            raise EntryError(f"{p}: expected a list of entries (or `entries:` with a list)")
        objs = data
        where = [f"{p}: entry {i + 1}" for i in range(len(data))]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                objs.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise EntryError(f"{p}:{n}: invalid JSON: {e}") from None
            where.append(f"{p}:{n}")
    if not objs:
        raise EntryError(f"{p}: the file has no entries")
    if len(objs) > MAX_FILE_ENTRIES:
        raise EntryError(f"{p}: {len(objs)} entries; the limit is {MAX_FILE_ENTRIES} per file (split it)")
    return objs, where
