"""`llm-numbers-proxy router fit`: fit a learned router from labelled prompts and write its file;
`router embedder`: build the language-model embedder a router may be fitted on."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from proxy.services.routers.llm_embedder import DEFAULT_LAYERS

_NO_SHARED_STORE = (
    "router fit --from-store reads the shared store: set LLM_PROXY_REDIS_URL (or --redis-url) to the proxy's "
    "Redis. The embedded memory store lives inside the serving process: export its labels with "
    "GET /admin/shadow/labels?policy=NAME and fit them with --labels FILE."
)


def _store_labels(args: argparse.Namespace):
    """The labels a running proxy kept for `--policy` (teams that retain prompts), read from its Redis; with
    the local model that policy's learned route or the policy file names (unless --model)."""
    from proxy.config import ConfigError, load_policy_file
    from proxy.services.routers.fit import LabelsError, parse_labels
    from proxy.services.shadow_labels import NoLabels, retained_labels
    from proxy.store.base import StoreUnavailable
    from proxy.store.redis import RedisStore

    if not args.policy:
        raise LabelsError(["--from-store needs --policy NAME: the shadowed policy whose judgements are the labels"])
    url = args.redis_url or os.environ.get("LLM_PROXY_REDIS_URL")
    if not url:
        raise LabelsError([_NO_SHARED_STORE])
    try:
        policy = load_policy_file(args.config)
    except ConfigError as e:
        raise LabelsError([str(issue) for issue in e.issues]) from None

    async def read():
        store = RedisStore(url, policy.store)
        try:
            return await retained_labels(policy, store, args.policy)
        finally:
            await store.close()

    try:
        kept = asyncio.run(read())
    except NoLabels as e:
        raise LabelsError([f"{args.config}: {e}"]) from None
    except StoreUnavailable as e:
        raise LabelsError([f"cannot read the store at {url.split('@')[-1]}: {e}"]) from None
    import orjson

    source = f"store labels of policy {args.policy} (teams {', '.join(kept.teams)})"
    labels = parse_labels([orjson.dumps(row).decode() for row in kept.rows], source)
    return labels, args.model or _local_model_of(policy, args.policy)


def _local_model_of(policy, name: str) -> str | None:
    """The in-process model a policy's learned route embeds with (its own, or the retrieval one)."""
    for p in policy.policies:
        learned = p.route.learned if p.name == name and p.route is not None else None
        if learned is not None and learned.local_model is not None:
            return learned.local_model
    return policy.retrieval.local_model


def cmd_router_fit(args: argparse.Namespace) -> int:
    from proxy.config.router_file import RouterFileError, write_router_file
    from proxy.retrieval.embedders import EmbedderDown, LocalModel
    from proxy.services.routers.features import CHEAP_FEATURES, feature_matrix
    from proxy.services.routers.fit import LabelsError, fit_router, read_labels, router_document

    if not 0 < args.target_quality <= 1:
        print(f"--target-quality must be in (0, 1], got {args.target_quality}", file=sys.stderr)
        return 1
    try:
        if args.from_store:
            labels, args.model = _store_labels(args)
        else:
            labels = read_labels(args.labels)
    except LabelsError as e:
        for problem in e.problems[:50]:
            print(problem, file=sys.stderr)
        if len(e.problems) > 50:
            print(f"... and {len(e.problems) - 50} more", file=sys.stderr)
        return 1
    model = LocalModel(args.model, args.threads)
    try:
        model.load_blocking()
        vectors = model.encode_blocking(labels.prompts)
    except EmbedderDown as e:
        print(f"cannot embed the prompts: {e}", file=sys.stderr)
        return 1
    identity = f"local:{model.label}:{model.dim}"
    x = feature_matrix(vectors, labels.prompts)
    fitted = fit_router(x, labels, args.target_quality, args.folds, args.seed)
    doc = router_document(fitted, labels, identity, int(model.dim or vectors.shape[1]), list(CHEAP_FEATURES))
    try:
        write_router_file(args.out, doc)
    except (OSError, RouterFileError) as e:
        print(f"cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    point = fitted.chosen
    print(
        f"{args.out}: {len(labels.prompts)} {labels.format} labels, embedder {identity}, logistic l2={fitted.l2:g}; "
        f"held out ({args.folds} folds): {point.strong_share:.1%} strong calls keep {point.quality:.1%} of "
        f"all-strong quality (target {args.target_quality:.1%}; all-weak keeps {doc['labels']['all_weak_quality']:.1%})"
    )
    return 0


def cmd_router_embedder(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.services.routers.llm_embedder import EmbedderBuildError, build_embedder, packaged_gguf

    out = Path(args.out)
    try:
        gguf = Path(args.gguf) if args.gguf else packaged_gguf(Path(args.cache_dir))
        built = build_embedder(gguf, args.layers, out)
    except EmbedderBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(
        f"{out}: the first {built['layers']} of {built['of']} layers of {gguf.name} ({built['model_type']}), "
        f"mean-pooled, {built['dim']} dimensions; fit a router on it with `router fit --model {out}` and name it "
        "in the route as `learned.local_model`"
    )
    return 0


def add_router_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="learned routers: fit one from labelled prompts, build an embedder for one")
    rsub = r.add_subparsers(dest="router_command", required=True)
    f = rsub.add_parser(
        "fit",
        help="fit a router from JSONL labels ({prompt, weak_ok, strong_ok} or {prompt, winner: weak|strong|tie})",
    )
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="JSONL of labelled prompts")
    source.add_argument(
        "--from-store",
        action="store_true",
        help="the judged shadow samples a running proxy kept (teams with retain_prompts) in its Redis",
    )
    f.add_argument("--policy", help="with --from-store: the shadowed policy whose judgements are the labels")
    f.add_argument(
        "--config",
        default=os.environ.get("LLM_PROXY_CONFIG", "policies/default.yaml"),
        help="with --from-store: the proxy's policy file (its teams, store prefix and local model)",
    )
    f.add_argument("--redis-url", help="with --from-store: the proxy's Redis (default $LLM_PROXY_REDIS_URL)")
    f.add_argument("--out", required=True, help="the router file to write (JSON)")
    f.add_argument("--target-quality", type=float, default=0.95, help="quality to keep vs all-strong (held out)")
    f.add_argument("--folds", type=int, default=5, choices=range(2, 21), metavar="K", help="held-out folds (2-20)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--model",
        metavar="PATH",
        help="a sentence-transformers folder (default: the packaged MiniLM; `router embedder` builds one that routes "
        "better, bench/RESULTS.md)",
    )
    f.add_argument("--threads", type=int, default=2, help="torch threads for embedding the labels")
    f.set_defaults(fn=cmd_router_fit)
    e = rsub.add_parser(
        "embedder",
        help="build an in-process router embedder from gemma-3-270m (the GGUF packaged on PyPI): its first "
        "layers, mean-pooled, as a sentence-transformers folder",
    )
    e.add_argument("--out", required=True, help="the folder to write (new or empty)")
    e.add_argument(
        "--layers", type=int, default=DEFAULT_LAYERS, help="decoder layers to keep (more: slower, not better on MMLU)"
    )
    e.add_argument("--gguf", metavar="FILE", help="another gemma-3 GGUF (default: the packaged gemma-3-270m)")
    e.add_argument(
        "--cache-dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "llm-numbers-proxy"),
        help="where the packaged GGUF is joined from its chunks (once)",
    )
    e.set_defaults(fn=cmd_router_embedder)
