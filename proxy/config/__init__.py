"""The policy file: pydantic models, the loader with file:line errors, and hot reload."""

from proxy.config.loader import (
    ConfigError,
    ConfigIssue,
    load_policy_file,
    parse_policy_text,
)
from proxy.config.models import ModelConfig, PolicyFile, TeamConfig

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "ModelConfig",
    "PolicyFile",
    "TeamConfig",
    "load_policy_file",
    "parse_policy_text",
]
