"""The learned pair verifier: training, the file it ships as, and `check` refusing a verifier file that
another embedder's cosines trained (file:line), or one that is not a verifier at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from proxy.config.loader import ConfigError, parse_policy_text
from proxy.retrieval.guards import analyse
from proxy.retrieval.matcher import HIT, Matcher
from proxy.retrieval.verifier import FEATURES, VerifierError, load_verifier, pair_features, train_verifier
from tests.conftest import ROOT


def _toy_verifier(embedder: str = "local:all-MiniLM-L6-v2"):
    """Trained on pairs where high cosine and agreeing tokens mean equivalent."""
    rng = np.random.default_rng(3)
    same, other = analyse("Who wrote Hamlet?"), analyse("Who wrote Macbeth?")
    rows, labels = [], []
    for _ in range(400):
        cos = float(rng.uniform(0.7, 1.0))
        agree = bool(rng.random() < 0.7)
        rows.append(pair_features(cos, 0.05, same, same if agree else other))
        labels.append(agree and cos > 0.9)
    return train_verifier(np.stack(rows), np.array(labels), embedder, threshold=0.5, min_similarity=0.8)


def test_a_verifier_learns_cosine_and_token_agreement_and_survives_its_file(tmp_path: Path) -> None:
    v = _toy_verifier()
    same, other = analyse("Who wrote Hamlet?"), analyse("Who wrote Macbeth?")
    assert v.score(0.97, 0.05, same, same) > 0.9
    assert v.score(0.97, 0.05, same, other) < 0.5
    assert v.score(0.82, 0.05, same, same) < 0.5
    path = tmp_path / "v.json"
    path.write_bytes(v.dump())
    loaded = load_verifier(path)
    assert loaded.embedder == v.embedder and loaded.threshold == v.threshold
    assert loaded.score(0.97, 0.05, same, same) == pytest.approx(v.score(0.97, 0.05, same, same))
    # In the matcher: the verifier decides after the floor, the margin and the guards.
    m = Matcher(0.8, 0.0, decisive_tokens=False, verifier=loaded)
    assert m.judge(0.97, 0.05, same, same) == HIT
    assert m.judge(0.97, 0.05, same, other) == "verifier_rejected"
    assert m.judge(0.75, 0.05, same, same) == "low_similarity"


def test_files_that_are_not_verifiers_are_refused(tmp_path: Path) -> None:
    good = json.loads(_toy_verifier().dump())
    cases = {
        "missing.json": None,
        "junk.json": "{not json",
        "other.json": json.dumps({"format": "something/else"}),
        "features.json": json.dumps({**good, "features": ["cosine"]}),
        "short.json": json.dumps({**good, "weights": [1.0]}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(VerifierError):
            load_verifier(path)
    assert len(FEATURES) == len(good["weights"])


POLICY = """\
version: 1
models:
  big: {{api_base: "http://127.0.0.1:9/v1", price: {{input_per_mtok: 2.5, output_per_mtok: 10}}}}
  embed: {{api_base: "http://127.0.0.1:9/v1", mode: embedding, upstream_model: text-embedding-3-small}}
collections:
  faq: {{kind: kb}}
  remote: {{kind: kb, embedder: embed}}
policies:
  - name: faq
    retrieve: {{collection: {collection}, verifier: {verifier}}}
"""


def test_check_refuses_a_verifier_for_another_embedder_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_bytes(_toy_verifier("local:all-MiniLM-L6-v2").dump())
    ok = parse_policy_text(POLICY.format(collection="faq", verifier="v.json"), str(tmp_path / "p.yaml"))
    assert ok.policies[0].retrieve.verifier == str((tmp_path / "v.json").resolve())  # relative to the policy file
    for collection, verifier, message in [
        ("remote", "v.json", "trained on cosines of 'local:all-MiniLM-L6-v2'"),
        ("faq", "nowhere.json", "cannot read the verifier file"),
        ("faq", "p.yaml", "is not a verifier file"),
    ]:
        (tmp_path / "p.yaml").write_text(POLICY.format(collection=collection, verifier=verifier))
        with pytest.raises(ConfigError) as e:
            parse_policy_text((tmp_path / "p.yaml").read_text(), str(tmp_path / "p.yaml"))
        assert len(e.value.issues) == 1
        issue = e.value.issues[0]
        assert issue.line == 10 and issue.path == "policies[0].retrieve.verifier" and message in issue.message
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check", str(tmp_path / "p.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 1 and f"{tmp_path / 'p.yaml'}:10: policies[0].retrieve.verifier" in done.stdout + done.stderr
    )


def test_check_reports_a_verify_model_that_is_unknown_or_not_a_chat_model(tmp_path: Path) -> None:
    base = POLICY.split("policies:")[0].format()
    for model, message in [("nope", "unknown model 'nope'"), ("embed", "is an embedding model")]:
        text = base + f"policies:\n  - name: faq\n    retrieve: {{collection: faq, verify: {{model: {model}}}}}\n"
        with pytest.raises(ConfigError) as e:
            parse_policy_text(text, str(tmp_path / "p.yaml"))
        [issue] = e.value.issues
        assert issue.line == 10 and issue.path == "policies[0].retrieve.verify.model" and message in issue.message
    bad_band = (
        base + "policies:\n  - name: faq\n    retrieve: {collection: faq, verify: {model: big, band: [0.9, 0.8]}}\n"
    )
    with pytest.raises(ConfigError, match="low < high"):
        parse_policy_text(bad_band, str(tmp_path / "p.yaml"))
    ok = base + "policies:\n  - name: faq\n    retrieve: {collection: faq, verify: {model: big, band: [0.9, 0.96]}}\n"
    assert parse_policy_text(ok, str(tmp_path / "p.yaml")).policies[0].retrieve.verify.band == (0.9, 0.96)
