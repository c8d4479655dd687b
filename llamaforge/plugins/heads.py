"""Output heads: `linear` (optionally tied to the embedding) and `mlp` (hidden layer + activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.core.interfaces import Head
from llamaforge.core.spec import ComponentSpec
from llamaforge.registry import hookimpl


class LinearHead(Head):
    """logits = h @ W^T; W is the embedding matrix itself when tied (one tensor, so updates stay shared)."""

    def __init__(self, dim: int, vocab_size: int, embedding: nn.Embedding, tie: bool, bias: bool = False) -> None:
        super().__init__()
        self.tied = tie
        if tie:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim))
            nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias)

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, tied={self.tied}"


class MLPHead(Head):
    """h -> fc -> activation -> proj: a hidden layer before the vocabulary projection (seed baseline)."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        embedding: nn.Embedding,
        tie: bool,
        bias: bool = False,
        hidden: int | None = None,
        activation: str | dict = "relu",
    ) -> None:
        super().__init__()
        from llamaforge.core.model import build_component

        if tie:
            raise ValueError("the mlp head cannot be tied to the embedding; set tie_embeddings: false")
        hidden = hidden or dim
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.act_fn = build_component("activation", ComponentSpec.model_validate(activation))
        if getattr(self.act_fn, "gated", False):
            raise ValueError("the mlp head takes a non-gated activation (relu, gelu, silu, ...)")
        self.proj = nn.Linear(hidden, vocab_size, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act_fn(self.fc(h)))


@hookimpl
def llamaforge_register(register):
    register("head", "linear", LinearHead)
    register("head", "mlp", MLPHead)
