"""Timing shared by the benchmark scripts (each runs as `python benchmarks/NAME.py`, so this directory is on the
import path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer brackets the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(
    fn: Callable[[], Any], device: torch.device, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best of `repeats` timed calls after one untimed warm-up call (which absorbs compilation and caches)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        best = min(best, clock() - t0)
    return best


def stored_weight_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (a quantized linear keeps its int8 weight and scales as buffers), each
    storage once (tied embeddings)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def streamed_weight_bytes(model: Any) -> int:
    """Bytes one decoding step reads: the stored weights minus an untied embedding table, of which a step only
    gathers one row per token."""
    total = stored_weight_bytes(model)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and not model.spec.tie_embeddings and hasattr(embed, "weight"):
        total -= embed.weight.numel() * embed.weight.element_size()
    return total
