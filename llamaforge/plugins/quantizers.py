"""Post-training quantizers: `int8_dynamic`, `int8_weight_only`, `nf4` and `int8_embedding`.

Each quantizer swaps the modules it selects (by module-name patterns) for quantized modules whose state dict is
made of plain tensors (int8 weights + per-row scales, packed NF4 bytes + per-block absmax), so a quantized model is
saved as ordinary safetensors and `load_model` rebuilds it by re-applying the recorded quantizer before loading
(see `llamaforge.core.loading.apply_transform`). Nothing is stored as a library-specific tensor subclass: a
directory written on a GPU machine loads on a CPU one.

Why own modules rather than torchao's `quantize_`: torchao keeps weights as tensor subclasses, which do not
round-trip through safetensors, and its dispatch changes between releases; the arithmetic here is the same
(symmetric per-row int8 weights, per-token dynamic int8 activations through `torch._int_mm`, dequantise-and-matmul
for weight-only, which torch.compile fuses into one kernel on GPU). NF4 uses bitsandbytes for quantisation and
4-bit matmuls, on CPU and GPU. Heavy libraries are imported only when a quantizer that needs them runs.

Embedding tables are quantized too (int8 per row, as the seed's float_qparams config did, or NF4): with a tied
output head the head then computes from the same quantized table, so the file holds the table once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.core.interfaces import AdapterLayer, Quantizer
from llamaforge.errors import LlamaforgeError
from llamaforge.kernels import int8_mm
from llamaforge.registry import hookimpl

INT8_MAX = 127


class QuantizationError(LlamaforgeError, ValueError):
    """A quantizer cannot be applied as asked (bad option, nothing selected)."""


class QuantizerUnavailableError(LlamaforgeError, RuntimeError):
    """A quantization method needs a library or device support this machine does not have."""


# ----- optional libraries ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """bitsandbytes and torchao log and warn about optional kernels at import; users only need real errors."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@functools.cache
def _bnb() -> Any:
    try:
        with _quiet("bitsandbytes"):
            import bitsandbytes
            import bitsandbytes.functional
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantizerUnavailableError(
            f"nf4 needs bitsandbytes, which cannot be imported ({type(exc).__name__}: {exc}); "
            f"install it with: pip install 'llamaforge[quant]'"
        ) from None
    return bitsandbytes


@functools.cache
def _nf4_probe(device_type: str) -> str | None:
    """None when bitsandbytes can quantize and multiply NF4 on this device type, else the reason it cannot."""
    bnb = _bnb()
    try:
        with _quiet("bitsandbytes"):
            w = torch.randn(8, 64, device=device_type)
            q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            bnb.matmul_4bit(torch.randn(2, 64, device=device_type), q.t(), quant_state=state)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _require_nf4(device: torch.device) -> None:
    reason = _nf4_probe(device.type)
    if reason is not None:
        raise QuantizerUnavailableError(
            f"nf4 is not available on {device.type}: bitsandbytes failed ({reason}). Quantize on a device "
            f"bitsandbytes supports (cpu, cuda) or pick another method (int8_weight_only, int8_dynamic)"
        )


@functools.cache
def nf4_code(device: str = "cpu") -> torch.Tensor:
    """The 16 NormalFloat-4 levels, as bitsandbytes defines them (index = 4-bit code)."""
    with _quiet("bitsandbytes"):
        return _bnb().functional.get_4bit_type("nf4", device=device).float()


# ----- int8 arithmetic --------------------------------------------------------------------------------------------
def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8, scale) with weight ~= q * scale[:, None], |error| <= scale / 2.

    The scale is stored in the weight's dtype and q is rounded against that stored value, so the bound holds for
    what is saved, not for an fp32 intermediate."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1) if w.numel() else w.new_zeros(w.shape[:-1])
    scale = (amax / INT8_MAX).to(weight.dtype)
    scale = scale.clamp(min=torch.finfo(weight.dtype).tiny)
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (per-row of a 2-D input) int8 for activations: (q, scale (M, 1) fp32)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


