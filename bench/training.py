"""What the benchmarks that fine-tune a model on this CPU share: the packaged MiniLM with a one-logit head,
and one training loop (AdamW, linear warm-up over the first 10% of steps, then linear decay to zero)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.retrieval.embedders import packaged_model_dir


def minilm_with_head(threads: int, seed: int) -> tuple[Any, Any]:
    """(tokenizer, model): all-MiniLM-L6-v2's weights under a fresh one-logit head, on `threads` threads."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    path = str(packaged_model_dir())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
    return tok, model


def train(
    model: Any,
    epoch_batches: Callable[[random.Random], Iterable[Any]],
    loss_of: Callable[[Any], Any],
    *,
    epochs: int,
    steps: int,
    lr: float,
    seed: int,
) -> float:
    """Run `epochs` passes of `epoch_batches(rng)` (`steps` batches in all), minimising `loss_of(batch)`; the model
    is left in eval mode. Prints progress every 50 steps; returns the seconds it took."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * (1 - s / steps))
    rng, step, started = random.Random(seed), 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in epoch_batches(rng):
            loss = loss_of(batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps} loss {loss.item():.3f} {time.perf_counter() - started:.0f}s", flush=True)
    model.eval()
    return time.perf_counter() - started


def shuffled_batches(n: int, size: int) -> Callable[[random.Random], Iterable[list[int]]]:
    """One epoch's batches of row indices: each epoch shuffles the previous epoch's order again."""
    order = list(range(n))

    def epoch(rng: random.Random) -> Iterable[list[int]]:
        rng.shuffle(order)
        return [order[i : i + size] for i in range(0, n, size)]

    return epoch
