"""`llm-numbers-proxy kb load | calibrate`: fill a collection from a JSONL/YAML file through a running
proxy's admin API, and pick the similarity threshold (and margin) that meets a target precision."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict

_CHUNK = 2000


def _post(url: str, key: str, entries: list) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps({"entries": entries}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise RuntimeError(message) from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot reach the proxy at {url}: {getattr(e, 'reason', e)}") from None


def cmd_kb_load(args: argparse.Namespace) -> int:
    from proxy.retrieval.entries import EntryError, parse_entries, read_entries_file

    key = args.key or os.environ.get("LLM_PROXY_MASTER_KEY")
    if not key:
        print("kb load needs the master key: --key or LLM_PROXY_MASTER_KEY", file=sys.stderr)
        return 1
    try:
        objs, where = read_entries_file(args.file)
        parse_entries(objs, where=where)  # every error before anything is sent
    except EntryError as e:
        for problem in str(e).split("; "):
            print(problem, file=sys.stderr)
        print("nothing was loaded", file=sys.stderr)
        return 1
    url = f"{args.url.rstrip('/')}/admin/kb/{args.collection}"
    loaded = 0
    for start in range(0, len(objs), _CHUNK):
        try:
            result = _post(url, key, objs[start : start + _CHUNK])
        except RuntimeError as e:
            print(f"{args.file}: {e}", file=sys.stderr)
            if loaded:
                print(f"{loaded} entries were loaded before the error; loading again is safe", file=sys.stderr)
            return 1
        loaded += result["upserted"]
    print(f"{args.file}: {loaded} entries loaded into '{args.collection}' (version {result['version']})")
    return 0


def cmd_kb_calibrate(args: argparse.Namespace) -> int:
    from proxy.retrieval.calibrate import PairsError, calibrate, read_pairs
    from proxy.retrieval.embedders import EmbedderDown, LocalModel

    try:
        pairs = [pair for path in args.pairs for pair in read_pairs(path, args.min_score)]
    except PairsError as e:
        print(e, file=sys.stderr)
        return 1
    if args.limit:
        pairs = pairs[: args.limit]
    model = LocalModel(args.model)
    try:
        model.load_blocking()
    except EmbedderDown as e:
        print(e, file=sys.stderr)
        return 1
    result, vectors_a, vectors_b = calibrate(pairs, model.encode_blocking, args.target_precision, args.confidence)
    report = result.as_dict()
    if args.write_verifier:
        from proxy.retrieval.calibrate import calibrate_verifier

        verifier, held_out = calibrate_verifier(
            pairs,
            vectors_a,
            vectors_b,
            f"local:{model.label}",
            args.target_precision,
            args.confidence,
            trained_on=", ".join(os.path.basename(p) for p in args.pairs),
        )
        try:
            with open(args.write_verifier, "wb") as f:
                f.write(verifier.dump())
        except OSError as e:
            print(f"cannot write {args.write_verifier}: {e.strerror}", file=sys.stderr)
            return 1
        report["verifier"] = {"file": args.write_verifier, "embedder": verifier.embedder, **asdict(held_out)}
    if args.format == "json":
        print(json.dumps(report, indent=2, default=float))
        return 0
    print(
        f"{result.pairs} pairs, {result.equivalent} equivalent; target: the {args.confidence:.0%} lower bound "
        f"of precision >= {args.target_precision:.3f}"
    )
    for label, q in (("cosine threshold only", result.threshold_only), ("guarded matcher", result.guarded)):
        if q.threshold is None:
            print(f"{label:<22} no threshold's lower bound reaches the target on these pairs (more pairs help)")
            continue
        print(
            f"{label:<22} min_similarity {q.threshold:.4f}  precision {q.precision:.3f} "
            f"[{q.precision_low:.3f}, {q.precision_high:.3f}]  recall {q.recall:.3f}  "
            f"false hits {q.false_hit_rate:.4f}  (rests on {q.hits} hits)"
        )
    c = result.cache
    print(
        f"min_margin {result.margin:.3f}: cache simulation {c.correct} correct, {c.wrong} wrong, "
        f"{c.unlabelled} unlabelled, {c.misses} misses (precision {c.precision:.3f})"
    )
    if result.guarded.threshold is not None:
        print(
            f"recall cost: {1 - result.guarded.recall:.1%} of equivalent pairs go upstream at this setting\n"
            f"policy: retrieve: {{min_similarity: {result.guarded.threshold:.4f}, min_margin: {result.margin}}}"
        )
    if args.write_verifier:
        v = report["verifier"]
        if v["threshold"] is None:
            print(f"verifier: no threshold's lower bound reaches the target: {args.write_verifier} never hits")
        else:
            print(
                f"verifier {args.write_verifier} ({v['embedder']}): probability >= {v['threshold']:.4f}, cross-fitted "
                f"precision {v['precision']:.3f} [{v['precision_low']:.3f}, {v['precision_high']:.3f}] recall "
                f"{v['recall']:.3f} (rests on {v['hits']} hits)\npolicy: retrieve: {{verifier: {args.write_verifier}}}"
            )
    return 0


def add_kb_parser(sub: argparse._SubParsersAction) -> None:
    kb = sub.add_parser("kb", help="knowledge-base collections: load entries, calibrate thresholds")
    kb_sub = kb.add_subparsers(dest="kb_command", required=True)

    load = kb_sub.add_parser("load", help="upsert the entries of a JSONL or YAML file through a running proxy")
    load.add_argument("file")
    load.add_argument("--collection", required=True)
    default_url = f"http://127.0.0.1:{os.environ.get('LLM_PROXY_PORT', '4000')}"
    load.add_argument("--url", default=os.environ.get("LLM_PROXY_URL", default_url), help="the proxy's base URL")
    load.add_argument("--key", help="the master key (default: $LLM_PROXY_MASTER_KEY)")
    load.set_defaults(fn=cmd_kb_load)

    cal = kb_sub.add_parser("calibrate", help="pick min_similarity/min_margin for a target precision")
    cal.add_argument(
        "--pairs", required=True, nargs="+", help="labelled pairs files: CSV a,b,score | TSV score,a,b | JSONL"
    )
    cal.add_argument("--write-verifier", metavar="FILE", help="also train the pair verifier and write it here")
    cal.add_argument(
        "--target-precision", type=float, default=0.97, help="the lower confidence bound of precision must reach it"
    )
    cal.add_argument("--confidence", type=float, default=0.95, help="of that one-sided lower bound (Clopper-Pearson)")
    cal.add_argument("--min-score", type=float, default=4.0, help="a scored pair is equivalent at this score")
    cal.add_argument("--model", help="a sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    cal.add_argument("--limit", type=int, help="use only the first N pairs")
    cal.add_argument("--format", choices=["table", "json"], default="table")
    cal.set_defaults(fn=cmd_kb_calibrate)
