"""The learned router: `router fit` from labelled prompts, its file validated by `check`, and through the
real server (openai SDK, mock upstream) a route that follows the router's prediction, shown by explain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.config.router_file import PACKAGED_LOCAL_MODEL, RouterFileError, read_router_file
from proxy.services.routers.fit import LabelsError, read_labels
from tests.conftest import (
    MASTER_KEY,
    ROOT,
    TEAM_KEYS,
    client_for,
    launch_proxy,
    policy_yaml,
    wait_for,
    wait_until_serving,
)

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Poland", "Warsaw"),
    ("Cuba", "Havana"),
    ("Chile", "Santiago"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Sweden", "Stockholm"),
    ("Portugal", "Lisbon"),
    ("Hungary", "Budapest"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Nepal", "Kathmandu"),
    ("Ghana", "Accra"),
    ("Mali", "Bamako"),
    ("Qatar", "Doha"),
]


def _trivia(country: str) -> str:
    return f"What is the capital city of {country}?"


def _algebra(i: int) -> str:
    a, b, c = 3 + i, 7 * i + 2, i * i + 5
    return f"Solve for x: {a}x^2 + {b}x - {c} = 0, then compute (x1 - x2)^2 / {a + 1} and give it to 4 decimals."


def _labels(tmp: Path) -> Path:
    """The weak model knows capitals; only the strong one solves the algebra."""
    rows = [{"prompt": _trivia(c), "weak_ok": True, "strong_ok": True} for c, _ in CAPITALS[:25]]
    rows += [{"prompt": _algebra(i), "weak_ok": False, "strong_ok": True} for i in range(25)]
    path = tmp / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_router_fit_rejects_labels_with_missing_fields_naming_file_and_line(tmp_path):
    labels = tmp_path / "bad.jsonl"
    labels.write_text(
        '{"prompt": "a", "weak_ok": true, "strong_ok": false}\n'
        '{"prompt": "b", "weak_ok": true}\n'
        "\n"
        '{"weak_ok": true, "strong_ok": true}\n'
        '{"prompt": "c", "winner": "draw"}\n'
        "not json\n"
    )
    out = tmp_path / "router.json"
    r = _cli("router", "fit", "--labels", str(labels), "--out", str(out))
    assert r.returncode == 1
    assert f"{labels}:2: missing field 'strong_ok'" in r.stderr
    assert f"{labels}:4: missing field 'prompt'" in r.stderr
    assert f"{labels}:5: 'winner' must be weak, strong or tie" in r.stderr
    assert f"{labels}:6: invalid JSON" in r.stderr
    assert not out.exists()


def test_labels_in_both_routellm_formats_read_onto_one_quality_scale(tmp_path):
    path = tmp_path / "pairwise.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "winner": ["weak", "strong", "tie"][i % 3]}) + "\n" for i in range(30))
    )
    labels = read_labels(path)
    assert labels.format == "pairwise" and len(labels.prompts) == 30
    assert labels.weak_ok.sum() == 20  # weak wins and ties are at least as good
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(path.read_text() + '{"prompt": "x", "weak_ok": true, "strong_ok": true}\n')
    with pytest.raises(LabelsError, match=r"mixed.jsonl:31: a correctness label in a file of pairwise labels"):
        read_labels(mixed)
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "x", "weak_ok": true, "strong_ok": true}\n')
    with pytest.raises(LabelsError, match="a router needs at least 20"):
        read_labels(few)


# Embedding on a loaded 2-core machine: the CLI and the proxy each load MiniLM.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def fitted_router(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("router")
    out = tmp / "router.json"
    r = _cli(
        "router",
        "fit",
        "--labels",
        str(_labels(tmp)),
        "--out",
        str(out),
        "--target-quality",
        "0.99",
        "--folds",
        "5",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "50 correctness labels" in r.stdout
    return out


def test_router_file_records_embedder_data_estimator_threshold_and_curve(fitted_router):
    doc = json.loads(fitted_router.read_text())
    assert doc["embedder"] == {"identity": f"local:{PACKAGED_LOCAL_MODEL}:384", "dim": 384}
    assert doc["labels"]["n"] == 50 and doc["labels"]["format"] == "correctness"
    assert doc["estimator"]["kind"] == "logistic" and len(doc["estimator"]["weights"]) == 384 + len(doc["features"])
    assert doc["curve"][0] == {"threshold": None, "strong_share": 1.0, "quality": 1.0}
    # Held out, the capitals separate from the algebra: half the calls go to the weak model at full quality.
    assert doc["held_out"]["strong_share"] == pytest.approx(0.5, abs=0.06)
    assert doc["held_out"]["quality"] >= 0.99
    router = read_router_file(fitted_router)
    assert router.threshold == doc["threshold"] and router.dim == 384


def _policy(mock_url: str, router: Path, extra: str = "") -> str:
    return policy_yaml(
        mock_url,
        f"""\
        policies:
          - name: learned-small
            when: {{models: [big]}}
            route:
              to: small
              min_cost_multiple: 5
              learned: {{router: {router}{extra}}}
        """,
    )


def _check(tmp: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp / "p.yaml"
    path.write_text(text)
    return _cli("check", str(path))


def test_check_refuses_missing_corrupt_and_mismatched_router_files(tmp_path, mock_upstream, fitted_router):
    good = json.loads(fitted_router.read_text())
    cases = {
        "missing.json": (None, "does not exist"),
        "corrupt.json": ("{not json", "is corrupt: invalid JSON at line 1"),
        "truncated.json": (json.dumps(good)[: len(json.dumps(good)) // 2], "is corrupt"),
        "other-dim.json": (
            {**good, "estimator": {**good["estimator"], "weights": good["estimator"]["weights"] + [0.0] * 384}},
            "must hold 388 numbers",
        ),
        "other-embedder.json": (
            {**good, "embedder": {"identity": "local:bge-small-en:384", "dim": 384}},
            f"fitted on embedder local:bge-small-en:384; this policy embeds with local:{PACKAGED_LOCAL_MODEL}",
        ),
        "not-a-router.json": ({"hello": 1}, "not a router file"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        r = _check(tmp_path, _policy(mock_upstream.url, path))
        assert r.returncode == 1, (name, r.stdout)
        line = next(iter(r.stderr.splitlines()), "")
        assert line.startswith(f"{tmp_path / 'p.yaml'}:") and "policies[0].route.learned" in line, (name, r.stderr)
        assert expected in r.stderr, (name, r.stderr)
    # A target quality the held-out curve never reaches, an unknown embedder, and finally a good file.
    lossy = tmp_path / "lossy.json"
    curve = [good["curve"][0]] + [{**p, "quality": p["quality"] - 0.02} for p in good["curve"][1:]]
    lossy.write_text(json.dumps({**good, "curve": curve}))
    r = _check(tmp_path, _policy(mock_upstream.url, lossy, ", target_quality: 0.99"))
    assert r.returncode == 1 and "only by routing nothing" in r.stderr, r.stderr
    assert _check(tmp_path, _policy(mock_upstream.url, lossy, ", target_quality: 0.97")).returncode == 0
    r = _check(tmp_path, _policy(mock_upstream.url, fitted_router, ", embedder: nope"))
    assert r.returncode == 1 and "unknown embedder 'nope'" in r.stderr, r.stderr
    r = _check(tmp_path, _policy(mock_upstream.url, fitted_router))
    assert r.returncode == 0, r.stderr
    with pytest.raises(RouterFileError, match="does not exist"):
        read_router_file(tmp_path / "missing.json")


def test_the_explain_cli_shows_the_learned_routers_prediction(tmp_path, mock_upstream, fitted_router):
    config = tmp_path / "p.yaml"
    config.write_text(_policy(mock_upstream.url, fitted_router))
    threshold = json.loads(fitted_router.read_text())["threshold"]
    for text, model, routes in ((_trivia("Mali"), "small", True), (_algebra(40), "big", False)):
        body = json.dumps({"model": "big", "messages": [{"role": "user", "content": text}]})
        r = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "explain", "--config", str(config), "--team", "alpha"],
            input=body, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["model"] == model and out["model_requested"] == "big", out
        prediction = out["router"]["learned-small"]
        assert prediction["routes"] is routes and prediction["threshold"] == pytest.approx(threshold)
        assert (prediction["p_cheap_ok"] >= threshold) is routes


def _chat(client, text: str):
    return client.chat.completions.with_raw_response.create(model="big", messages=[{"role": "user", "content": text}])


def _predictions(url: str, outcome: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'llm_proxy_router_predictions_total{{outcome="{outcome}",policy="learned-small"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_router_fitted_by_the_cli_routes_by_its_prediction(session_tmp, mock, fitted_router, tmp_path):
    server = launch_proxy(session_tmp, _policy(mock.url, fitted_router))
    try:
        wait_until_serving(server.url + "/healthz", server.proc, timeout=300)  # it loads MiniLM before serving
        client = client_for(server)
        # Capitals the router never saw go to the cheap model; algebra it never saw stays on the big one.
        for country, _ in CAPITALS[25:]:
            raw = _chat(client, _trivia(country))
            assert raw.headers["x-llm-proxy-model"] == "small", country
            assert raw.headers["x-llm-proxy-policies"] == "learned-small"
        for i in range(30, 35):
            raw = _chat(client, _algebra(i))
            assert raw.headers["x-llm-proxy-model"] == "big", i
        assert _predictions(server.url, "cheap") == 5 and _predictions(server.url, "requested") == 5
        # explain shows what the router predicted for the request, against its threshold.
        threshold = json.loads(fitted_router.read_text())["threshold"]
        for text, model, routes in ((_trivia("Mali"), "small", True), (_algebra(40), "big", False)):
            r = httpx.post(
                server.url + "/v1/proxy/explain",
                headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
                json={"model": "big", "messages": [{"role": "user", "content": text}]},
            )
            out = r.json()
            assert out["model"] == model, out
            prediction = out["router"]["learned-small"]
            assert prediction["routes"] is routes and prediction["threshold"] == pytest.approx(threshold, rel=1e-9)
            assert (prediction["p_cheap_ok"] >= threshold) is routes
        # A router for another embedding dimension passes check only as a well-formed file; at run time its
        # identity does not match the embedder, so nothing routes and the metric says why.
        doc = json.loads(fitted_router.read_text())
        doc["embedder"] = {"identity": f"local:{PACKAGED_LOCAL_MODEL}:768", "dim": 768}
        for key in ("weights", "mean"):
            doc["estimator"][key] = doc["estimator"][key][:384] * 2 + doc["estimator"][key][384:]
        doc["estimator"]["scale"] = doc["estimator"]["scale"][:384] * 2 + doc["estimator"]["scale"][384:]
        other = tmp_path / "router-768.json"
        other.write_text(json.dumps(doc))
        config = next(session_tmp.glob(f"policy-{server.port}.yaml"))
        config.write_text(_policy(mock.url, other))
        r = httpx.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status_code == 200, r.text
        before = _predictions(server.url, "unavailable")
        raw = _chat(client, _trivia("Peru"))
        assert raw.headers["x-llm-proxy-model"] == "big"
        assert _predictions(server.url, "unavailable") == before + 1
        wait_for(lambda: "was fitted on embedder local:all-MiniLM-L6-v2:768" in server.log(), "the log line", 10)
    finally:
        server.stop()


def test_a_reload_that_adds_a_learned_router_loads_its_embedder_and_readyz_says_when(session_tmp, mock, fitted_router):
    server = launch_proxy(session_tmp, policy_yaml(mock.url, ""))
    try:
        wait_until_serving(server.url + "/healthz", server.proc, timeout=120)
        assert "embedders" not in httpx.get(server.url + "/readyz").json()  # nothing embeds yet
        config = next(session_tmp.glob(f"policy-{server.port}.yaml"))
        config.write_text(_policy(mock.url, fitted_router))
        r = httpx.post(server.url + "/admin/reload", headers={"Authorization": f"Bearer {MASTER_KEY}"})
        assert r.status_code == 200, r.text
        # No request has needed the model yet: the reload itself started loading it.
        wait_for(lambda: httpx.get(server.url + "/readyz").json()["embedders"]["local"]["loaded"], "MiniLM", 300)
        assert httpx.get(server.url + "/readyz").json()["embedders"]["local"]["identity"].endswith(":384")
        raw = _chat(client_for(server), _trivia(CAPITALS[-1][0]))
        assert raw.headers["x-llm-proxy-model"] == "small"  # the first request after the reload routes
    finally:
        server.stop()