_INT_MM_BROKEN: set[str] = set()


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (N, K).T int8 -> (M, N) int32-valued tensor.

    torch._int_mm where the backend has it (CPU: any shape; CUDA: M > 16 and K, N multiples of 8); otherwise the
    same integers through an fp32 matmul (exact while K * 127^2 < 2^24, i.e. K < 1040, and within fp32 rounding
    beyond)."""
    dev = a.device.type
    m, k = a.shape
    n = b.shape[0]
    # (torch 2.13's CPU _int_mm returns garbage for K == 1, found by the Hypothesis test: keep it off that shape)
    usable = (dev == "cpu" and k > 1) or (dev == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)
    if usable and dev not in _INT_MM_BROKEN and hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(a, b.t())
        except (RuntimeError, NotImplementedError):
            _INT_MM_BROKEN.add(dev)
    return a.float() @ b.float().t()


def int8_dynamic_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ W.T (+ b) with x quantized per token on the fly and W stored as int8 rows."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_zeros(*shape[:-1], weight.shape[0])
    xq, xs = quantize_int8_tokens(x2)
    y = _int8_matmul(xq, weight).float() * xs * scale.float()
    y = y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
    return y + bias.to(y.dtype) if bias is not None else y


def int8_weight_only_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ (q * scale).T (+ b) in x's dtype; scaling after the matmul keeps one cast of the int8 matrix, which
    torch.compile fuses into the matmul's load (that is what makes int8 decoding faster than bf16 on GPU). In the
    compiled CUDA decode step the graph pass can hand the product to llamaforge's row GEMV kernel instead
    (`llamaforge.kernels.row_gemv.INT8`); the scale stays here. Uncompiled on CUDA, a few rows (a prefill, eager
    decoding) go through llamaforge.kernels.int8_mm, which reads the int8 weights once instead of writing and
    reading back a 16-bit copy."""
    kernel = int8_mm.wanted(x) and int8_mm.supported(x, weight, scale)  # wanted: eager CUDA calls only
    y = int8_mm.launch(x, weight, scale) if kernel else int8_mm.reference(x, weight, scale)
    return y + bias.to(y.dtype) if bias is not None else y


# ----- quantized modules ------------------------------------------------------------------------------------------
class QuantizedModule(nn.Module):
    """Marker base: a module whose weights are stored quantized; `quant_format` names the storage format."""

    quant_format: str = ""


