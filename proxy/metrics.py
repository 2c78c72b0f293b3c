"""Every Prometheus metric the proxy exports, defined once. Names are a public interface.

Labels only ever take values from bounded sets: team and model names from the policy file,
route, status class, token type. Never keys, prompts, client addresses or user agents.
docs/metrics.md lists them all; tests/test_metrics_catalog.py keeps both equal.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

_children: dict[Any, dict[tuple[str, ...], Any]] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, cached: `.labels()` validates, builds a tuple and takes a lock on
    every call (~2 µs), and a request touches a dozen label sets. The sets are bounded (team and
    model names from the config), so is the cache."""
    try:
        return _children[metric][values]
    except KeyError:
        found = _children.setdefault(metric, {})[values] = metric.labels(*values)
        return found


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

REQUESTS = Counter(
    "llm_proxy_requests",
    "Requests answered by the proxy, by team, requested model, route and HTTP status class.",
    ["team", "model", "route", "status_class"],
)
TOKENS = Counter(
    "llm_proxy_tokens",
    "Tokens billed, by team, model that answered, token type (input/output; of those cached_input, cache_write, "
    "reasoning) and source (reported by the "
    "upstream, or counted by the proxy when it reported none).",
    ["team", "model", "type", "source"],
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "OpenTelemetry GenAI: tokens used per request, by token type (input/output).",
    ["gen_ai_request_model", "gen_ai_token_type"],
    buckets=_TOKEN_BUCKETS,
)
SPEND = Counter(
    "llm_proxy_spend_usd",
    "Real cost of answered requests in USD, by team and model that answered.",
    ["team", "model"],
)
OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "OpenTelemetry GenAI: end-to-end duration of a request through the proxy, by requested model and route.",
    ["gen_ai_request_model", "route"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "OpenTelemetry GenAI: time from request to the first streamed chunk, by model.",
    ["gen_ai_request_model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    "llm_proxy_upstream_latency_seconds",
    "Time the upstream took to answer (response headers for streams), by model that answered.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "llm_proxy_upstream_errors",
    "Failed upstream attempts, by model and kind (4xx, 429, 5xx, timeout, connect, bad_response).",
    ["model", "kind"],
)
RETRIES = Counter(
    "llm_proxy_retries",
    "Upstream attempts retried after a retryable failure, by model.",
    ["model"],
)
FALLBACKS = Counter(
    "llm_proxy_fallbacks",
    "Requests that moved to a fallback model after the primary failed, by model and fallback.",
    ["model", "fallback"],
)
OVERHEAD = Histogram(
    "llm_proxy_overhead_seconds",
    "Wall time the proxy itself added to a request (total minus upstream time), by route.",
    ["route"],
    buckets=_OVERHEAD_BUCKETS,
)
POLICY_APPLIED = Counter(
    "llm_proxy_policy_applied",
    "Requests a policy acted on, by policy name and action.",
    ["policy", "action"],
)
RATE_LIMITED = Counter(
    "llm_proxy_rate_limited",
    "Requests refused by a rate limit or a budget, by team and reason (rpm, tpm, budget).",
    ["team", "reason"],
)
BUDGET_REMAINING = Gauge(
    "llm_proxy_budget_remaining_usd",
    "USD left in the team's budget for the current period (last value this replica saw).",
    ["team"],
    multiprocess_mode="mostrecent",
)
CONFIG_RELOADS = Counter(
    "llm_proxy_config_reloads",
    "Policy file reloads, by result (success, error).",
    ["result"],
)
for _result in ("success", "error"):  # exported at 0 from the start, so a first reload shows as an increase
    CONFIG_RELOADS.labels(_result)
STORE_JOURNAL = Gauge(
    "llm_proxy_store_journal_entries",
    "Spend records waiting in the local journal for the shared store to come back.",
    multiprocess_mode="livesum",
)
BATCH_SIZE = Histogram(
    "llm_proxy_batch_size",
    "Rows (prompts or inputs) per upstream call the micro-batcher made, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
BATCH_QUEUE_WAIT = Histogram(
    "llm_proxy_batch_queue_wait_seconds",
    "Time a request waited in the micro-batcher's queue before its call left (0 when sent at once), by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_QUEUE_DEPTH = Gauge(
    "llm_proxy_batch_queue_depth",
    "Requests waiting in the micro-batcher's queue, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
BATCHES_IN_FLIGHT = Gauge(
    "llm_proxy_batches_in_flight",
    "Micro-batcher calls in flight to the upstream, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
BATCH_MEMORY_RESERVED = Histogram(
    "llm_proxy_batch_memory_reserved_mb",
    "GPU memory (MB) an upstream call of the micro-batcher reserved: (prompt + max output tokens) x MB per token.",
    ["model"],
    buckets=(1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
BATCH_MEMORY_IN_FLIGHT = Gauge(
    "llm_proxy_batch_memory_in_flight_mb",
    "GPU memory (MB) reserved by the micro-batcher's calls in flight, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
BATCH_MEMORY_BUDGET = Gauge(
    "llm_proxy_batch_memory_budget_mb",
    "GPU memory (MB) a model has for requests in flight after its weights and safety margin, by model.",
    ["model"],
    multiprocess_mode="livemax",
)
BATCH_ITEM_ERRORS = Counter(
    "llm_proxy_batch_item_errors",
    "Requests of a batch that failed on their own while the rest of their batch succeeded, by model.",
    ["model"],
)
SAVED = Counter(
    "llm_proxy_saved_usd",
    "USD saved against the counterfactual (no policy), by team, requested model and the policy that saved it.",
    ["team", "model", "policy"],
)
CONCISE_OUTPUT_TOKENS = Histogram(
    "llm_proxy_concise_output_tokens",
    "Output tokens per request of a conciseness policy, by policy, model that answered and arm (treated/holdout).",
    ["policy", "model", "arm"],
    buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
)
RETRIEVAL_LOOKUPS = Counter(
    "llm_proxy_retrieval_lookups",
    "Retrieval lookups by collection, policy and result (hit, exact_hit, miss, low_similarity, low_margin, "
    "token_mismatch, verifier_rejected, llm_rejected, llm_error, explored, over_bound, not_worth_it, not_ready, "
    "embedder_down, unsupported).",
    ["collection", "policy", "result"],
)
RETRIEVAL_SIMILARITY = Histogram(
    "llm_proxy_retrieval_similarity",
    "Similarity of the best entry found per lookup, by collection.",
    ["collection"],
    buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0),
)
RETRIEVAL_ENTRIES = Gauge(
    "llm_proxy_retrieval_entries",
    "Entries in this replica's index of a collection.",
    ["collection"],
    multiprocess_mode="mostrecent",
)
RETRIEVAL_VERDICTS = Counter(
    "llm_proxy_retrieval_verdicts",
    "Verified retrieval outcomes (client feedback on a hit, or an exploration's re-generation), by collection, "
    "policy and verdict (good, bad).",
    ["collection", "policy", "verdict"],
)
RETRIEVAL_REALISED_ERROR = Gauge(
    "llm_proxy_retrieval_realised_error",
    "Share of judged retrieval hits that were wrong, per collection and policy with max_error (this worker).",
    ["collection", "policy"],
    multiprocess_mode="mostrecent",
)
RETRIEVAL_CACHE_FILLS = Counter(
    "llm_proxy_retrieval_cache_fills",
    "Upstream answers offered to a semantic cache, by collection and result (stored, not_cacheable, skipped, error).",
    ["collection", "result"],
)
EMBEDDER_ERRORS = Counter(
    "llm_proxy_embedder_errors",
    "Failed embeddings, by embedder and kind (timeout, upstream, bad_response, unavailable, loading, error); "
    "the request skips retrieval and goes upstream.",
    ["embedder", "kind"],
)
EMBEDDING_DURATION = Histogram(
    "llm_proxy_embedding_duration_seconds",
    "Time to embed one request or batch, by embedder.",
    ["embedder"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SHADOW_JUDGEMENTS = Counter(
    "llm_proxy_shadow_judgements",
    "Shadow comparisons of a cost policy's answer with the counterfactual's, by policy and outcome "
    "(win, tie, loss, unjudged).",
    ["policy", "outcome"],
)
SHADOW_DROPPED = Counter(
    "llm_proxy_shadow_dropped",
    "Sampled shadow evaluations not made, by policy and reason "
    "(queue_full, budget, store_down, shadow_error, untranslatable, shutdown).",
    ["policy", "reason"],
)
SHADOW_JUDGE_ERRORS = Counter(
    "llm_proxy_shadow_judge_errors",
    "Judge calls that gave no verdict, by judge model and kind (unparseable, error, timeout): the pair is unjudged.",
    ["model", "kind"],
)
SHADOW_SPEND = Counter(
    "llm_proxy_shadow_spend_usd",
    "Measurement spend in USD (never a team's), by model and kind (shadow: the counterfactual call; judge).",
    ["model", "kind"],
)
SHADOW_QUALITY = Gauge(
    "llm_proxy_shadow_quality_retained",
    "Share of judged shadow pairs where the policy's answer is at least as good, over the floor's window, by "
    "policy and bound (estimate, low, high: the Wilson 95% interval).",
    ["policy", "bound"],
    multiprocess_mode="mostrecent",
)
SHADOW_POLICY_STOPPED = Gauge(
    "llm_proxy_shadow_policy_stopped",
    "1 when a policy has stopped acting because its measured quality fell below its min_quality floor (until a "
    "reload), else 0, by policy.",
    ["policy"],
    multiprocess_mode="max",
)
SHADOW_LABELS = Counter(
    "llm_proxy_shadow_labels_retained",
    "Judged shadow samples kept with their prompt (teams with retain_prompts) as labels for `router fit "
    "--from-store`, by policy.",
    ["policy"],
)
SHADOW_QUEUE_DEPTH = Gauge(
    "llm_proxy_shadow_queue_depth",
    "Shadow evaluations waiting for a worker.",
    multiprocess_mode="livesum",
)
ROUTER_PREDICTIONS = Counter(
    "llm_proxy_router_predictions",
    "Learned-router decisions by policy and outcome (cheap: predicted good enough, routed; requested: kept "
    "the requested model; unavailable: no prediction, embedder down or mismatched, kept the requested model).",
    ["policy", "outcome"],
)
