"""Rotary position embeddings (rotate_half layout, as Hugging Face Llama) and their frequency scalings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llamaforge.core.interfaces import PositionEmbedding
from llamaforge.registry import hookimpl


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the sign of rotate_half folded into the sin table (bitwise the same).

    Eagerly, swapping the halves with one `roll` instead of slice/negate/concatenate saves three dispatches per
    tensor, which is visible when decoding small models on a CPU; compiled graphs keep the concatenation, which
    inductor fuses into one kernel either way."""
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    else:
        swapped = x.roll(half, dims=-1)
    return x * cos + swapped * signed_sin


class RotaryEmbedding(PositionEmbedding):
    """RoPE: inverse frequencies theta^(-2i/d), optionally rescaled.

    cos/sin are tabulated once in fp32 for every position up to max_positions and gathered per forward. Computing
    them on the fly is cheaper in memory, but under torch.compile the transcendental functions get fused into (and
    recomputed by) every layer's q/k kernel, forward and backward: about a tenth of a training step on an H200.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        inv_freq = self._inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, signed_sin = self._tables(inv_freq)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("signed_sin_table", signed_sin, persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv = 1.0 / (self.theta ** (idx / self.head_dim))
        return self.scaling(inv) if self.scaling is not None else inv

    def _tables(self, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(self.max_positions, device=inv_freq.device).float()
        freqs = positions[:, None] * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, : freqs.shape[-1]].neg_()  # rotate_half negates the first half of the rotated vector
        return emb.cos(), sin

    def reset_buffers(self) -> None:
        """Recompute the fp32 buffers (after `to_empty`, or a dtype cast, left them unusable)."""
        self.inv_freq = self._inv_freq(device=self.inv_freq.device)
        self.cos_table, self.signed_sin_table = self._tables(self.inv_freq)

    def _apply(self, fn, recurse=True):  # keep the tables in fp32 whatever dtype the model is cast to
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_buffers()
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids].to(dtype), self.signed_sin_table[position_ids].to(dtype)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, signed_sin = state
        cos, signed_sin = cos.unsqueeze(1), signed_sin.unsqueeze(1)
        return _rotate(q, cos, signed_sin), _rotate(k, cos, signed_sin)


class NoPositions(PositionEmbedding):
    """No position encoding (NoPE): causal masking alone carries order."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Any = None) -> None:
        super().__init__()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> None:
        return None

    def apply(self, q: torch.Tensor, k: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class Llama3ScalingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factor: float = Field(gt=0, description="how much longer the extended context is")
    low_freq_factor: float = Field(default=1.0, gt=0)
    high_freq_factor: float = Field(default=4.0, gt=0)
    original_max_positions: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Llama3ScalingParams:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor "
                f"({self.low_freq_factor}); Llama 3.1 uses 4.0 and 1.0"
            )
        return self


def llama3_scaling(
    factor: float,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_positions: int = 8192,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""

    def scale(inv_freq: torch.Tensor) -> torch.Tensor:
        low_wavelen = original_max_positions / low_freq_factor
        high_wavelen = original_max_positions / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)

    return scale


class LinearScalingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(gt=0)


def linear_scaling(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Position interpolation: every frequency divided by `factor`."""
    return lambda inv_freq: inv_freq / factor


def default_scaling() -> Callable[[torch.Tensor], torch.Tensor]:
    """No scaling (the same as leaving rope_scaling unset)."""
    return lambda inv_freq: inv_freq


def _check_rope(spec: Any, params: dict[str, Any]) -> None:
    if spec.head_size % 2:
        raise ValueError(
            f"position_embedding 'rope' needs an even head_dim, got {spec.head_size}; change dim/n_heads or head_dim"
        )


def _check_llama3(spec: Any, params: dict[str, Any]) -> None:
    original = params.get("original_max_positions", 8192)
    if isinstance(original, int) and original > spec.max_positions:
        raise ValueError(
            f"rope_scaling.params.original_max_positions ({original}) exceeds max_positions ({spec.max_positions}); "
            f"scaling extends the context, so raise max_positions"
        )


@hookimpl
def llamaforge_register(register):
    register("position_embedding", "rope", RotaryEmbedding, check_spec=_check_rope)
    register("position_embedding", "none", NoPositions)
    register("rope_scaling", "default", default_scaling)
    register("rope_scaling", "llama3", llama3_scaling, params_model=Llama3ScalingParams, check_spec=_check_llama3)
    register("rope_scaling", "linear", linear_scaling, params_model=LinearScalingParams)