class Int8Linear(QuantizedModule):
    """A linear layer with int8 weights (per-output-row scales); `dynamic` also quantizes activations per token.

    State: `weight` int8 (out, in), `weight_scale` (out,), `bias` (out,) when the original had one."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dynamic: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.quant_format = "int8_dynamic" if dynamic else "int8_weight_only"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, dynamic: bool) -> Int8Linear:
        out_features, in_features = weight.shape
        mod = cls(
            in_features, out_features, bias=bias is not None, dynamic=dynamic, dtype=weight.dtype, device=weight.device
        )
        q, scale = quantize_int8_rows(weight)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = int8_dynamic_linear if self.dynamic else int8_weight_only_linear
        return fn(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.quant_format}, bias={self.bias is not None}"


class Int8Embedding(QuantizedModule):
    """An embedding table stored as int8 rows with one scale per row (weight-only; lookups dequantize the rows).

    `linear(h, dynamic)` lets a tied output head multiply by the same table without a second copy."""

    quant_format = "int8_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        mod = cls(*weight.shape, dtype=weight.dtype, device=weight.device)
        q, scale = quantize_int8_rows(weight)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        return mod

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale.unsqueeze(-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.compute_dtype)
        return rows * self.weight_scale[ids].unsqueeze(-1)

    def linear(self, h: torch.Tensor, *, dynamic: bool) -> torch.Tensor:
        fn = int8_dynamic_linear if dynamic else int8_weight_only_linear
        return fn(h, self.weight, self.weight_scale, None)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class _NF4Module(QuantizedModule):
    """Keeps `weight_absmax` in fp32 through `.to(dtype)` / `.half()` while the compute dtype follows them."""

    _compute_dtype: torch.dtype = torch.float32

    def _apply(self, fn: Any, recurse: bool = True) -> _NF4Module:
        probe = fn(torch.zeros((), dtype=self._compute_dtype))
        super()._apply(fn, recurse)
        if self.weight_absmax.dtype != torch.float32:
            self.weight_absmax = self.weight_absmax.float()
        if probe.is_floating_point():
            self._compute_dtype = probe.dtype
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype


class NF4Linear(_NF4Module):
    """A linear layer with bitsandbytes NF4 weights: 4-bit NormalFloat codes, one fp32 absmax per `blocksize`
    consecutive weights (row-major). State: `weight` uint8 ((out*in + 1) // 2, 1) packed codes (first code in the
    high nibble), `weight_absmax` (blocks,), `bias`."""

    quant_format = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        blocksize: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        self._compute_dtype = dtype
        numel = in_features * out_features
        n_blocks = -(-numel // blocksize)
        self.register_buffer("weight", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.ones(n_blocks, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, blocksize: int) -> NF4Linear:
        out_features, in_features = weight.shape
        mod = cls(
            in_features,
            out_features,
            bias=bias is not None,
            blocksize=blocksize,
            dtype=weight.dtype,
            device=weight.device,
        )
        packed, absmax = nf4_quantize(weight, blocksize)
        mod.weight.copy_(packed)
        mod.weight_absmax.copy_(absmax)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def _state(self, dtype: torch.dtype) -> Any:
        return nf4_state(self.weight_absmax, (self.out_features, self.in_features), self.blocksize, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = self.in_features * self.out_features
        flat = nf4_decode(self.weight.reshape(-1), self.weight_absmax, self.blocksize, numel)
        return flat.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if (self.in_features % self.blocksize and x.device.type == "cpu") or self.in_features % 2:
            # bitsandbytes 0.50's CPU decoder gets rows that do not hold whole blocks wrong (found by the tests),
            # and decodes odd widths through a torch.compile'd fallback (a compile per shape): decode here instead
            return F.linear(x, self.dequantize(x.dtype), bias)
        return _bnb().matmul_4bit(x, self.weight.t(), quant_state=self._state(x.dtype), bias=bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, nf4, blocksize={self.blocksize}"


class NF4Embedding(_NF4Module):
    """An embedding table in NF4. Rows are padded to a multiple of `blocksize` so every block lies inside one row:
    a lookup gathers and decodes only the rows it needs. State: `weight` uint8 (num, padded_dim // 2) and
    `weight_absmax` (num, padded_dim // blocksize). The absmax stays fp32 whatever the model's dtype (bitsandbytes
    needs it), so the compute dtype is tracked separately and follows `.to(dtype)`."""

    quant_format = "nf4_embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        blocksize: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.blocksize = num_embeddings, embedding_dim, blocksize
        self.padded_dim = -(-embedding_dim // blocksize) * blocksize
        self._compute_dtype = dtype
        self.register_buffer(
            "weight", torch.zeros(num_embeddings, self.padded_dim // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_absmax",
            torch.ones(num_embeddings, self.padded_dim // blocksize, dtype=torch.float32, device=device),
        )

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, blocksize: int) -> NF4Embedding:
        num, dim = weight.shape
        mod = cls(num, dim, blocksize=blocksize, dtype=weight.dtype, device=weight.device)
        padded = F.pad(weight.detach(), (0, mod.padded_dim - dim))
        packed, absmax = nf4_quantize(padded, blocksize)
        mod.weight.copy_(packed.view(num, -1))
        mod.weight_absmax.copy_(absmax.view(num, -1))
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = F.embedding(ids, self.weight)  # (..., padded/2) uint8: only the rows asked for are decoded
        vals = nf4_decode(packed, self.weight_absmax[ids], self.blocksize)
        return vals[..., : self.embedding_dim].to(self.compute_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.weight.device))

    def linear(self, h: torch.Tensor, *, dynamic: bool = False) -> torch.Tensor:
        if self.padded_dim != self.embedding_dim:
            h = F.pad(h, (0, self.padded_dim - self.embedding_dim))
        state = nf4_state(
            self.weight_absmax.reshape(-1), (self.num_embeddings, self.padded_dim), self.blocksize, h.dtype
        )
        return _bnb().matmul_4bit(h, self.weight.reshape(-1, 1).t(), quant_state=state)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nf4, blocksize={self.blocksize}"


class TiedQuantizedHead(QuantizedModule):
    """The output head of a model whose head shares the (now quantized) embedding table.

    It holds no tensors of its own (the table is referenced, not registered as a child), so the state dict and the
    file hold the table once, exactly as for the unquantized tied model."""

    def __init__(
        self, table: Int8Embedding | NF4Embedding, *, bias: torch.Tensor | None = None, dynamic: bool = False
    ) -> None:
        super().__init__()
        self.__dict__["_table"] = table  # not a submodule: no second copy of its buffers in the state dict
        self.dynamic = dynamic
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.quant_format = f"tied:{table.quant_format}" + (":dynamic" if dynamic else "")

    @property
    def table(self) -> Int8Embedding | NF4Embedding:
        return self.__dict__["_table"]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.table.linear(h, dynamic=self.dynamic)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.table.quant_format})"


def nf4_quantize(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ((numel + 1) // 2, 1), absmax fp32 (blocks,)) through bitsandbytes."""
    _require_nf4(weight.device)
    with _quiet("bitsandbytes"):
        packed, state = _bnb().functional.quantize_4bit(
            weight.detach().contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=False
        )
    return packed, state.absmax.float()


def nf4_decode(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int | None = None) -> torch.Tensor:
    """Decode packed NF4 codes (high nibble first) along the last dimension: (..., n) uint8 with absmax
    (..., 2n / blocksize) -> (..., 2n) fp32, cut to `numel` when given (1-D). Bit-identical to bitsandbytes'
    dequantize_4bit (tested), and plain torch, so it runs on any device and shape."""
    code = nf4_code(str(packed.device)).to(packed.device)
    idx = torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2).long()
    vals = code[idx]
    if numel is not None:
        vals = vals[:numel]
        pad = (-numel) % blocksize
        blocks = F.pad(vals, (0, pad)).view(-1, blocksize) * absmax.float().view(-1, 1)
        return blocks.view(-1)[:numel]
    return (vals.unflatten(-1, (-1, blocksize)) * absmax.float().unsqueeze(-1)).flatten(-2)


