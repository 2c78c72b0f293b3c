"""Fuzzing the running proxy over HTTP with hypothesis: mutated OpenAI bodies (wrong types, huge and
negative numbers, unicode, deep nesting, non-JSON bytes, broken UTF-8, wrong content types) and odd
headers (auth variants, opt-out headers, lying content lengths), at least 500 cases per endpoint.

Whatever arrives, the proxy answers below 500 (its upstream, a mock that answers 400 to a body it
cannot use, is healthy), every 4xx is OpenAI-shaped, the process stays up, and a rejected request
changes nothing: spend, budgets, rate-limit windows (read straight from Redis) and the spend and
token metrics are the same after a batch of rejected requests as before it.

Reproducible: hypothesis runs derandomized (the same cases on every run and machine).
"""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MASTER_KEY, REDIS_URL, Server, private_redis_keys, start_proxy, wait_for
from tests.recording_upstream import RecordingUpstream

CASES = 500
FUZZ = settings(
    max_examples=CASES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

KEYS = {"alpha": "sk-fuzz-alpha", "tight": "sk-fuzz-tight", "limited": "sk-fuzz-limited"}
ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
ADMIN = {"authorization": f"Bearer {MASTER_KEY}"}
FORBIDDEN = ["api_base", "base_url", "api_key", "custom_llm_provider", "extra_headers", "litellm_params", "user_config"]


def _policy(upstream: str, prefix: str) -> str:
    limited_hash = "sha256:" + hashlib.sha256(KEYS["limited"].encode()).hexdigest()
    return f"""\
version: 1
server: {{max_body_bytes: 65536}}
store: {{key_prefix: {prefix}}}
retries: {{max_attempts: 2, max_total_s: 5, initial_backoff_s: 0.01, max_backoff_s: 0.02, max_retry_after_s: 1}}
models:
  big:
    api_base: {upstream}/v1
    upstream_model: mock-big
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
    max_input_tokens: 4000
  small:
    api_base: {upstream}/v1
    upstream_model: mock-small
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
  embed:
    api_base: {upstream}/v1
    upstream_model: mock-embed
    mode: embedding
    price: {{input_per_mtok: 0.02}}
teams:
  alpha:
    keys: [{KEYS["alpha"]}]
    budget: {{usd: 1000, period: day}}
    limits: {{rpm: 1000000, tpm: 1000000000}}
  tight:
    keys: [{KEYS["tight"]}]
    budget: {{usd: 0.000000001, period: day}}
    limits: {{rpm: 1000000}}
  limited:
    keys: [{limited_hash}]
    limits: {{tpm: 1}}
tasks:
  summarize: {{patterns: ["(?i)summari[sz]e"]}}
collections:
  faq: {{kind: kb, embedder: embed}}
  answers: {{kind: cache, embedder: embed}}
policies:
  - name: blocked
    when: {{headers: {{x-fuzz-reject: "yes"}}}}
    reject: {{message: "Blocked by the fuzz policy.", status: 403}}
  - name: cap-output
    set: {{max_tokens: {{max: 64}}}}
  - name: cheap-summaries
    when: {{task: summarize}}
    route: {{to: small, min_cost_multiple: 2}}
  - name: be-concise
    when: {{models: [big]}}
    concise: {{holdout: 0.2}}
  - name: faq
    when: {{teams: [alpha], models: [big]}}
    retrieve: {{collection: faq, min_similarity: 0.99}}
  - name: cache
    when: {{teams: [alpha], models: [big]}}
    retrieve: {{collection: answers, cache: true}}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    with private_redis_keys(f"llmpfuzz{uuid.uuid4().hex[:8]}") as name:
        yield name


@pytest.fixture(scope="module")
def fuzz_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: RecordingUpstream, prefix: str) -> Iterator[Server]:
    server = start_proxy(tmp_path_factory.mktemp("fuzz"), _policy(upstream.url, prefix), redis_url=REDIS_URL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(fuzz_proxy: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_proxy.url, timeout=30) as client:
        yield client


# --- what every answer must look like -------------------------------------------------------------


def check_answer(r: httpx.Response, what: object) -> None:
    assert r.status_code < 500, f"{r.status_code} for {what!r}: {r.text[:400]}"
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{r.status_code} is not an OpenAI error for {what!r}: {r.text[:400]}") from None
        assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), r.text[:400]
        assert isinstance(err["message"], str) and err["message"], r.text[:400]
        assert isinstance(err["type"], str) and err["type"], r.text[:400]


def check_alive(server: Server, http: httpx.Client) -> None:
    assert server.proc.poll() is None, server.log()[-4000:]
    assert http.get("/healthz").status_code == 200
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


# --- strategies -----------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALAR = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NUMBER = st.integers(-3, 300) | INT64 | st.floats(allow_nan=False, allow_infinity=False) | JSON
TEXT = st.text(max_size=80) | st.sampled_from(
    ["Summarise this article.", "What is a proxy?", "🙂" * 20, "\u202e\u0000x"]
)
MODEL = st.integers(0, 9).flatmap(
    lambda i: JSON if i == 7 else st.sampled_from(["big"] * 4 + ["small"] * 4 + ["embed", "nope", "", "BIG", "big "])
)

ROLE = st.sampled_from(["system", "developer", "user", "user", "user", "assistant", "tool", "function"])
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}) | st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text(max_size=20)})},
    optional={"detail": st.sampled_from(["low", "high", "auto"])},
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE, "content": TEXT | st.lists(PART, min_size=1, max_size=3)}, optional={"name": st.text(max_size=10)}
)
TOOL = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": TEXT}, optional={"parameters": JSON})}
)
# Fields of a valid type: the bodies start valid, and `mutated` breaks them.
COMMON = {
    "max_tokens": st.integers(1, 200),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "temperature": st.floats(0, 2),
    "user": TEXT,
    "metadata": st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
    "stop": TEXT | st.lists(TEXT, max_size=2),
    "seed": st.integers(0, 2**31),
}
CHAT = st.fixed_dictionaries(
    {"model": MODEL, "messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    optional={
        **COMMON,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "max_completion_tokens": st.integers(1, 200),
        "tools": st.lists(TOOL, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none"]),
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    },
).map(lambda b: {**b, "stream": True} if "stream_options" in b else b)
PROMPT = (
    TEXT
    | st.lists(TEXT, min_size=1, max_size=3)
    | st.lists(st.integers(0, 100_000), min_size=1, max_size=6)
    | st.lists(st.lists(st.integers(0, 100_000), min_size=1, max_size=4), min_size=1, max_size=3)
)
COMPLETION = st.fixed_dictionaries(
    {"model": MODEL, "prompt": PROMPT},
    optional={**COMMON, "echo": st.booleans(), "suffix": TEXT, "best_of": st.integers(1, 3)},
)
EMBEDDING = st.fixed_dictionaries(
    {"model": st.integers(0, 3).flatmap(lambda i: MODEL if i == 2 else st.just("embed")), "input": PROMPT},
    optional={"dimensions": st.integers(1, 64), "encoding_format": st.sampled_from(["float", "base64"]), "user": TEXT},
)
# What a mutation may set a field to: anything, and the numbers and strings that break validators.
ANY = JSON | NUMBER | st.sampled_from([-1, 0, 2**63 - 1, -(2**63), 1e308, "", "0", [], {}, True, None])
FIELDS = [*sorted(COMMON), "model", "messages", "prompt", "input", "tools", "functions", "stream_options", "n"]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict]) -> object:
    """A body from `base`, then a few mutations: a key dropped, a field (or a field of a message) set
    to anything, a client-chosen upstream field added, or the whole body replaced."""
    body = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "set", "set", "message", "forbidden", "replace"]))
        if kind == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif kind == "set":
            body[draw(st.sampled_from(FIELDS) | st.text(max_size=12))] = draw(ANY)
        elif kind == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            message = draw(st.sampled_from(body["messages"]))
            if isinstance(message, dict):
                message[draw(st.sampled_from(["role", "content", "name", "tool_calls"]) | st.text(max_size=6))] = draw(
                    ANY | st.lists(ANY, max_size=3)
                )
        elif kind == "forbidden":
            body[draw(st.sampled_from(FORBIDDEN))] = draw(JSON)
        elif kind == "replace":
            return draw(JSON)
    return body


def _deeply_nested(depth: int, where: str) -> bytes:
    nested = b"[" * depth + b"]" * depth
    if where == "messages":
        return b'{"model": "big", "messages": ' + nested + b"}"
    if where == "content":
        return b'{"model": "big", "messages": [{"role": "user", "content": ' + nested + b"}]}"
    return b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "x": ' + nested + b"}"


@st.composite
def encoded(draw: st.DrawFn, base: st.SearchStrategy[dict]) -> tuple[bytes, str | None]:
    """The bytes on the wire and the content type: mostly JSON of a mutated body, sometimes not."""
    kind = draw(st.sampled_from(["json"] * 12 + ["binary", "broken_utf8", "deep", "huge_number", "truncated"]))
    ctype = draw(
        st.sampled_from(
            ["application/json"] * 24
            + [None, "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"]
            + ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
            + ["", ";", "application/json;;;", "*/*"]
        )
    )
    if kind == "binary":
        return draw(st.binary(max_size=200)), ctype
    if kind == "deep":
        where = draw(st.sampled_from(["messages", "content", "extra"]))
        return _deeply_nested(draw(st.sampled_from([2, 100, 254, 255, 256, 300, 1023, 1024, 1025, 5000])), where), ctype
    raw = orjson.dumps(draw(mutated(base)))
    if kind == "broken_utf8" and len(raw) > 2:
        at = draw(st.integers(1, len(raw) - 1))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + raw[
            at:
        ], ctype
    if kind == "huge_number" and raw.endswith(b"}"):
        return raw[:-1] + b', "max_tokens": 1' + b"0" * draw(st.integers(19, 400)) + b"}", ctype
    if kind == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))], ctype
    return raw, ctype


HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
AUTH = st.integers(0, 19).flatmap(
    lambda i: (
        HEADER_VALUE.map(lambda v: {"authorization": v})
        if i == 0
        else st.sampled_from(
            [ALPHA] * 20
            + [
                {},
                {"authorization": "Bearer"},
                {"authorization": "Bearer "},
                {"authorization": f"bearer {KEYS['alpha']}"},
                {"authorization": f"Basic {KEYS['alpha']}"},
                {"authorization": f"Bearer {KEYS['alpha']} extra"},
                {"authorization": "Bearer " + "k" * 6000},
                {"api-key": KEYS["alpha"]},
                {"api-key": ""},
                {"authorization": f"Bearer {KEYS['tight']}"},
                {"authorization": f"Bearer {KEYS['limited']}"},
                {"authorization": f"Bearer {MASTER_KEY}"},
            ]
        )
    )
)
ODD_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "x-llm-proxy-no-concise",
            "x-fuzz-reject",
            "x-llm-proxy-team",
            "openai-organization",
            "x-api-key",
            "accept",
            "accept-encoding",
            "x-forwarded-for",
            "anthropic-version",
        ]
    )
    | st.from_regex(r"\Ax-[a-z0-9-]{1,20}\Z"),
    HEADER_VALUE,
    max_size=3,
)


def _headers(auth: dict, odd: dict, ctype: str | None) -> dict[str, bytes]:
    headers = {k: v.strip().encode("latin-1") for k, v in {**odd, **auth}.items()}
    if ctype is not None:
        headers["content-type"] = ctype.encode()
    return headers


def _post_fuzzed(http: httpx.Client, path: str, wire: tuple[bytes, str | None], auth: dict, odd: dict) -> int:
    raw, ctype = wire
    r = http.post(path, content=raw, headers=_headers(auth, odd, ctype))
    check_answer(r, (path, raw[:300], ctype, auth, odd))
    return r.status_code


def _fuzz_post(server: Server, http: httpx.Client, path: str, bodies: st.SearchStrategy) -> None:
    statuses: Counter[int] = Counter()

    @FUZZ
    @given(wire=encoded(bodies), auth=AUTH, odd=ODD_HEADERS)
    def case(wire, auth, odd):
        statuses[_post_fuzzed(http, path, wire, auth, odd)] += 1

    case()
    print(f"{path}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    # The cases reach every outcome: answered, refused as malformed, unauthenticated.
    assert statuses[200] and statuses[400] and statuses[401], statuses
    check_alive(server, http)


# --- the OpenAI endpoints -------------------------------------------------------------------------


def test_fuzz_chat_completions(fuzz_proxy: Server, http: httpx.Client) -> None:
    _fuzz_post(fuzz_proxy, http, "/v1/chat/completions", CHAT)


def test_fuzz_completions(fuzz_proxy: Server, http: httpx.Client) -> None:
    _fuzz_post(fuzz_proxy, http, "/v1/completions", COMPLETION)


def test_fuzz_embeddings(fuzz_proxy: Server, http: httpx.Client) -> None:
    _fuzz_post(fuzz_proxy, http, "/v1/embeddings", EMBEDDING)


def test_fuzz_explain(fuzz_proxy: Server, http: httpx.Client) -> None:
    _fuzz_post(fuzz_proxy, http, "/v1/proxy/explain", CHAT | COMPLETION | EMBEDDING)


def test_fuzz_models(fuzz_proxy: Server, http: httpx.Client) -> None:
    @FUZZ
    @given(
        method=st.sampled_from(["GET"] * 6 + ["POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
        path=st.sampled_from(["/v1/models", "/models", "/v1/models/", "/v1/models/big"]),
        query=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
        auth=AUTH,
        odd=ODD_HEADERS,
    )
    def case(method, path, query, auth, odd):
        r = http.request(method, path, params=query, headers=_headers(auth, odd, None))
        if method != "HEAD":
            check_answer(r, (method, path, query, auth, odd))
        assert r.status_code < 500
        if r.status_code == 200 and method == "GET":
            body = r.json()
            data = [body] if path == "/v1/models/big" else body["data"]  # GET /v1/models/{id}: one model card
            assert {m["id"] for m in data} <= {"big", "small", "embed"}

    case()
    check_alive(fuzz_proxy, http)


def test_fuzz_content_length_lies(fuzz_proxy: Server, http: httpx.Client) -> None:
    """Raw HTTP with a Content-Length that lies (shorter, longer, not a number): the proxy answers a
    clean error or waits for the rest until the client leaves, and keeps serving."""

    @settings(FUZZ, max_examples=100)
    @given(
        body=CHAT.map(orjson.dumps),
        declared=st.integers(-3, 80) | st.sampled_from(["abc", "", "1e3", "0x10", "99999999999999999999", " 5"]),
        auth=AUTH,
    )
    def case(body, declared, auth):
        length = str(len(body) + declared) if isinstance(declared, int) else declared
        head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: fuzz", b"Connection: close"]
        head += [f"{k}: {v}".encode("latin-1") for k, v in auth.items() if "\r" not in v and "\n" not in v]
        head += [b"Content-Type: application/json", b"Content-Length: " + length.encode()]
        with socket.create_connection(("127.0.0.1", fuzz_proxy.port), timeout=10) as s:
            s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
            s.shutdown(socket.SHUT_WR)  # the client has nothing more to send: a longer promise is never kept
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        if reply:
            status = int(reply.split(b" ", 2)[1])
            assert status < 500, reply[:400]

    case()
    check_alive(fuzz_proxy, http)


# --- the admin endpoints --------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/admin/reload"),
    ("GET", "/admin/config"),
    ("GET", "/admin/spend"),
    ("GET", "/admin/savings"),
    ("GET", "/admin/kb"),
    ("GET", "/admin/kb/{name}"),
    ("POST", "/admin/kb/{name}"),
    ("DELETE", "/admin/kb/{name}/{id}"),
]
ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "id": TEXT | JSON,
        "question": TEXT | JSON,
        "questions": st.lists(TEXT, max_size=3) | JSON,
        "answer": TEXT | JSON,
        "teams": st.lists(st.sampled_from(["alpha", "tight", "nobody"]), max_size=2) | JSON,
        "ttl_s": NUMBER,
        "tags": JSON,
        "source": JSON,
    },
)
ENTRIES = st.lists(ENTRY, max_size=3) | st.fixed_dictionaries({"entries": st.lists(ENTRY, max_size=3) | JSON}) | JSON


def _kb_total(http: httpx.Client, name: str) -> int:
    r = http.get(f"/admin/kb/{name}", headers=ADMIN)
    return r.json()["total"] if r.status_code == 200 else -1


def test_fuzz_admin_endpoints(fuzz_proxy: Server, http: httpx.Client) -> None:
    @FUZZ
    @given(
        route=st.sampled_from(ADMIN_ROUTES),
        wrong_method=st.integers(0, 9).map(lambda i: i == 7),
        name=st.sampled_from(["faq", "answers", "nope"]) | st.text(max_size=12),
        entry_id=st.text(max_size=20),
        query=st.dictionaries(
            st.sampled_from(["days", "offset", "limit"]) | st.text(max_size=6),
            st.sampled_from(["1", "0", "-1", "90", "91", "abc", "1e5", "99999999999999999999999"])
            | st.text(max_size=10),
            max_size=3,
        ),
        auth=st.sampled_from(
            [ADMIN] * 3 + [{}, {"authorization": "Bearer sk-master-wrong"}, ALPHA, {"api-key": MASTER_KEY}]
        )
        | HEADER_VALUE.map(lambda v: {"authorization": v}),
        wire=st.tuples(ENTRIES.map(orjson.dumps), st.just("application/json"))
        | st.tuples(st.binary(max_size=100), st.sampled_from(["application/json", "text/plain"])),
    )
    def case(route, wrong_method, name, entry_id, query, auth, wire):
        method, template = route
        if wrong_method:
            method = {"GET": "POST", "POST": "PUT", "DELETE": "PATCH"}[method]
        path = template.format(name=quote(name, safe=""), id=quote(entry_id, safe="") or "x")
        upsert = method == "POST" and template == "/admin/kb/{name}" and name in ("faq", "answers")
        before = _kb_total(http, name) if upsert else None
        r = http.request(method, path, params=query, content=wire[0], headers=_headers(auth, {}, wire[1]))
        check_answer(r, (method, path, query, auth, wire[0][:200]))
        if auth.get("authorization") != ADMIN["authorization"] and auth.get("api-key") != MASTER_KEY:
            assert not 200 <= r.status_code < 300, f"{method} {path} answered {r.status_code} without the master key"
        if upsert and r.status_code >= 400:
            assert _kb_total(http, name) == before, "a rejected upsert stored entries"

    case()
    check_alive(fuzz_proxy, http)


# --- a rejected request changes nothing -----------------------------------------------------------

_COUNTED = re.compile(
    r"^(llm_proxy_spend_usd_total|llm_proxy_tokens_total|llm_proxy_saved_usd_total|gen_ai_client_token_usage_(sum|count)"
    r"|llm_proxy_retrieval_cache_fills_total|llm_proxy_concise_output_tokens_count)\{"
)


def _counted_metrics(http: httpx.Client) -> dict[str, str]:
    lines = http.get("/metrics").text.splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if _COUNTED.match(line))


def _store_state(prefix: str) -> dict[bytes, object]:
    """Every key under the proxy's prefix with its value; zero counters count as absent (a window
    counted up and back down is unchanged)."""
    client = redis.Redis.from_url(REDIS_URL)
    out: dict[bytes, object] = {}
    try:
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            kind = client.type(key)
            if kind == b"string":
                value: object = client.get(key)
                if value in (b"0", b"0.0"):
                    continue
            elif kind == b"hash":
                value = {f: v for f, v in client.hgetall(key).items() if v not in (b"0", b"0.0")}
                if not value:
                    continue
            elif kind == b"zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == b"set":
                value = sorted(client.smembers(key))
            elif kind == b"list":
                value = client.lrange(key, 0, -1)
            else:
                value = kind
            out[key] = value
    finally:
        client.close()
    return out


def _spend(http: httpx.Client) -> dict:
    r = http.get("/admin/spend", headers=ADMIN)
    r.raise_for_status()
    return r.json()


VALID_CHAT = st.fixed_dictionaries(
    {"model": st.sampled_from(["big", "small"]), "messages": st.lists(MESSAGE, min_size=1, max_size=2)}
).filter(lambda b: all(isinstance(m["role"], str) and isinstance(m.get("content", ""), str) for m in b["messages"]))


@st.composite
def rejected_request(draw: st.DrawFn) -> tuple[bytes, dict]:
    """A request the proxy must refuse, at every step that can refuse one: bad JSON or shape, a
    forbidden field, a bad key, an unknown model, a policy reject and an exhausted budget (after the
    rate-limit step counted it), a rate limit."""
    body = draw(VALID_CHAT)
    how = draw(
        st.sampled_from(
            ["forbidden", "bad_type", "not_json", "bad_key", "unknown_model", "policy", "budget", "limit", "too_long"]
        )
    )
    auth, extra = dict(ALPHA), {}
    if how == "forbidden":
        body[draw(st.sampled_from(FORBIDDEN))] = draw(JSON)
    elif how == "bad_type":
        body[draw(st.sampled_from(["max_tokens", "n", "stream", "messages", "model"]))] = draw(
            st.text(min_size=1, max_size=5) | st.lists(st.booleans(), max_size=2)
        )
    elif how == "not_json":
        return draw(st.binary(max_size=50)).replace(b"{", b"") + b"{", auth
    elif how == "bad_key":
        auth = {"authorization": "Bearer sk-" + draw(st.text("abcdef0123456789", min_size=1, max_size=20))}
    elif how == "unknown_model":
        body["model"] = "nope-" + draw(st.text("abcdef", max_size=5))
    elif how == "policy":
        extra = {"x-fuzz-reject": "yes"}
    elif how == "budget":
        auth = {"authorization": f"Bearer {KEYS['tight']}"}
    elif how == "limit":
        auth = {"authorization": f"Bearer {KEYS['limited']}"}
    elif how == "too_long":
        body["model"] = "big"
        body["messages"] = [{"role": "user", "content": "word " * 4100}]
    return orjson.dumps(body), {**auth, **extra}


def test_rejected_requests_change_no_spend_budget_limit_or_metric(
    fuzz_proxy: Server, http: httpx.Client, upstream: RecordingUpstream, prefix: str
) -> None:
    hello = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    ok = http.post("/v1/chat/completions", json=hello, headers=ALPHA)
    assert ok.status_code == 200, ok.text  # something is counted, so "unchanged" is not "all empty"
    # Spend is recorded once the response is out: wait for it before taking the "before" picture.
    wait_for(lambda: _spend(http)["teams"]["alpha"]["spend_usd"] > 0, "the first request's spend")
    spend, metrics_before, store = _spend(http), _counted_metrics(http), _store_state(prefix)
    calls = upstream.calls()
    statuses: set[int] = set()

    @settings(FUZZ, max_examples=200)
    @given(request=rejected_request())
    def case(request):
        raw, headers = request
        r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json", **headers})
        check_answer(r, request)
        assert 400 <= r.status_code < 500, f"{r.status_code} for a request that must be refused: {request!r}"
        statuses.add(r.status_code)

    case()
    assert {400, 401, 403, 404, 429} <= statuses
    assert upstream.calls() == calls, "a rejected request reached the upstream"
    assert _spend(http) == spend
    assert _counted_metrics(http) == metrics_before
    assert _store_state(prefix) == store
    check_alive(fuzz_proxy, http)


async def test_a_refused_requests_rate_limit_undo_lands_in_the_window_that_counted_it(monkeypatch):
    """A request counted in the last instant of a minute and refused by a later step in the next one
    is taken back out of the minute that counted it (the clock is set: a boundary cannot be awaited)."""
    from proxy.config.models import PolicyFile
    from proxy.pipeline.context import RequestContext
    from proxy.steps.limits import EnforceRateLimits
    from proxy.store.base import LimitWindow
    from proxy.store.memory import MemoryStore

    policy = PolicyFile.model_validate(
        {
            "version": 1,
            "models": {"m": {"api_base": "http://127.0.0.1:9/v1", "price": {"input_per_mtok": 1}}},
            "teams": {"t": {"keys": ["k"], "limits": {"rpm": 5}}},
        }
    )
    store = MemoryStore()
    step = EnforceRateLimits(policy, store)
    ctx = RequestContext(request_id="r", endpoint="chat", headers={}, team="t", key_id="f")
    clock = [119.99]  # the last instant of minute 1
    monkeypatch.setattr("proxy.steps.limits.time.time", lambda: clock[0])
    await step.on_request(ctx)
    clock[0] = 120.01  # minute 2 began before a later step refused the request
    await step.on_settle(ctx)  # never dispatched: the hit is undone
    seen = await store.hit_limits([LimitWindow("t", "team:rpm", 5, 0)], 120.01)
    assert seen.used == (0.0,), "the refused request still counts against the team"
