"""Retrieval parts on their own: the precision guards, the conversation fingerprint, entry validation,
the vector index (exact and HNSW), calibration, and the collection store on memory and a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from proxy.retrieval.calibrate import Pair, pick_threshold, score_pairs, simulate_cache
from proxy.retrieval.entries import EntryError, load_stored, parse_entries, read_entries_file
from proxy.retrieval.guards import analyse, disagreement
from proxy.retrieval.index import Partition, VectorIndex
from proxy.retrieval.matcher import HIT, Matcher
from proxy.retrieval.query import query_from_chat
from proxy.store.collections import MemoryCollectionStore, RedisCollectionStore, StoredItem
from tests.conftest import REDIS_URL


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ("How many moons does Jupiter have?", "How many moons does Saturn have?", "name"),
        ("What is new in Python 3.12?", "What is new in Python 3.11?", "number"),
        ("How do I call os.path.join?", "How do I call os.path.split?", "code"),
        ('What does "fail open" mean?', 'What does "fail closed" mean?', "quoted"),
        ("When was the Eiffel Tower built?", "Where was the Eiffel Tower built?", "question_word"),
        ("Is the refund policy fair?", "Is the refund policy not fair?", "negation"),
        ("Why did the shares close higher?", "Why did the shares close lower?", "polarity"),
        ("Who wrote Hamlet?", "Who is the author of Hamlet?", None),
        ("What is the capital of France?", "what's the capital city of France", None),
        ("What do Italian customers pay?", "What do customers in Italy pay?", None),
        ("What is the VAT rate in Germany?", "What is the German VAT rate?", None),
        ("Is Java fast?", "Is JavaScript fast?", "name"),
        ("Who rules Austria?", "Who rules Australia?", "name"),
        ("How many moons does Jupiter have", "HOW MANY MOONS DOES JUPITER HAVE", None),
        # Any script, any accents: quoted strings and names decide there too.
        ('什么是"天气"的意思？', '什么是"温度"的意思？', "quoted"),
        ("「東京」とはどういう意味ですか？", "「大阪」とはどういう意味ですか？", "quoted"),
        ("How far is Zürich from Genève?", "How far is Zürich from Lyon?", "name"),
        ("What is the population of Москва?", "What is the population of Киев?", "name"),
        ("How do you pronounce 東京?", "How do you pronounce 大阪?", "name"),
        ("Who is Zoë?", "Who is Zoe?", None),
        ("What is 3+3?", "What is ３+３?", None),
        # Arguments swapped around the same directed words: a bag of words cannot see it.
        ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?", "order"),
        ("What do Democrats think of Republicans?", "What do Republicans think of Democrats?", "order"),
        ("Is Paris bigger than Rome?", "Is Rome bigger than Paris?", "order"),
        ("flights from Paris to Rome", "flights to Rome from Paris", None),
        ("What is the difference between Python and Java?", "What is the difference between Java and Python?", None),
        ("What is the capital of France?", "What is France's capital?", None),
        # A conjunction is not a question word.
        ("What does it mean when a cat purrs?", "What does it mean if a cat purrs?", None),
        ("What does it mean when someone winks at you?", "What is the meaning of someone winking at you?", None),
        ("When does the store open?", "What time does the store open?", "question_word"),
    ],
)
def test_decisive_tokens_must_agree(a: str, b: str, reason: str | None) -> None:
    assert disagreement(analyse(a), analyse(b)) == reason
    assert disagreement(analyse(b), analyse(a)) == reason


def test_matcher_needs_similarity_margin_and_agreeing_tokens() -> None:
    m = Matcher(min_similarity=0.9, min_margin=0.05)
    same, other = analyse("Who wrote Hamlet?"), analyse("Who wrote Macbeth?")
    assert m.judge(0.95, 0.1, same, same) == HIT
    assert m.judge(0.89, 0.1, same, same) == "low_similarity"
    assert m.judge(0.95, 0.01, same, same) == "low_margin"
    assert m.judge(0.99, 0.5, same, other) == "token_mismatch"
    assert Matcher(0.9, 0.05, decisive_tokens=False).judge(0.99, 0.5, same, other) == HIT


def test_a_follow_up_is_not_the_standalone_question() -> None:
    standalone = query_from_chat({"messages": [{"role": "user", "content": "And in Python?"}]})
    follow_up = query_from_chat(
        {
            "messages": [
                {"role": "user", "content": "How do I reverse a list in Java?"},
                {"role": "assistant", "content": "Collections.reverse(list)."},
                {"role": "user", "content": "And in Python?"},
            ]
        }
    )
    assert standalone is not None and follow_up is not None
    assert standalone.text == follow_up.text and standalone.key == follow_up.key
    assert standalone.context == "" and follow_up.context != ""
    with_system = {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi?"}]}
    assert query_from_chat(with_system).context != ""
    assert query_from_chat(with_system, system_prompt="ignore").context == ""
    # Not a text question from a user: no retrieval query at all.
    assert query_from_chat({"messages": [{"role": "assistant", "content": "x"}]}) is None
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    assert query_from_chat({"messages": [{"role": "user", "content": image}]}) is None


def test_entries_are_validated_all_together() -> None:
    ok = {"id": "a", "question": "Q?", "answer": "A."}
    assert parse_entries([ok])[0].questions == ["Q?"]
    for bad, message in [
        ({"id": "b", "question": "Q?"}, "'answer' is missing"),
        ({"id": "b", "question": "Q?", "answer": "  "}, "non-empty"),
        ({"id": "b", "questions": [], "answer": "A"}, "non-empty list"),
        ({"id": "b b", "question": "Q?", "answer": "A"}, "'id'"),
        ({"id": "b", "question": "Q?", "answer": "A", "ttl_s": -1}, "ttl_s"),
        ({"id": "b", "question": "Q?", "answer": "A", "colour": "red"}, "unknown field"),
    ]:
        with pytest.raises(EntryError, match=message):
            parse_entries([ok, bad])
    with pytest.raises(EntryError, match="duplicate id 'a'"):
        parse_entries([ok, dict(ok)])
    with pytest.raises(EntryError, match="unknown team"):
        parse_entries([{**ok, "teams": ["nobody"]}], teams=frozenset({"alpha"}))
    with pytest.raises(EntryError, match="no entries"):
        parse_entries([])


def test_entry_files_bad_input(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EntryError, match="no entries"):
        read_entries_file(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "question": "Q", "answer": "A"}\n{"id": \n')
    with pytest.raises(EntryError, match=r"broken.jsonl:2: invalid JSON"):
        read_entries_file(broken)
    huge = tmp_path / "huge.jsonl"
    with open(huge, "wb") as f:
        f.truncate(65 * 1024 * 1024)  # sparse: refused by size before it is read
    with pytest.raises(EntryError, match="the limit is"):
        read_entries_file(huge)
    yaml_file = tmp_path / "kb.yaml"
    yaml_file.write_text('entries:\n  - {id: a, question: "Q?", answer: A.}\n')
    objs, where = read_entries_file(yaml_file)
    assert objs[0]["id"] == "a" and where == [f"{yaml_file}: entry 1"]


def test_stored_entries_with_vectors_that_do_not_fit_are_re_embedded() -> None:
    entry = parse_entries([{"id": "a", "questions": ["Q1?", "Q2?"], "answer": "A."}])[0]
    entry.embedder = "local:m:4"
    entry.vectors = np.ones((2, 4), np.float32) / 2
    back = load_stored(entry.dump())
    assert back is not None and back.vectors.shape == (2, 4) and back.embedder == "local:m:4"
    raw = entry.dump().replace(b'"dim":4', b'"dim":3')
    assert load_stored(raw).embedder is None  # wrong size for its questions: treated as stale
    assert load_stored(b"not json") is None


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def test_index_hnsw_candidates_agree_with_an_exact_scan() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 5000, 32)
    part = Partition(32)
    rows = [part.add(v) for v in vectors]
    queries = vectors[:50] + 0.05 * _unit(rng, 50, 32)
    exact = [part.search(q, 1)[0][0] for q in queries]
    assert await part.refresh_ann()
    assert [part.search(q, 1)[0][0] for q in queries] == exact
    part.remove(rows[0])  # removed rows are never returned, new rows are found before a rebuild
    fresh = part.add(-vectors[1])
    assert rows[0] not in [r for r, _ in part.search(queries[0], 8)] or fresh == rows[0]
    assert part.search(-vectors[1], 1)[0][0] == fresh


def test_index_partitions_keep_teams_apart() -> None:
    index = VectorIndex("test:2", 2)
    a = index.add(("alpha", ""), np.array([1.0, 0.0], np.float32))
    index.add(("beta", ""), np.array([1.0, 0.0], np.float32))
    found = index.search([("*", ""), ("alpha", "")], np.array([1.0, 0.0], np.float32), 5)
    assert [(k, r) for k, r, _ in found] == [(("alpha", ""), a)]


def _scored(cosines: list[float], labels: list[bool]):
    from proxy.retrieval.calibrate import Scores

    return Scores(np.array(cosines), np.ones(len(cosines), bool), np.array(labels))


def test_calibration_chooses_by_a_lower_confidence_bound_on_precision() -> None:
    from proxy.retrieval.intervals import precision_lower_bound

    # 400 pairs above 0.9, one wrong among the very top: an envelope that asks every higher threshold
    # to meet the target finds none; the lower bound over all hits at a threshold is still high.
    rng = np.random.default_rng(5)
    cos = list(np.sort(rng.uniform(0.9, 1.0, 400))[::-1])
    labels = [i != 2 for i in range(400)]
    # below 0.9: pairs that are mostly wrong
    cos += list(rng.uniform(0.5, 0.9, 400))
    labels += [bool(rng.random() < 0.3) for _ in range(400)]
    scores = _scored(cos, labels)
    t = pick_threshold(scores, 0.95, guarded=False)
    assert t is not None and t < 0.92
    hit = scores.cosine >= t
    tp, n = int((hit & scores.equivalent).sum()), int(hit.sum())
    assert precision_lower_bound(tp, n) >= 0.95
    # The next lower threshold's bound misses the target: this is the most recall the bound allows.
    lower = scores.cosine >= scores.cosine[scores.cosine < t].max()
    assert precision_lower_bound(int((lower & scores.equivalent).sum()), int(lower.sum())) < 0.95
    # Two targets give two thresholds, and a stricter one never a lower threshold.
    strict = pick_threshold(scores, 0.985, guarded=False)
    assert strict is not None and strict > t
    # A handful of right hits cannot carry a high target: 16 of 16 bound precision at 0.83 only.
    few = _scored([0.99 - i * 0.001 for i in range(16)] + [0.5] * 50, [True] * 16 + [False] * 50)
    assert pick_threshold(few, 0.9, guarded=False) is None
    assert pick_threshold(few, 0.8, guarded=False) is not None


def test_calibration_picks_the_lowest_threshold_meeting_the_target() -> None:
    rng = np.random.default_rng(2)
    pairs, va, vb = [], [], []
    for i in range(200):
        equivalent = i % 2 == 0
        base = _unit(rng, 1, 16)[0]
        # Equivalent pairs are close; the others spread from close to far.
        noise = 0.05 if equivalent else 0.05 + 0.5 * (i / 200)
        other = base + noise * _unit(rng, 1, 16)[0]
        pairs.append(Pair(f"text {i}", f"other {i}", equivalent))
        va.append(base)
        vb.append(other / np.linalg.norm(other))
    scores = score_pairs(pairs, np.array(va), np.array(vb))
    t = pick_threshold(scores, 0.9, guarded=False)
    assert t is not None
    hit = scores.cosine >= t
    assert (hit & scores.equivalent).sum() / hit.sum() >= 0.9
    outcome = simulate_cache(pairs, np.array(va), np.array(vb), t, 0.0, guarded=False)
    assert outcome.correct + outcome.wrong + outcome.unlabelled + outcome.misses == len(pairs)


@pytest.fixture(params=["memory", "redis"])
async def collection_store(request):
    if request.param == "memory":
        yield MemoryCollectionStore()
        return
    client = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"llmptest{uuid.uuid4().hex[:8]}"
    yield RedisCollectionStore(client, prefix)
    async for key in client.scan_iter(f"{prefix}:*"):
        await client.delete(key)
    await client.aclose()


def _item(i: str, created: float, expires: float | None = None) -> StoredItem:
    return StoredItem(i, f'{{"id": "{i}"}}'.encode(), expires, created)


async def test_collection_store_versions_evicts_and_expires(collection_store) -> None:
    s = collection_store
    v1 = await s.upsert("c", [_item("a", 1), _item("b", 2)], max_entries=3)
    changes = await s.changes("c", 0)
    assert changes is not None and changes.complete and set(changes.entries) == {"a", "b"}
    v2 = await s.upsert("c", [_item("c", 3), _item("d", 4)], max_entries=3)  # evicts the oldest, a
    assert v2 > v1
    changes = await s.changes("c", v1)
    assert changes.version == v2 and changes.entries["a"] is None and changes.entries["d"] is not None
    assert await s.get("c", "a") is None
    assert await s.delete("c", ["b", "nope"]) == 1
    await s.upsert("c", [_item("e", 5, expires=1.0)], max_entries=10)
    assert await s.purge_expired("c", now=2.0) == 1
    total, raws = await s.page("c", 0, 10)
    assert total == 2 and sorted(raws) == sorted([b'{"id": "c"}', b'{"id": "d"}'])
    assert await s.replace_unchanged("c", [("c", b'{"id": "c"}', b'{"id": "c", "x": 1}'), ("d", b"old", b"new")]) == 1
    assert await s.get("c", "c") == b'{"id": "c", "x": 1}'
    scanned = [i for chunk in [c async for c in s.scan("c")] for i, _ in chunk]
    assert sorted(scanned) == ["c", "d"]


async def test_collection_store_a_replica_far_behind_reloads_everything(collection_store) -> None:
    s = collection_store
    await s.upsert("c", [_item("a", 1)], max_entries=1)
    # max_entries=1 keeps a short change log (10000 changes): overflow it.
    for n in range(6):
        await s.upsert("c", [_item(f"x{n}-{i}", 2 + i) for i in range(2000)], max_entries=1)
    assert await s.changes("c", 1) is None
    assert (await s.changes("c", await s.version("c"))).entries == {}


async def test_concurrent_upserts_all_land(collection_store) -> None:
    s = collection_store
    await asyncio.gather(*(s.upsert("c", [_item(f"k{i}", i)], max_entries=100) for i in range(20)))
    total, _ = await s.page("c", 0, 100)
    assert total == 20 and await s.version("c") == 20


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source", "https://kb.example/a\r\nX-Injected: 1"),
        ("tags", ["ok", "bad\x1b[31m"]),
        ("questions", ["Where is the office?", "Where is\x00 the office?"]),
        ("teams", ["alpha\n"]),
        ("source", "line\u2028separator"),
    ],
)
def test_entries_with_control_characters_in_header_or_log_fields_are_refused(field: str, value) -> None:
    entry = {"id": "c1", "questions": ["Where is the office?"], "answer": "Upstairs.\nRoom 2.", field: value}
    with pytest.raises(EntryError, match="control character"):
        parse_entries([entry])


def test_an_entry_answers_every_phrasing_with_its_one_answer_and_multiline_text_is_kept() -> None:
    [entry] = parse_entries(
        [
            {
                "id": "p",
                "questions": ["Who wrote Hamlet?", "Hamlet's author?", "Who is\nthe author of Hamlet?"],
                "answer": "A\n\tB",
            }
        ]
    )
    assert len(entry.questions) == 3 and entry.answer == "A\n\tB"


async def test_an_error_bound_starts_conservative_learns_down_and_raises_an_entry_that_was_wrong() -> None:
    from proxy.retrieval.error_bound import ErrorBound

    bound = ErrorBound("faq", "p", max_error=0.05, start=0.96, floor=0.92)
    assert bound.answers("e1", 0.96) and not bound.answers("e1", 0.95)
    # Explorations at 0.93-0.96 that re-generated the entry's answer: enough to bound the error at 5%.
    for i in range(120):
        await bound.record(f"e{i % 5}", 0.935 + (i % 5) * 0.005, True, served=False)
    assert bound.threshold() <= 0.935 and bound.answers("e1", 0.94)
    # One wrong outcome for e1 at 0.95 (1 of 121 still bounds the pool's error at 5%): e1 never again
    # answers at or below it; the others still do.
    await bound.record("e1", 0.95, False, served=False)
    assert not bound.answers("e1", 0.95) and bound.answers("e2", 0.95) and bound.answers("e1", 0.97)
    assert bound.status()["answering"] and bound.status()["explored"] == 121


async def test_a_collection_whose_realised_error_exceeds_its_bound_stops_answering() -> None:
    from proxy.retrieval.error_bound import ErrorBound

    bound = ErrorBound("faq", "p", max_error=0.02, start=0.96, floor=0.92)
    for _ in range(40):
        await bound.record("e", 0.99, True, served=True)
    await bound.record("e2", 0.99, False, served=True)  # 1 of 41: its lower bound is below 2%, keep answering
    assert bound.answers("e", 0.99)
    for _ in range(5):
        await bound.record("e3", 0.99, False, served=True)
    status = bound.status()
    assert not status["answering"] and not bound.answers("e", 0.999)
    assert status["served_judged"] == 46 and status["interval"][0] > 0.02


async def test_two_error_bounds_on_one_store_learn_from_each_others_outcomes_and_a_reload_starts_afresh() -> None:
    from proxy.retrieval.error_bound import ErrorBound
    from proxy.store.collections import MemoryCollectionStore

    store = MemoryCollectionStore()
    a, b = (ErrorBound("faq", "p", max_error=0.05, start=0.96, floor=0.92, shared=store) for _ in range(2))
    for i in range(120):
        await a.record(f"e{i % 5}", 0.935 + (i % 5) * 0.005, True, served=False)
    await a.record("e1", 0.95, False, served=False)
    assert not b.answers("e2", 0.94)  # b has not looked yet
    await b.refresh()
    assert b.answers("e2", 0.94) and not b.answers("e1", 0.95) and b.status()["explored"] == 121
    # Another policy (or the same one with another bound) learns apart.
    other = ErrorBound("faq", "p", max_error=0.02, start=0.96, floor=0.92, shared=store)
    await other.refresh()
    assert other.status()["explored"] == 0
    # A reloaded policy's bound forgets the stored outcomes before its first use, for every replica.
    reloaded = ErrorBound("faq", "p", max_error=0.05, start=0.96, floor=0.92, shared=store, reset=True)
    await reloaded.refresh()
    await b.refresh()
    assert reloaded.status()["explored"] == 0 and b.status()["explored"] == 0 and not b.answers("e2", 0.94)
