"""Components added by this package: activation `relu2` (squared ReLU, Primer), norm `scalenorm`, and sampler
`suppress_tokens` (a generation-pipeline stage that forbids given token ids)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge import Activation, Norm, Sampler, hookimpl


class ReLU2(Activation):
    """Squared ReLU: relu(x)^2 (So et al., Primer), a non-gated FFN nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class ScaleNorm(Norm):
    """x * g / ||x||: one learned scalar instead of a per-channel weight (Nguyen & Salazar)."""

    scale_invariant = True

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.scale = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        norm = x32.norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (self.scale * x32 / norm).to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(float(self.dim) ** 0.5)


class SuppressTokens(Sampler):
    """Never emit the given token ids (e.g. a tokenizer's unused specials): their logits become -inf.

    Composes anywhere in a pipeline: `samplers: [{name: suppress_tokens, params: {token_ids: [0, 5]}}, greedy]`.
    """

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = [int(t) for t in token_ids]
        self._mask: tuple[tuple[int, torch.device], torch.Tensor | None] | None = None

    def banned(self, vocab: int, device: torch.device) -> torch.Tensor | None:
        """The mask, built once on the host: on a GPU, stages run inside a captured CUDA graph after a first eager
        call (the prompt's), and must not copy from the host or synchronise with it there."""
        if self._mask is None or self._mask[0] != (vocab, device):
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[[t for t in self.token_ids if 0 <= t < vocab]] = True
            # banning everything would leave nothing to pick: then ban nothing
            self._mask = ((vocab, device), None if mask.all() else mask.to(device))
        return self._mask[1]

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        mask = self.banned(logits.size(-1), logits.device)
        return logits if mask is None else logits.masked_fill(mask, float("-inf"))


@hookimpl
def llamaforge_register(register):
    register("activation", "relu2", ReLU2)
    register("norm", "scalenorm", ScaleNorm)
    register("sampler", "suppress_tokens", SuppressTokens)
