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
    return best_times_interleaved([fn], device, repeats, clock)[0]


def best_times_interleaved(
    fns: list[Callable[[], Any]],
    device: torch.device,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Best time of each of `fns` over `repeats` rounds that call them in turn (A B A B ...), after one untimed
    warm-up call each. Why: on a shared machine the speed drifts over minutes (the 2-core CPU here has run the same
    code 45% slower on one day than another), so timing one contender's repeats after the other's lets that drift
    land on one side of a ratio; alternating spreads it over both."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            best[i] = min(best[i], clock() - t0)
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


def kernel_table(fn: Callable[[], Any], device: torch.device, steps: int, top: int = 25) -> dict[str, Any]:
    """Time per call of `fn` by GPU kernel (CUDA) or top-level operator (CPU), from the profiler over `steps` calls
    after one untimed call: where a step's time goes, which is what a change shows even when totals drift.

    On CUDA also where the GPU sat idle between kernels (`idle_us_per_step`, the largest gaps with the kernels on
    either side, a histogram of gap sizes) and which operators launched the device time (`ops`, with input
    shapes): a step can be slower than its kernels add up to, and a kernel name alone (ATen's `reduce_kernel`)
    does not say what ran it."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=cuda) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    spans: list[tuple[float, float, str]] = []
    for event in prof.events():
        if cuda and (event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", 0)):
            continue  # a user annotation ("## Call CompiledFxGraph", "Optimizer.step") spans kernels on the GPU
        if not cuda and (event.cpu_parent is not None or event.device_type != torch.autograd.DeviceType.CPU):
            continue
        per[event.name][0] += event.time_range.elapsed_us() / steps  # a kernel's span on the GPU; an op's on the host
        per[event.name][1] += 1 / steps
        spans.append((event.time_range.start, event.time_range.end, event.name))
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    table: dict[str, Any] = {
        "kernel_us_per_step": round(sum(v[0] for v in per.values()), 1),
        "kernels_per_step": round(sum(v[1] for v in per.values()), 1),
        "kernels": [{"name": k[:160], "us_per_step": round(v[0], 2), "calls_per_step": round(v[1], 2)} for k, v in
                    rows[:top]],
    }  # fmt: skip
    if cuda and spans:
        table.update(idle_between_kernels(spans, steps, top))
        ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0
               and not e.key.startswith("##") and e.device_type == torch.autograd.DeviceType.CPU]  # fmt: skip
        ops.sort(key=lambda e: -e.self_device_time_total)
        table["ops"] = [
            {"op": e.key[:80], "shapes": str(e.input_shapes)[:160], "us_per_step": round(e.self_device_time_total /
             steps, 1), "calls_per_step": round(e.count / steps, 2)} for e in ops[:top]
        ]  # fmt: skip
    return table


def idle_between_kernels(spans: list[tuple[float, float, str]], steps: int, top: int = 25) -> dict[str, Any]:
    """From (start, end, name) of GPU kernels (us): time per step the GPU ran no kernel between the first and the
    last, the largest such gaps with their neighbours, and gap sizes in buckets (count and us per step)."""
    spans = sorted(spans)
    gaps, reach, last = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > reach:
            gaps.append((start - reach, last, name))
        if end >= reach:
            reach, last = end, name
    buckets = {"<2us": (0, 2), "2-5us": (2, 5), "5-20us": (5, 20), "20-100us": (20, 100), ">=100us": (100, 1e18)}
    histogram = {
        label: {"count_per_step": round(sum(lo <= g < hi for g, _, _ in gaps) / steps, 1),
                "us_per_step": round(sum(g for g, _, _ in gaps if lo <= g < hi) / steps, 1)}
        for label, (lo, hi) in buckets.items()
    }  # fmt: skip
    largest = sorted(gaps, key=lambda g: -g[0])[:top]
    return {
        "span_us_per_step": round((reach - spans[0][0]) / steps, 1),
        "idle_us_per_step": round(sum(g for g, _, _ in gaps) / steps, 1),
        "gaps": histogram,
        "largest_gaps": [{"us": round(g, 1), "after": a[:90], "before": b[:90]} for g, a, b in largest],
    }
