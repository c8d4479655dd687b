"""The contracts every component satisfies.

Core depends on these and never on a concrete component: a spec names components, the registry supplies
factories, and the model is assembled from whatever those factories return. Each contract below is also executable:
`llamaforge.testing` has one check per interface that a third-party author can run against their own component.

Factory conventions (what the model builder passes; `params` from the spec arrive as extra keyword arguments):

=====================  ==========================================================================================
kind                   factory signature -> product
=====================  ==========================================================================================
norm                   (dim, eps, **params) -> Norm
attention              (dim, n_heads, n_kv_heads, head_dim, layer_idx, bias, dropout, kernel, **params) -> Attention
attention_kernel       the kernel function itself (see AttentionKernel)
position_embedding     (head_dim, max_positions, theta, scaling, **params) -> PositionEmbedding
rope_scaling           (**params) -> callable(inv_freq: Tensor) -> Tensor
activation             (**params) -> Activation
head                   (dim, vocab_size, embedding, tie, **params) -> Head
sampler                (**params) -> Sampler
quantizer              (**params) -> Quantizer
adapter                (**params) -> Adapter
exporter               () -> Exporter
importer               () -> Importer
=====================  ==========================================================================================
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from llamaforge.core.model import LlamaForgeModel
    from llamaforge.core.spec import ModelSpec

KINDS: dict[str, str] = {
    "norm": "normalisation layers (block and final norms)",
    "attention": "attention modules owning q/k/v/o projections",
    "attention_kernel": "attention functions (q, k, v) -> output, chosen by name",
    "position_embedding": "position encodings applied to queries and keys",
    "rope_scaling": "RoPE frequency scaling schemes",
    "activation": "feed-forward nonlinearities, gated or not",
    "head": "output projections from hidden states to logits",
    "sampler": "logits processors and token choosers for generation",
    "quantizer": "post-training weight quantization",
    "adapter": "parameter-efficient adapters wrapped around built modules",
    "exporter": "writers of model directories in other formats",
    "importer": "readers of model directories and checkpoints in other formats",
}

# Arguments the model builder passes to each kind's factory; everything else comes from a spec's `params`.
STRUCTURAL_ARGS: dict[str, tuple[str, ...]] = {
    "norm": ("dim", "eps"),
    "attention": ("dim", "n_heads", "n_kv_heads", "head_dim", "layer_idx", "bias", "dropout", "kernel"),
    "attention_kernel": ("q", "k", "v", "mask", "dropout_p", "scale"),
    "position_embedding": ("head_dim", "max_positions", "theta", "scaling"),
    "head": ("dim", "vocab_size", "embedding", "tie"),
}


@dataclass
class AttentionMask:
    """What an attention kernel must mask, computed once per forward by the model.

    `causal=True` with `mask=None` is the fast path (training, full prefill): kernels may use a fused causal kernel.
    Otherwise `mask` is a boolean tensor broadcastable to (batch, heads, q_len, kv_len), True where attention is
    allowed; it already includes causality, padding and cache validity.

    `extent`, when set (one-query decoding over a cache), is a (batch,) integer tensor with no allowed key position
    of row b at or past extent[b]: a kernel may read only the keys below it (a static cache is mostly unwritten
    early in a generation) and must give the same result as with `mask` alone. Kernels may ignore it.
    """

    causal: bool = True
    mask: torch.Tensor | None = None
    extent: torch.Tensor | None = None


class Norm(nn.Module, abc.ABC):
    """Maps (..., dim) to (..., dim), same dtype.

    `scale_invariant` is True when norm(c * x) == norm(x) for any c > 0 (up to eps); the contract check tests it.
    """

    scale_invariant: bool = False


@runtime_checkable
class AttentionKernel(Protocol):
    """q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv -> (B, H, T, D).

    Must honour `mask` exactly as `AttentionMask` documents, and `scale` (default 1/sqrt(D)).
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: AttentionMask,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> torch.Tensor: ...


