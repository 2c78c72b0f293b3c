"""Upstream calls: OpenAI-compatible pass-through, the litellm adapter, retries and fallbacks."""
