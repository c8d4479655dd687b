"""Evaluation: token-weighted cross-entropy and perplexity over held-out text.

The same function scores validation during training and `llamaforge eval`, so the numbers a run logs and the
numbers a user measures later on the same data are the same quantity.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.data import eval_batches
from llamaforge.core.model import eval_mode

MAX_LOG_PERPLEXITY = 50.0  # exp(50) is already meaningless; keep JSON finite


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast where asked for, nothing otherwise (CPU autocast with fp32 only produces warnings)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


@torch.no_grad()
def evaluate(
    model: Any,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean cross-entropy per predicted token over non-overlapping blocks, in order (deterministic).

    Blocks are weighted by their token count, so a short last batch counts for what it holds rather than as a
    whole batch. Returns loss, perplexity (exp(loss)) and the number of tokens scored.
    """
    seq_len = seq_len or min(model.spec.max_positions, 256)
    device = model.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    with eval_mode(model):
        for inputs, targets in eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches):
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast(device, autocast_dtype):
                loss = model(inputs, targets, return_logits=False).loss
            n = int((targets != -100).sum())
            total += loss.double() * n
            n_tokens += n
    mean = float(total) / max(1, n_tokens)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": n_tokens}


def evaluate_path(
    model_path: str | Path,
    data: str | Path,
    *,
    tokenizer: str | Path | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    device: str | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Load MODEL (a run dir or anything `load_model` reads) with its tokenizer and score DATA."""
    from llamaforge.core.data import read_documents, tokenize_documents
    from llamaforge.core.loading import load_model_and_tokenizer

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(model_path, tokenizer=tokenizer, require_tokenizer=True, device=dev)
    tokens = tokenize_documents(read_documents(data, text_field=text_field), tok)
    dtype = torch.bfloat16 if model.device.type == "cuda" else None
    metrics = evaluate(
        model, tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, autocast_dtype=dtype
    )
    return {**metrics, "model": str(model_path), "data": str(data), "params": model.num_parameters()}