class PositionEmbedding(nn.Module, abc.ABC):
    """Computes per-position state once per forward and applies it to queries and keys in every layer."""

    @abc.abstractmethod
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Any:
        """position_ids (B, T) -> opaque state handed to `apply` in each layer."""

    @abc.abstractmethod
    def apply(self, q: torch.Tensor, k: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode positions into q (B, H, T, D) and k (B, Hkv, T, D)."""


class Attention(nn.Module, abc.ABC):
    """Self-attention over (B, T, dim) -> (B, T, dim).

    Owns its parameters; the arithmetic of attention itself is delegated to the registered kernel it was built
    with, so swapping kernels never changes state-dict keys. Must be causal under `AttentionMask(causal=True)` and
    treat batch rows independently.
    """

    layer_idx: int
    # True when forward also takes `prenorm=` (the block's input norm) with x not yet normalised, and applies it
    # itself: an implementation can then fuse the norm into its own kernels (llamaforge.kernels.qkv_rope does, for
    # batch-1 decoding). False: the block normalises x before the call, as every attention module may assume.
    accepts_prenorm: bool = False
    # True when forward also takes `residual=` (the block's input) and returns residual + its output: an
    # implementation can then add it inside its output product's kernel (rope_attention does, for batch-1 decoding
    # through llamaforge.kernels.residual_gemv). False: the block adds the residual itself.
    accepts_residual: bool = False

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: PositionEmbedding,
        position_state: Any,
        mask: AttentionMask,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class Activation(nn.Module, abc.ABC):
    """The feed-forward nonlinearity, applied elementwise.

    When `gated` is True the feed-forward block computes act(gate(x)) * up(x) (SwiGLU style) and owns a
    `gate_proj`; otherwise it computes act(up(x)).
    """

    gated: bool = False


class Head(nn.Module, abc.ABC):
    """(B, T, dim) -> (B, T, vocab) logits."""

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when the head is exactly `h @ weight.T + bias`, which enables the fused
        chunked cross-entropy during training; None otherwise (the loss then chunks through forward)."""
        return None


class KVCache(abc.ABC):
    """Per-layer key/value storage for incremental decoding."""

    @abc.abstractmethod
    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at `cache_position` (T,) and return the keys/values to attend over."""


class Sampler(abc.ABC):
    """One stage of a generation pipeline.

    Stages transform logits (B, V) in order; a stage with `chooses=True` (greedy) picks tokens itself, otherwise
    the pipeline samples from the softmax of the final logits. `input_ids` is the (B, L) context so far, for
    stages such as repetition penalties; negative ids are padding (left padding, and positions not generated yet:
    the context keeps one shape for the whole decode) and must be ignored. Stages run inside a captured CUDA graph
    on GPU, so they must not synchronise with the host (no `.item()`, `.tolist()` or data-dependent Python).
    `plain_argmax=True` declares that a choosing stage leaves the logits untouched, so a pipeline of only that
    stage is the argmax, which the decode step then computes inside its compiled graph.
    """

    chooses: bool = False
    plain_argmax: bool = False

    @abc.abstractmethod
    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor: ...


class Quantizer(abc.ABC):
    """Replaces selected modules of a built model by quantized equivalents, in place.

    `include`/`exclude` are module-name patterns. Quantized modules keep a state dict of plain tensors, so a
    quantized model saves as safetensors and `load_model` rebuilds it by re-applying the recorded quantizer.
    """

    include: list[str] | None = None
    exclude: list[str] | None = None

    @abc.abstractmethod
    def quantize(
        self, model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
    ) -> nn.Module: ...

    def apply(self, model: nn.Module) -> nn.Module:
        """What `apply_transform` calls: quantize with the patterns the factory was given."""
        return self.quantize(model, self.include, self.exclude)


class Adapter(abc.ABC):
    """Wraps selected modules of a built model with trainable adapter parameters, after the model is built.

    Every module it wraps becomes an `AdapterLayer` whose base parameters keep their state-dict names, so
    model-level operations (merge, remove, switch; llamaforge.core.finetune) work for any adapter type.
    """

    name: str = "default"

    @abc.abstractmethod
    def add(self, model: nn.Module, name: str = "default") -> nn.Module: ...

    def apply(self, model: nn.Module) -> nn.Module:
        """What `apply_transform` calls, so adapted model directories rebuild their structure on load."""
        return self.add(model, self.name)


class AdapterLayer(metaclass=abc.ABCMeta):
    """A module wrapped by one or more named adapters.

    Local adapter state keys (`adapter_state_dict`) carry no adapter name (e.g. `lora_A.weight`); `remove` of the
    last adapter restores the original module exactly (same class, bitwise-equal parameters).
    """

    # ABCMeta rather than abc.ABC: ABC's empty __slots__ would change the instance layout and forbid mixing this
    # class into an existing module's class at runtime
    adapters_enabled: bool

    @abc.abstractmethod
    def adapter_names(self) -> list[str]: ...

    @abc.abstractmethod
    def set_active_adapters(self, names: list[str]) -> None: ...

    @abc.abstractmethod
    def adapter_parameters(self, name: str) -> list[nn.Parameter]: ...

    @abc.abstractmethod
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def merge(self, names: list[str] | None = None, *, keep_original: bool = True) -> None: ...

    @abc.abstractmethod
    def unmerge(self) -> None: ...

    @abc.abstractmethod
    def remove(self, name: str) -> None: ...


class Exporter(abc.ABC):
    """Writes a model (and tokenizer, if given) to `out` in some external format."""

    @abc.abstractmethod
    def export(self, model: LlamaForgeModel, out: Path, *, tokenizer: Any = None, **options: Any) -> Path: ...


class Importer(abc.ABC):
    """Reads a model from an external format."""

    @abc.abstractmethod
    def can_load(self, path: Path) -> bool: ...

    @abc.abstractmethod
    def load_spec(self, path: Path) -> ModelSpec: ...

    @abc.abstractmethod
    def load_state_dict(self, path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Weights under llamaforge (= Hugging Face Llama) names."""
