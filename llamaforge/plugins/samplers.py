"""Sampler plugins, composed in order into a generation pipeline.

Each stage maps logits (B, V) to logits; `greedy` chooses the argmax itself. After the last stage the pipeline
samples from softmax(logits), so `temperature -> top_k -> top_p` reads exactly as the pipeline runs.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from llamaforge.core.interfaces import Sampler
from llamaforge.registry import hookimpl

NEG_INF = float("-inf")


class Greedy(Sampler):
    """Always the most likely token (ties go to the lowest id)."""

    chooses = True
    plain_argmax = True

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return logits


class TemperatureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(gt=0, le=100)


class Temperature(Sampler):
    """Divide logits by T: T < 1 sharpens, T > 1 flattens."""

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class TopKParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(ge=1)


class TopK(Sampler):
    """Keep the k largest logits (ties at the boundary are kept), mask the rest."""

    def __init__(self, top_k: int) -> None:
        self.top_k = int(top_k)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)


class TopPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_p: float = Field(gt=0, le=1)


class TopP(Sampler):
    """Nucleus: the smallest set of most-likely tokens whose probability reaches p."""

    def __init__(self, top_p: float) -> None:
        self.top_p = float(top_p)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self.top_p >= 1.0:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= self.top_p  # the first token is never dropped (before == 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)


class MinPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_p: float = Field(ge=0, le=1)


class MinP(Sampler):
    """Drop tokens whose probability is below min_p times the top token's."""

    def __init__(self, min_p: float) -> None:
        self.min_p = float(min_p)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * self.min_p
        return logits.masked_fill(probs < threshold, NEG_INF)


class RepetitionPenaltyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    penalty: float = Field(gt=0, le=10)


class RepetitionPenalty(Sampler):
    """CTRL-style penalty on tokens already in the context: positive logits divided, negative multiplied."""

    def __init__(self, penalty: float) -> None:
        self.penalty = float(penalty)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() == 0 or self.penalty == 1.0:
            return logits
        valid = (input_ids >= 0).to(logits.dtype)  # negative ids mark padding
        counts = torch.zeros_like(logits).scatter_add_(-1, input_ids.clamp(min=0), valid)
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(counts > 0, penalised, logits)


@hookimpl
def llamaforge_register(register):
    register("sampler", "greedy", Greedy)
    register("sampler", "temperature", Temperature, params_model=TemperatureParams)
    register("sampler", "top_k", TopK, params_model=TopKParams)
    register("sampler", "top_p", TopP, params_model=TopPParams)
    register("sampler", "min_p", MinP, params_model=MinPParams)
    register("sampler", "repetition_penalty", RepetitionPenalty, params_model=RepetitionPenaltyParams)
