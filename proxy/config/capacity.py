"""A self-hosted model's GPU memory, from its serving facts in the policy file: the weights take about 2 bytes
per parameter at fp16 (7B → 14 GB), and generation holds about 1 MB per token in flight for a 13B model.

What is left after the weights and a safety margin is the budget of tokens in flight (prompt plus max output
tokens of every request being generated) that the micro-batcher, the pre-budget check and `check` enforce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Bytes per parameter of the weights, by the dtype the model is served in.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# Bytes per element of the KV cache: quantised weights (int8, int4) shrink the weights, not the cache,
# which most servers keep at 16 bits; only fp32 serving doubles it. A quantised cache: set kv_mb_per_token.
_KV_BYTES = {"fp32": 4.0}
# The founding number: ~1 MB of KV cache per token for a 13B model at 16 bits (40 layers × 5120 × K and V
# × 2 bytes ≈ 0.8 MB). The cache grows with layers × width, so it is scaled by the parameter count.
_REFERENCE_KV_MB, _REFERENCE_PARAMS_B = 1.0, 13.0
MB_PER_GB = 1000.0


def default_kv_mb_per_token(params_b: float, dtype: str) -> float:
    """MB of KV cache per token in flight when the policy file does not say: scaled from the founding 13B figure."""
    return _REFERENCE_KV_MB * params_b / _REFERENCE_PARAMS_B * _KV_BYTES.get(dtype, 2.0) / 2.0


@dataclass(frozen=True, slots=True)
class ModelMemory:
    """The memory arithmetic of one self-hosted model; `of(cfg)` is None for a model without serving facts."""

    gpu_memory_gb: float  # all its GPUs together
    margin: float  # fraction of GPU memory kept free (activations, CUDA context, fragmentation)
    params_b: float
    dtype: str
    kv_mb_per_token: float

    @classmethod
    def of(cls, cfg: Any) -> ModelMemory | None:
        """The memory facts of a model's config (a ModelConfig), or None when it declares none."""
        if cfg.hardware is None or cfg.params_b is None:
            return None
        kv = cfg.kv_mb_per_token or default_kv_mb_per_token(cfg.params_b, cfg.dtype)
        gpu = cfg.hardware.gpu_memory_gb * cfg.hardware.gpus
        return cls(gpu, cfg.hardware.memory_margin, cfg.params_b, cfg.dtype, kv)

    @property
    def weights_gb(self) -> float:
        return self.params_b * BYTES_PER_PARAM[self.dtype]

    @property
    def usable_gb(self) -> float:
        return self.gpu_memory_gb * (1 - self.margin)

    @property
    def budget_mb(self) -> float:
        """MB left for requests in flight after the weights and the safety margin (0 when none is)."""
        return max(0.0, (self.usable_gb - self.weights_gb) * MB_PER_GB)

    @property
    def token_budget(self) -> int:
        """Tokens (prompt plus max output, all requests in flight together) that fit the budget."""
        return math.floor(self.budget_mb / self.kv_mb_per_token + 1e-9)

    def mb(self, tokens: int) -> float:
        return tokens * self.kv_mb_per_token

    def misfit(self, model: str, tokens: int) -> str | None:
        """Why a request holding `tokens` can never be served by this model, or None when it fits alone."""
        if tokens <= self.token_budget:
            return None
        return (
            f"This request would hold {tokens} tokens (prompt plus max output tokens) in the GPU memory of model "
            f"'{model}': {self.mb(tokens):,.0f} MB at {self.kv_mb_per_token:g} MB per token. The model has "
            f"{self.budget_mb:,.0f} MB ({self.token_budget} tokens) for requests in flight, what is left of "
            f"{self.gpu_memory_gb:g} GB after its weights ({self.weights_gb:g} GB at {self.dtype}) and a "
            f"{self.margin:.0%} safety margin. Lower max_tokens or shorten the prompt."
        )

    def describe(self, tokens: int) -> dict[str, Any]:
        """The memory a request would hold, for explain."""
        return {
            "tokens": tokens,
            "mb": round(self.mb(tokens), 3),
            "kv_mb_per_token": self.kv_mb_per_token,
            "budget_mb": round(self.budget_mb, 3),
            "budget_tokens": self.token_budget,
            "weights_gb": self.weights_gb,
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": tokens <= self.token_budget,
        }
