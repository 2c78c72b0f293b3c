"""Request body fields that would let a client choose the upstream, its credentials, its headers, how
it is retried or routed, or where its traffic is logged: all refused, because the proxy decides.

The names come from what the OpenAI SDKs, litellm's `completion()` keyword arguments
(`litellm.types.utils.all_litellm_params`, `OWNED_KWARG_NAMES`, the callback credentials of
`StandardCallbackDynamicParams`) and provider adapters (AWS, Azure, Vertex) honour. The litellm adapter
passes a body's fields to litellm as keyword arguments, so every one of these would otherwise steer it.
tests/test_security.py checks the list against the installed litellm, so an upgrade that adds a
steering parameter fails a test instead of opening a hole.
"""

from __future__ import annotations

FORBIDDEN_FIELDS = frozenset(
    {
        # where the request goes and as whom
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "responses_api_version",
        "api_type",
        "organization",
        "project",
        "deployment_id",
        "deployment_url",
        "sagemaker_base_url",
        "custom_llm_provider",
        "provider",
        "region_name",
        "tenant_id",
        "client_id",
        "client_secret",
        "use_litellm_proxy",
        "use_in_pass_through",
        "use_chat_completions_api",
        "configurable_clientside_auth_params",
        "chatgpt_auth_file",
        "use_xai_oauth",
        "data_residency",
        # headers sent upstream, and the HTTP client itself
        "headers",
        "extra_headers",
        "provider_specific_header",
        "provider_affinity_header",
        "client",
        "shared_session",
        "ssl_verify",
        # routing, fallbacks and retries (the policy file decides these)
        "model_list",
        "user_config",
        "fallbacks",
        "context_window_fallback_dict",
        "max_fallbacks",
        "fallback_depth",
        "num_retries",
        "max_retries",
        "retry_policy",
        "retry_strategy",
        "routing_strategy",
        "model_info",
        "model_alias_map",
        "base_model",
        "timeout",
        "request_timeout",
        "stream_timeout",
        "force_timeout",
        # litellm's logging, callbacks, caching and budget hooks
        "litellm_params",
        "tags",
        "callbacks",
        "success_callback",
        "failure_callback",
        "logger_fn",
        "proxy_server_request",
        "secret_fields",
        "caching",
        "cache",
        "cache_key",
        "preset_cache_key",
        "guardrails",
        "max_budget",
        "default_api_key_rpm_limit",
        "default_api_key_tpm_limit",
        "turn_off_message_logging",
        "budget_duration",
        "input_cost_per_token",
        "output_cost_per_token",
        "input_cost_per_second",
        "output_cost_per_second",
        "custom_prompt_dict",
        "no-log",
        "verbose",
    }
)

# Families of provider credentials and endpoints, logging-integration keys and hosts, and litellm's
# internal keyword arguments. No OpenAI request field starts with any of these.
FORBIDDEN_PREFIXES = (
    "_",
    "aws_",
    "azure",
    "vertex_",
    "s3_",
    "gcs_",
    "watsonx_",
    "anthropic_",
    "openai_identity",
    "openai_service",
    "token_exchange_",
    "github_copilot_",
    "litellm_",
    "mock_",
    "langfuse_",
    "langsmith_",
    "arize_",
    "posthog_",
    "humanloop_",
    "wandb_",
    "weave_",
    "dd_",
    "newrelic_",
    "signoz_",
    "auto_router_",
    "complexity_router_",
    "adaptive_router_",
    "quality_router_",
    "switchyard_",
)


def forbidden_field(body: dict) -> str | None:
    """The first field of `body` a client may not set, or None."""
    found = FORBIDDEN_FIELDS.intersection(body)
    if found:
        return min(found)
    for name in body:
        if name.startswith(FORBIDDEN_PREFIXES):
            return name
    return None