def nf4_state(absmax: torch.Tensor, shape: tuple[int, int], blocksize: int, dtype: torch.dtype) -> Any:
    """A bitsandbytes QuantState rebuilt from plain tensors (the state is not saved; the tensors are)."""
    functional = _bnb().functional
    return functional.QuantState(
        absmax=absmax.float(),
        shape=torch.Size(shape),
        code=nf4_code(str(absmax.device)).to(absmax.device),
        blocksize=blocksize,
        quant_type="nf4",
        dtype=dtype,
    )


# ----- selection --------------------------------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """fnmatch on module names; a bare pattern also matches the last name component (`q_proj`, `lm_head`) and
    everything below a matching module (`model.layers.0` selects the whole block)."""
    return (
        fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(name, f"*.{pattern}")
        or fnmatch.fnmatchcase(name, f"{pattern}.*")
        or fnmatch.fnmatchcase(name, f"*.{pattern}.*")
    )


def selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include and not any(matches(name, p) for p in include):
        return False
    return not (exclude and any(matches(name, p) for p in exclude))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _projection(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a module that is a plain linear map (nn.Linear, or a head exposing `projection()`)."""
    if isinstance(module, AdapterLayer | QuantizedModule):
        return None  # adapted or already quantized modules are left alone
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    projection = getattr(module, "projection", None)
    if callable(projection):
        proj = projection()
        if proj is not None and proj[0].dim() == 2 and proj[0].is_floating_point():
            return proj
    return None


def _check_patterns(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p for p in value):
        raise QuantizationError(f"{what} must be a list of module-name patterns (e.g. ['lm_head']), got {value!r}")
    return list(value)


