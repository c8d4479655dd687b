"""A preallocated (static) key/value cache.

Buffers are allocated once at their final size, so decoding never reallocates and the shapes seen by the model
stay constant from step to step (what CUDA graphs and torch.compile need).
"""

from __future__ import annotations

import torch

from llamaforge.core.interfaces import KVCache

# Keys and values of a layer in one (2, B, Hkv, L, D) buffer, written by one indexed assignment per step instead of
# two (read when a cache is built). Why: in the H200 decode step the value write is a kernel of its own (~0.9 us
# per layer) beside the one that applies RoPE to the keys and writes them; one write of both would be one kernel.
# Off until timed on a GPU (benchmarks/decode_variants.py `kv_one_write=1`); on the 2-core CPU (~100M spec, compiled,
# seven rounds A/B in one invocation) it made no difference beyond the noise (80-104 vs 82-105 tok/s).
_ONE_WRITE = False


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
        # int32 zeros that a one-launch decode kernel counts its finished programs in (one per key/value head;
        # llamaforge.kernels.qkv_rope.qkv_rope_attention), left at zero by it: they persist across steps, which a
        # buffer allocated per call would not (a CUDA graph reuses that memory)
        self.sync = torch.zeros(max(1, batch_size * n_kv_heads), dtype=torch.int32, device=device)
        self.kv: list[torch.Tensor] | None = None
        if _ONE_WRITE:  # views of one buffer per layer; update() writes through the buffer only, so a compiled
            # step sees one input per layer, not two aliasing views of it
            self.kv = [torch.zeros((2, *shape), device=device, dtype=dtype) for _ in range(n_layers)]
            self.keys, self.values = [t[0] for t in self.kv], [t[1] for t in self.kv]
        else:
            self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
            self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv is not None:
            kv = self.kv[layer_idx]
            kv[:, :, :, cache_position] = torch.stack((k, v)).to(kv.dtype)
            return kv[0], kv[1]
        kc, vc = self.keys[layer_idx], self.values[layer_idx]
        # Indexed assignment (index_put_) rather than index_copy_: torch.compile keeps it in place on the cache
        # buffers, where index_copy_ on a graph input may be lowered to a copy of the whole buffer per step.
        kc[:, :, cache_position] = k.to(kc.dtype)
        vc[:, :, cache_position] = v.to(vc.dtype)
        return kc, vc

    def _buffers(self) -> list[torch.Tensor]:
        return self.kv if self.kv is not None else [*self.keys, *self.values]

    def reset(self) -> None:
        for t in self._buffers():
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers())
