"""Token counting with tiktoken, following OpenAI's rules for chat messages as far as tiktoken allows.

tiktoken downloads its BPE files on first use; this machine class has no internet, so we point it at
the copies litellm ships in its wheel (found without importing litellm).

An encoding costs tens of MiB (o200k_base ~78 MiB as tiktoken builds it), so each loads on the first
request that needs it, and its Python-side copy of the BPE ranks is dropped once the Rust tokenizer
has its own (~30 MiB of o200k_base's footprint).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import orjson
import tiktoken

DEFAULT_ENCODING = "o200k_base"

# Per OpenAI's cookbook: every message costs 3 tokens of framing, a name 1 more, the reply is primed with 3.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# Images: 85 tokens at low detail; high/auto detail depends on the image size, which a proxy cannot
# know without fetching it, so it is estimated as a 1024×1024 image (4 tiles × 170 + 85).
_IMAGE_LOW = 85
_IMAGE_HIGH = 765
_TOOLS_OVERHEAD = 12


def _use_packaged_bpe_files() -> None:
    if "TIKTOKEN_CACHE_DIR" in os.environ or "DATA_GYM_CACHE_DIR" in os.environ:
        return
    spec = importlib.util.find_spec("litellm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        d = Path(location) / "litellm_core_utils" / "tokenizers"
        if d.is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(d)
            return


_use_packaged_bpe_files()


log = logging.getLogger("llm_proxy.tokens")


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays high)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    enc = tiktoken.get_encoding(name)
    # tiktoken keeps the ranks dict only to pickle the Encoding; the Rust core encodes from its own
    # copy. Nothing here pickles an Encoding, so the ~200k bytes objects are freed.
    if getattr(enc, "_mergeable_ranks", None) is not None:
        del enc._mergeable_ranks
    gc.collect()
    _release_freed_heap()
    log.info("loaded tokenizer %s", name)
    return enc


def check_encoding_name(name: str) -> str:
    """Fail at config time (not on the first request) for an encoding tiktoken does not have."""
    if name not in _encoding_names():
        raise ValueError(f"Unknown encoding {name}: tiktoken has {', '.join(_encoding_names())}.")
    return name


@cache
def _encoding_names() -> tuple[str, ...]:
    return tuple(tiktoken.list_encoding_names())


@lru_cache(maxsize=1024)
def encoding_name_for(model: str) -> str:
    """The encoding of a model name; o200k_base for models tiktoken does not know."""
    base = model.split("/")[-1]
    if base.startswith("ft:"):
        base = base.split(":")[1]
    try:
        return tiktoken.encoding_name_for_model(base)
    except KeyError:
        return DEFAULT_ENCODING


class TokenCounter:
    """Counts tokens for one encoding; cheap to build, encodings are shared and load on first use."""

    __slots__ = ("_encode", "encoding_name")

    def __init__(self, encoding_name: str):
        self.encoding_name = check_encoding_name(encoding_name)
        self._encode = self._load_then_encode

    def _load_then_encode(self, s: str) -> list[int]:
        # The first count swaps in the encoding's own method: later calls pay no check.
        self._encode = get_encoding(self.encoding_name).encode_ordinary
        return self._encode(s)

    def text(self, s: str) -> int:
        return len(self._encode(s)) if s else 0

    def content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.text(content)
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                total += self.text(part.get("text") or "")
            elif kind == "image_url":
                image = part.get("image_url")
                detail = image.get("detail", "auto") if isinstance(image, dict) else "auto"
                total += _IMAGE_LOW if detail == "low" else _IMAGE_HIGH
            elif kind in ("input_audio", "file"):
                continue  # billed by the provider by duration or pages: not countable here
            else:
                total += self.text(orjson.dumps(part).decode())
        return total

    def chat_prompt(self, messages: list[dict], tools: list | None = None, functions: list | None = None) -> int:
        total = _REPLY_PRIMING
        for m in messages:
            total += _TOKENS_PER_MESSAGE
            for key, value in m.items():
                if key == "content":
                    total += self.content(value)
                elif key == "name":
                    total += _TOKENS_PER_NAME + self.text(value if isinstance(value, str) else "")
                elif key == "tool_calls" and value:
                    total += self.text(orjson.dumps(value).decode())
                elif key == "role":
                    total += 1
                elif isinstance(value, str):
                    total += self.text(value)
        defs = tools or functions
        if defs:
            total += _TOOLS_OVERHEAD + self.text(orjson.dumps(defs).decode())
        return total

    def prompt(self, prompt: Any) -> int:
        """A completions `prompt` or embeddings `input`: a string, a list of strings, or token id lists."""
        if isinstance(prompt, str):
            return self.text(prompt)
        if isinstance(prompt, list):
            if prompt and isinstance(prompt[0], int):
                return len(prompt)
            return sum(self.prompt(p) for p in prompt)
        return 0


@lru_cache(maxsize=256)
def counter_for(model: str, override: str | None = None) -> TokenCounter:
    return TokenCounter(override or encoding_name_for(model))
