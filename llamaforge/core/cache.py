"""A preallocated (static) key/value cache.

Buffers are allocated once at their final size, so decoding never reallocates and the shapes seen by the model
stay constant from step to step (what CUDA graphs and torch.compile need).
"""

from __future__ import annotations

import torch

from llamaforge.core.interfaces import KVCache


class StaticKVCache(KVCache):
    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_length, head_dim)
        self.max_length = max_length
        self.batch_size = batch_size
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.keys[layer_idx], self.values[layer_idx]
        # Indexed assignment (index_put_) rather than index_copy_: torch.compile keeps it in place on the cache
        # buffers, where index_copy_ on a graph input may be lowered to a copy of the whole buffer per step.
        kc[:, :, cache_position] = k.to(kc.dtype)
        vc[:, :, cache_position] = v.to(vc.dtype)
        return kc, vc

    def reset(self) -> None:
        for t in (*self.keys, *self.values):
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