# ----- quantizers -------------------------------------------------------------------------------------------------
class ModuleQuantizer(Quantizer):
    """Shared machinery: pick modules by name patterns, swap linear layers and embedding tables.

    Subclasses say what a linear layer and an embedding table become (`_linear`, `_table`); either may be None.
    With a tied output head, the head follows its table: both quantized (one stored table), or the head keeps
    a full-precision copy when the patterns exclude it."""

    method = ""

    def __init__(
        self, include: list[str] | None = None, exclude: list[str] | None = None, embeddings: bool = True
    ) -> None:
        self.include = _check_patterns(include, "include")
        self.exclude = _check_patterns(exclude, "exclude")
        self.embeddings = bool(embeddings)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
        return None

    def _table(self, weight: torch.Tensor) -> Int8Embedding | NF4Embedding | None:
        return None

    def _tied_head(self, table: Int8Embedding | NF4Embedding, bias: torch.Tensor | None) -> nn.Module:
        return TiedQuantizedHead(table, bias=bias)

    def check_device(self, device: torch.device) -> None:
        """Raise QuantizerUnavailableError when this method cannot run on `device`."""

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
    ) -> nn.Module:
        include = _check_patterns(include, "include")
        exclude = _check_patterns(exclude, "exclude")
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        if device.type == "meta":
            raise QuantizationError(
                "cannot quantize a model on the meta device (no weights); build or load it on cpu/cuda first"
            )
        self.check_device(device)
        modules = dict(model.named_modules())
        tables: dict[int, tuple[str, nn.Module]] = {}  # id(original float weight) -> quantized table
        embedding_weights = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
        if self.embeddings:
            for name, module in modules.items():
                if type(module) is nn.Embedding and selected(name, include, exclude):
                    table = self._table(module.weight)
                    if table is not None:
                        tables[id(module.weight)] = (name, table)
        for name, module in modules.items():
            if not name or not selected(name, include, exclude):
                continue
            proj = _projection(module)
            if proj is None:
                continue
            weight, bias = proj
            tied = tables.get(id(weight))
            if tied is not None:
                _set_module(model, name, self._tied_head(tied[1], bias))
                continue
            if id(weight) in embedding_weights:
                # a head tied to a table this pass leaves in full precision: a quantized copy would only add bytes
                continue
            replacement = self._linear(weight, bias)
            if replacement is not None:
                _set_module(model, name, replacement)
        for name, table in tables.values():
            _set_module(model, name, table)
        return model


class Int8DynamicQuantizer(ModuleQuantizer):
    """int8 weights (per output row) and int8 activations quantized per token on the fly (torch._int_mm)."""

    method = "int8_dynamic"

    def _linear(self, weight, bias):
        return Int8Linear.from_float(weight, bias, dynamic=True)

    def _table(self, weight):
        return Int8Embedding.from_float(weight)

    def _tied_head(self, table, bias):
        return TiedQuantizedHead(table, bias=bias, dynamic=True)


class Int8WeightOnlyQuantizer(ModuleQuantizer):
    """int8 weights (per output row), activations in the model's dtype; halves bf16 decode memory traffic."""

    method = "int8_weight_only"

    def _linear(self, weight, bias):
        return Int8Linear.from_float(weight, bias, dynamic=False)

    def _table(self, weight):
        return Int8Embedding.from_float(weight)


class Int8EmbeddingQuantizer(ModuleQuantizer):
    """int8 weight-only embedding tables (per row, like the seed's float_qparams config); a tied head follows."""

    method = "int8_embedding"

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__(include, exclude, embeddings=True)

    def _table(self, weight):
        return Int8Embedding.from_float(weight)


class NF4Quantizer(ModuleQuantizer):
    """bitsandbytes 4-bit NormalFloat weights with one absmax per `blocksize` weights (CPU and GPU)."""

    method = "nf4"

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = True,
        blocksize: int = 64,
    ) -> None:
        super().__init__(include, exclude, embeddings)
        if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantizationError(f"nf4 blocksize must be a power of two from 32 to 4096, got {blocksize}")
        self.blocksize = blocksize

    def check_device(self, device: torch.device) -> None:
        _require_nf4(device)

    def _linear(self, weight, bias):
        return NF4Linear.from_float(weight, bias, blocksize=self.blocksize)

    def _table(self, weight):
        return NF4Embedding.from_float(weight, blocksize=self.blocksize)


QUANTIZERS: dict[str, type[ModuleQuantizer]] = {
    "int8_dynamic": Int8DynamicQuantizer,
    "int8_weight_only": Int8WeightOnlyQuantizer,
    "int8_embedding": Int8EmbeddingQuantizer,
    "nf4": NF4Quantizer,
}


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> storage format of every quantized module in `model` (for reports)."""
    return {name: m.quant_format for name, m in model.named_modules() if isinstance(m, QuantizedModule)}


@hookimpl
def llamaforge_register(register):
    for name, cls in QUANTIZERS.items():
        register("quantizer", name, cls)
