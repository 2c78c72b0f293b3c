"""A learned router on a language-model embedder: `router embedder` builds it from the packaged gemma-3-270m,
`router fit --model` fits on it, a route names it as `learned.local_model` (its own in-process model, apart
from the retrieval one), `check` refuses what does not fit, and the real server routes by its prediction."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from proxy.retrieval.embedders import LocalModel
from tests.conftest import MASTER_KEY, TEAM_KEYS, client_for, launch_proxy, wait_until_serving
from tests.test_learned_router import CAPITALS, _algebra, _chat, _check, _cli, _labels, _policy, _trivia

pytestmark = pytest.mark.timeout(900)  # building and loading the model on a loaded 2-core machine

LAYERS = 2  # the test's embedder: two decoder layers are enough to tell capitals from algebra, and quick


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gemma")
    out = tmp / "gemma-l2"
    r = _cli("router", "embedder", "--out", str(out), "--layers", str(LAYERS), "--cache-dir", str(tmp / "cache"))
    assert r.returncode == 0, r.stderr
    assert f"the first {LAYERS} of 18 layers" in r.stdout and "640 dimensions" in r.stdout
    return out


@pytest.fixture(scope="module")
def gemma_router(gemma_dir: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gemma-router")
    out = tmp / "router.json"
    r = _cli("router", "fit", "--labels", str(_labels(tmp)), "--out", str(out), "--target-quality", "0.99",
             "--model", str(gemma_dir), "--threads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def test_the_built_folder_is_a_sentence_transformers_model_of_the_first_layers(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS and config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config  # dequantised: the proxy loads it without a GGUF reader
    model = LocalModel(str(gemma_dir), 1)
    model.load_blocking()
    vectors = model.encode_blocking([_trivia("France"), _trivia("Italy"), _algebra(1)])
    assert vectors.shape == (3, 640) and model.dim == 640
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)  # unit vectors, in bfloat16
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2]  # two capitals questions are closer to each other than to algebra


def test_router_fit_on_the_language_model_records_it_and_separates_the_labels(gemma_router):
    doc = json.loads(gemma_router.read_text())
    assert doc["embedder"] == {"identity": f"local:gemma-l{LAYERS}:640", "dim": 640}
    assert len(doc["estimator"]["weights"]) == 640 + len(doc["features"])
    assert doc["held_out"]["strong_share"] == pytest.approx(0.5, abs=0.06) and doc["held_out"]["quality"] >= 0.99


def test_router_embedder_refuses_bad_arguments_with_a_clear_error(tmp_path, gemma_dir):
    gguf = next((gemma_dir.parent / "cache").glob("*.gguf"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a model")
    cases = [
        (["--layers", "0"], "--layers must be between 1 and 18"),
        (["--layers", "19"], "--layers must be between 1 and 18"),
        (["--out", str(busy)], "exists and is not an empty folder"),
        (["--gguf", str(tmp_path / "missing.gguf")], "missing.gguf: no such file"),
        (["--gguf", str(not_gguf)], "cannot load it as a language model"),
        (["--out", str(not_gguf / "sub")], "cannot write"),  # a file where the folder's parent should be
    ]
    for extra, expected in cases:
        args = ["--out", str(tmp_path / "out"), "--gguf", str(gguf), *extra]
        r = _cli("router", "embedder", *args)
        assert r.returncode == 1 and expected in r.stderr, (extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists(), extra  # nothing half-written
        assert not list(tmp_path.glob("*.partial")), extra


def test_check_refuses_a_local_model_that_does_not_fit_the_route(tmp_path, mock_upstream, gemma_dir, gemma_router):
    minilm_router = tmp_path / "minilm.json"
    r = _cli("router", "fit", "--labels", str(_labels(tmp_path)), "--out", str(minilm_router), "--threads", "1")
    assert r.returncode == 0, r.stderr
    cases = [
        (gemma_router, "", "fitted on embedder local:gemma-l2:640; this policy embeds with local:all-MiniLM-L6-v2"),
        (minilm_router, f", local_model: {gemma_dir}", "this policy embeds with local:gemma-l2"),
        (gemma_router, f", local_model: {tmp_path / 'nowhere'}", "is not a sentence-transformers folder"),
        (gemma_router, f", local_model: {gemma_dir}, embedder: emb", "is the folder of `embedder: local`"),
    ]
    for router, extra, expected in cases:
        r = _check(tmp_path, _policy(mock_upstream.url, router, extra))
        assert r.returncode == 1, (extra, r.stdout)
        line = next(iter(r.stderr.splitlines()), "")
        assert line.startswith(f"{tmp_path / 'p.yaml'}:") and "policies[0].route.learned" in line, (extra, r.stderr)
        assert expected in r.stderr, (extra, r.stderr)
    # The folder is relative to the policy file, as the router file is.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / gemma_dir.name).symlink_to(gemma_dir)
    r = _check(tmp_path, _policy(mock_upstream.url, gemma_router, f", local_model: models/{gemma_dir.name}"))
    assert r.returncode == 0, r.stderr


def test_a_route_on_its_own_local_model_routes_by_the_language_models_prediction(
    session_tmp, mock, gemma_dir, gemma_router
):
    server = launch_proxy(session_tmp, _policy(mock.url, gemma_router, f", local_model: {gemma_dir}"))
    try:
        wait_until_serving(server.url + "/healthz", server.proc, timeout=300)
        client = client_for(server)
        for country, _ in CAPITALS[25:]:
            raw = _chat(client, _trivia(country))
            assert raw.headers["x-llm-proxy-model"] == "small", country
        for i in range(30, 35):
            assert _chat(client, _algebra(i)).headers["x-llm-proxy-model"] == "big", i
        r = httpx.post(
            server.url + "/v1/proxy/explain",
            headers={"Authorization": f"Bearer {TEAM_KEYS['alpha']}"},
            json={"model": "big", "messages": [{"role": "user", "content": _trivia("Mali")}]},
        )
        prediction = r.json()["router"]["learned-small"]
        assert prediction["routes"] is True and prediction["p_cheap_ok"] >= prediction["threshold"]
        # readyz names the route's own in-process model apart from the retrieval one.
        ready = httpx.get(server.url + "/readyz", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
        assert f"local:gemma-l{LAYERS}:640" in json.dumps(ready), ready
    finally:
        server.stop()
