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
