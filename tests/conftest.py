from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
# CI judges a change on one fixed set of examples per test (derandomised: the same draws on every machine and run),
# so a rare draw cannot turn a merge red by chance; local runs keep drawing new examples, which is how rare failures
# are found (e.g. a LoRA merge tolerance, 2026-12-03).
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def counting_gemv_pass():
    """`make(count)` -> (the decode GEMV graph pass, a list): after each run of the pass the list gets
    `count(graph)` of the rewritten graph, so a test sees what the pass left for inductor."""
    from llamaforge.core import generation

    def make(count):
        seen = []

        class Counting(type(generation._gemv_pass())):
            def __call__(self, graph):
                super().__call__(graph)
                seen.append(count(graph))

        return Counting(), seen

    return make
