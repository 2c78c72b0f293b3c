"""llm-numbers-proxy: an OpenAI-compatible gateway that makes LLM spend smaller, provably."""

__version__ = "0.1.0"
