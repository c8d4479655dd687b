"""Generation: prefill, then incremental decoding over a preallocated static KV cache.

Prompts of different lengths are left-padded into one batch; each row's positions start at its first real token,
so a padded row produces exactly what it would alone. Sampling is an ordered pipeline of registered sampler
plugins. Every per-step quantity (token, position, context, sampling noise) lives on the device, so on CUDA the
one-token step is torch.compiled and replayed as a CUDA graph, and the host only reads tokens back, one step
behind the GPU.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.interfaces import Sampler
from llamaforge.core.model import eval_mode, submodules
from llamaforge.core.spec import ComponentSpec
from llamaforge.errors import LlamaforgeError


class GenerationError(LlamaforgeError, ValueError):
    """Bad generation input: empty prompt, prompt too long, invalid token ids or sampler settings."""


def _as_component(value: Any) -> ComponentSpec:
    return value if isinstance(value, ComponentSpec) else ComponentSpec.model_validate(value)


@dataclass
class GenerationConfig:
    """What to generate and how; `samplers` is the ordered pipeline (default: greedy)."""

    max_new_tokens: int = 128
    samplers: list[Any] = field(default_factory=lambda: [ComponentSpec(name="greedy")])
    stop_strings: list[str] = field(default_factory=list)
    eos_token_ids: list[int] | None = None
    seed: int | None = None
    compile: bool | None = None  # torch.compile the one-token decode step (None: on CUDA)
    cuda_graph: bool | None = None  # replay the decode step as a CUDA graph (None: on CUDA)
    # pad short prompts on the left to 16/32/.../256 tokens and, in a CUDA-graph session, replay each length's
    # prefill as a CUDA graph: the eager prefill's Python costs milliseconds per call (see _PREFILL_BUCKETS).
    # None: wherever the decode step replays a CUDA graph. On an H200 (1B shape, bf16, batch 1, 256 new tokens) it
    # cut the fixed cost of a call from 15-24 ms to 6.6 ms: 999 tok/s end to end vs 928-943 in the same run.
    prefill_graph: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if isinstance(self.samplers, str | dict | ComponentSpec) or not isinstance(self.samplers, list | tuple):
            raise GenerationError(
                f"samplers is an ordered list of samplers, e.g. [temperature, top_k]; got {self.samplers!r}"
            )
        if self.prefill_graph is not None and not isinstance(self.prefill_graph, bool):
            raise GenerationError(f"prefill_graph must be true, false or null (auto), got {self.prefill_graph!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        try:
            self.samplers = [_as_component(s) for s in self.samplers] or [ComponentSpec(name="greedy")]
        except ValueError as exc:
            first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
            where = ".".join(str(p) for p in first["loc"])
            raise GenerationError(
                f"bad sampler entry in {self.samplers!r}: {where} {first['msg']}; write {{name: ..., params: {{...}}}}"
            ) from None

    @classmethod
    def from_options(
        cls,
        *,
        greedy: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        **kwargs: Any,
    ) -> GenerationConfig:
        """The usual knobs as a pipeline: repetition_penalty -> temperature -> top_k -> top_p -> min_p.

        With no sampling knob (or greedy=True, or temperature 0) decoding is greedy."""
        stages: list[ComponentSpec] = []
        if repetition_penalty is not None and repetition_penalty != 1.0:
            stages.append(ComponentSpec(name="repetition_penalty", params={"penalty": repetition_penalty}))
        sampling = any(v is not None for v in (temperature, top_k, top_p, min_p))
        if greedy or not sampling or temperature == 0:
            if greedy and sampling and temperature != 0:
                raise GenerationError("greedy decoding takes no temperature/top_k/top_p/min_p; drop one or the other")
            stages.append(ComponentSpec(name="greedy"))
        else:
            if temperature is not None and temperature != 1.0:
                stages.append(ComponentSpec(name="temperature", params={"temperature": temperature}))
            if top_k is not None:
                stages.append(ComponentSpec(name="top_k", params={"top_k": top_k}))
            if top_p is not None:
                stages.append(ComponentSpec(name="top_p", params={"top_p": top_p}))
            if min_p is not None:
                stages.append(ComponentSpec(name="min_p", params={"min_p": min_p}))
        return cls(samplers=stages, **kwargs)

    @classmethod
    def load(cls, path: str | Path) -> GenerationConfig:
        """A YAML/JSON generation spec: {max_new_tokens, samplers: [...], stop_strings, seed}."""
        import json

        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise GenerationError(f"cannot read generation spec {path}: {exc}") from None
        if not isinstance(data, dict):
            raise GenerationError(f"{path}: a generation spec is a mapping")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise GenerationError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)


def build_pipeline(samplers: Sequence[Any]) -> list[Sampler]:
    from pydantic import ValidationError

    from llamaforge.registry.manager import lookup

    stages = []
    for spec in samplers:
        spec = _as_component(spec)
        entry = lookup("sampler", spec.name)
        try:
            params = entry.validate_params(spec.params)
        except ValidationError as exc:
            raise GenerationError(f"sampler {spec.name!r}: {exc.errors()[0]['msg']} ({spec.params})") from None
        stages.append(entry.factory(**params))
    return stages


def choose_tokens(
    stages: Sequence[Sampler], logits: torch.Tensor, context: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Run the pipeline on (B, V) logits and pick one token per row (argmax, or a draw from the softmax)."""
    noise = None
    if not _chooses(stages):
        noise = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
        noise.exponential_(generator=generator)
    return _pick(stages, logits, context, noise)


def _chooses(stages: Sequence[Sampler]) -> bool:
    return any(getattr(stage, "chooses", False) for stage in stages)


def _pick(stages: Sequence[Sampler], logits: torch.Tensor, context: torch.Tensor, noise: torch.Tensor | None):
    """Apply the stages, then argmax, or sample by the exponential race: argmax(p / E) with E ~ Exp(1) picks token
    i with probability p_i, and needs no host round trip (torch.multinomial may synchronise), so the whole choice can
    live inside a CUDA graph with the noise drawn just before it from the seeded generator."""
    logits = logits.float()
    for stage in stages:
        logits = stage(logits, context)
    if noise is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return (probs / noise.clamp(min=1e-30)).argmax(dim=-1)


def _eos_ids(model: Any, config: GenerationConfig, tokenizer: Any) -> set[int]:
    if config.eos_token_ids is not None:
        return set(config.eos_token_ids)
    eos = model.spec.eos_token_id
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def _check_prompts(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    vocab = model.spec.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        bad = [t for t in p if not hasattr(t, "__index__")]  # ints, numpy ints, 0-d integer tensors
        if bad:
            raise GenerationError(f"prompt {i} has non-integer token ids: {bad[:5]}")
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.spec.max_positions:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{model.spec.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )


# ----- the decoding session ---------------------------------------------------------------------------------------
_LENGTH_BUCKET = 128  # graph sessions round the cache length up to this, so prompts of other lengths reuse a graph
# Prompt lengths a captured prefill is padded to. Longer prompts prefill eagerly at their own length: there the GPU
# work outweighs the ~3-5 ms of Python an eager 16-layer forward costs, and padding would waste compute.
_PREFILL_BUCKETS = (16, 32, 64, 128, 256)


def _prefill_length(longest: int, max_new_tokens: int, max_positions: int, graphed: bool) -> int:
    """The prompt length the context is laid out for: the longest prompt, or its bucket with prefill graphs when
    the bucket still leaves room for max_new_tokens within the model's positions."""
    bucket = next((b for b in _PREFILL_BUCKETS if b >= longest), longest) if graphed else longest
    return bucket if bucket + max_new_tokens <= max_positions else longest


def _graphs(config: GenerationConfig, device: torch.device) -> tuple[bool, bool]:
    """(decode step as a CUDA graph, prefill as CUDA graphs) for this config on this device."""
    step = _auto(config.cuda_graph, device) and device.type == "cuda"
    return step, step if config.prefill_graph is None else config.prefill_graph


_SESSIONS_PER_MODEL = 3
_sessions: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, _Session]] = weakref.WeakKeyDictionary()
_compiled_steps: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
log = logging.getLogger(__name__)


def _decode_forward(model: Any, tokens, attention_mask, position_ids, cache, cache_position) -> torch.Tensor:
    return model(
        tokens,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        cache_position=cache_position,
    ).logits[:, -1]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of (B, V) in two stages (per block of the vocabulary, then over the blocks), with
    the same ties (lowest id). One row of 128k logits is otherwise a reduction that a single thread block walks."""
    b, v = logits.shape
    block = next((c for c in (512, 384, 256, 128) if v % c == 0 and v // c >= 8), None)
    if block is None or not _ARGMAX_BLOCKS:
        return logits.argmax(dim=-1)
    values, within = logits.view(b, v // block, block).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (best * block + within.gather(1, best)).squeeze(1)


def _greedy_step(model: Any, cur, mask, pad, pos, cache, ids) -> torch.Tensor:
    """One whole greedy decoding step (forward, argmax, state advance) for torch.compile to fuse: the argmax over a
    128k vocabulary and the bookkeeping become a few generated kernels instead of separate ATen launches."""
    position_ids = pos[None, :] - pad[:, None]
    tokens = argmax_rows(_decode_forward(model, cur, mask, position_ids, cache, pos).float())
    _advance(ids, cur, pos, tokens)
    return tokens


def _advance(ids: torch.Tensor, cur: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor) -> None:
    """Record the chosen tokens after position `pos` in the context and feed them next. Indexed assignment, not
    index_copy_: under torch.compile it stays in place on the context buffer."""
    ids[:, pos + 1] = tokens[:, None]
    cur.copy_(tokens[:, None])
    pos.add_(1)


def _compiled(fn: Any, model: Any) -> Any:
    """torch.compile of a decode function, once per (function, model); dynamo keeps one graph per batch/cache
    shape. Cached beside the model (weakly), so dropping the model drops its compiled code."""
    per_model = _compiled_steps.setdefault(model, {})
    if fn not in per_model:
        if model.device.type == "cuda":  # their custom ops are registered before dynamo traces a call into them
            import llamaforge.kernels.decode_attention
            import llamaforge.kernels.row_gemv  # noqa: F401
        per_model[fn] = torch.compile(fn, options=_compile_options(model.device))
    return per_model[fn]


_gemv_rewrites = [0]  # how many products the pass below rewrote (tests read it)
_GEMV_MAX_ROWS = 1  # matrix products with at most this many rows become weight-streaming reductions
_FUSE_SIBLINGS = True  # products sharing their input row become one reduction (see _gemv_pass)
_POINTWISE_CAT = True  # stacked weights are read in place by the reduction instead of copied first
_FUSE_GREEDY_STEP = True  # greedy decoding compiles forward + argmax + state advance as one step
_ARGMAX_BLOCKS = True  # the greedy step's argmax in two stages (see argmax_rows)
_BUFFER_ROW = True  # the product's row is a buffer, not recomputed per thread block (see _gemv_pass)
# Per device kind: True / False everywhere, None (the default) on CPUs only, where they were measured faster (see
# _gemv_pass); on the H200 they were not.
_FOLD_NORM: bool | None = None  # an RMSNorm's row scale applied after the product, in the product's reduction
_UNSTACK_EQUAL: bool | None = None  # sibling products of equal width (gate/up) as separate reductions, not stacked
# Tried and timed slower on the H200 (1B, bf16, batch 1; benchmarks/results/decode_variants_h200.json), so gone:
# int8 weights read as int32 words, four per load (2026-12-02), and widened to fp32 through their float bits
# instead of a conversion instruction (1.134 vs 0.914 ms per step, run12).
# inductor options laid over the decode step's own, e.g. {"triton.enable_pdl": True} for Programmatic Dependent
# Launch on Hopper (benchmarks A/B them)
_EXTRA_OPTIONS: dict[str, Any] = {}
# Each step's tokens are read back by a copy on a stream of its own that waits for the step, so the decode stream
# never waits for a copy. H200 (1B, bf16, batch 1, 256 tokens; 2026-12-02, seventh session, two runs): the fixed cost
# per generate() call fell from 6.59 / 6.10 ms to 4.04 / 3.76 ms, 942 -> 957 and 981 -> 999 tok/s end to end. Timed
# in the same runs and dropped: the tokens read back once per 8 steps (fixed 4.34 ms but 0.988x end to end, and EOS
# seen late) and the step captured 2 or 3 times, replayed in turn (1.00x, 0.98x). False: the copy on the decode stream.
_SIDE_COPY = True


def _compile_options(device: torch.device) -> dict[str, Any]:
    """Inductor options for the decode step only (global settings stay untouched). Coordinate-descent tuning of the
    generated kernels costs ~30 s more compilation, once. On an H200 (Llama-3.2-1B shape, bf16, batch 1, one run,
    each variant in its own process; benchmarks/results/decode_variants_h200.json run8) the step took 0.99 ms with
    the GEMV pass below, 1.10 ms with the pass but without row buffering and 1.25 ms without the pass; runs on
    fresh machines spread by 5-10%. Until 2026-12-02 the pass matched only `aten.mm`, which inductor had already
    decomposed on CUDA under this tuning, so earlier GPU figures for its switches measured inductor's own form.
    On a 2-core CPU (~100M spec, batch 1) the pass took fp32 decoding from 31-32 to 55-60 tok/s and int8
    weight-only from 18 to 95 (oneDNN's one-row fp32 products stream ~12-15 GB/s there, inductor's reduction ~25);
    16-bit weights it leaves to oneDNN on a CPU (bf16: 68.5 tok/s without the pass, 56.7 with it)."""
    options: dict[str, Any] = {"coordinate_descent_tuning": True}
    if _GEMV_MAX_ROWS:
        options["post_grad_custom_pre_pass"] = _gemv_pass()
        options["force_pointwise_cat"] = _POINTWISE_CAT
    return {**options, **_EXTRA_OPTIONS}


def _on_cpu_by_default(flag: bool | None, device_type: str) -> bool:
    return device_type == "cpu" if flag is None else flag


def _gemv_pass() -> Any:
    """An inductor graph pass for decoding: `mm(x, W.T)` where x has a single row becomes `sum(x * W, -1)` in fp32.

    A one-token step is bound by reading the weights. A GEMM tiled for many rows spreads a narrow weight matrix
    over few thread blocks; as a reduction, inductor emits one kernel per matrix that streams every weight row
    once with the whole GPU, which is what a memory-bound matrix-vector product wants. Products that share their
    row (q/k/v, gate/up) become one reduction over the weights stacked along the output dimension: the stacking
    is lowered as masked loads from each weight (nothing is copied), so a layer launches fewer, larger kernels.

    The row itself is read through an identity `as_strided`, which inductor can only lower from a buffer: left
    alone, it inlines the row's producer (the RMSNorm scaling, SiLU(gate)*up) into the reduction's loads, and every
    thread block recomputes the whole row (2,048 blocks x 64 KB per down_proj call): on an H200 (1B, batch 1) the
    step took 0.99 ms with the buffered row and 1.10 ms without, in one run (`_BUFFER_ROW` is the switch
    benchmarks/decode_variants.py A/Bs).

    Two more rewrites apply on CPUs by default (`_FOLD_NORM`, `_UNSTACK_EQUAL`). A product whose row is an RMSNorm
    of one row r becomes `sum(r * g * W, -1) * rsqrt(mean(r ** 2) + eps)`, the sum of squares taken beside the
    weight streaming (once per output row), so the norm needs no pass of its own; and siblings of equal width
    (gate/up) stay separate reductions, which inductor fuses into one loop with SiLU(gate)*up as its epilogue. On
    a 2-core CPU (~100M spec, fp32, batch 1; benchmarks/decode_variants.py, three rounds in one invocation) the two
    together took decoding from 59-64 to 77-89 tok/s (int8 weight-only 93-118 -> 118-144), with the same tokens.
    On an H200 (1B, bf16) they did not pay: the norm fold alone 0.997 and 1.050 ms per step in two runs against
    1.001-1.016 for the default, with int8 weights 1.085 against 0.866 ms (the int8 reductions are bound by
    instructions, and the fold adds some per weight), unstacked gate/up 1.012 ms (decode_variants_h200.json run14).
    The rewrite changes rounding where the norm's bf16 output was rounded before the product (as inductor's own
    fusions do); in fp32 it only reorders the sums.

    On CUDA the pass gets each product in the form inductor's decomposition gives a one-row `mm` under
    coordinate-descent tuning, `sum(row[:, :, None] * W.T[None], 1)` in fp32, and rewrites that form too."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    aten, prims = torch.ops.aten, torch.ops.prims

    def cast_source(node: Any, to: torch.dtype | None = None) -> torch.fx.Node | None:
        """The input of a dtype cast (to `to`, when given), else None: an int8 weight-only layer's matrix widened
        in the graph, or the fp32 casts inductor's decomposition puts around a low-precision product."""
        if isinstance(node, torch.fx.Node) and node.target is prims.convert_element_type.default:
            if to is None or node.args[1] == to:
                return node.args[0]
        return None

    def widened_from(node: Any) -> Any:
        return cast_source(node, torch.float32) or node

    def one_row_product(node: torch.fx.Node) -> tuple[Any, torch.fx.Node, torch.fx.Node] | None:
        """(sibling key, W.T, row) of `mm(row, W.T)`, or of the form inductor's own decomposition gives a one-row
        `mm` on GPUs when coordinate-descent tuning is on (as in the decode step, before this pass runs):
        `sum(unsqueeze(f32(row), 2) * unsqueeze(f32(W.T), 0), [1])`."""
        if node.op != "call_function":
            return None
        if node.target is aten.mm.default:
            x, wt = node.args
        elif (
            node.target is aten.sum.dim_IntList
            and len(node.args) == 2
            and not node.kwargs
            and list(node.args[1]) == [1]
        ):
            mul = node.args[0]
            if not (isinstance(mul, torch.fx.Node) and mul.target is aten.mul.Tensor and len(mul.users) == 1):
                return None
            a, b = mul.args
            if not all(isinstance(n, torch.fx.Node) and n.target is aten.unsqueeze.default for n in (a, b)):
                return None
            if a.args[1] != 2 or b.args[1] != 0:
                return None
            x, wt = widened_from(a.args[0]), widened_from(b.args[0])
        else:
            return None
        if not (isinstance(wt, torch.fx.Node) and wt.target is aten.permute.default) or list(wt.args[1]) != [1, 0]:
            return None
        xv, outv = x.meta.get("val"), node.meta.get("val")
        if xv is None or outv is None or xv.dim() != 2 or xv.shape[0] > _GEMV_MAX_ROWS:
            return None
        wv = widened_from(wt.args[0]).meta.get("val") if isinstance(wt.args[0], torch.fx.Node) else None
        if xv.device.type == "cpu" and (wv is None or wv.dtype in (torch.bfloat16, torch.float16)):
            return None  # 16-bit weights on a CPU: oneDNN's products (AMX / AVX-512 BF16) are the faster ones
        # F.linear on (B, T, K) reshapes its input per call: products of one tensor differ only by that view
        key = (x.args[0], tuple(xv.shape), xv.dtype) if x.target in (aten.view.default, aten.reshape.default) else x
        return key, wt, x

    def _hoist(node: Any, before: torch.fx.Node, order: dict[torch.fx.Node, float]) -> bool:
        """Move the side-effect-free computation of a weight (an int8 matrix's cast, say), defined after `before`,
        to just before it, so the stacked product can be placed there. False if that is not possible. `order` is
        the graph's node order; a moved node is re-ranked just ahead of `before`."""
        if not isinstance(node, torch.fx.Node) or order[node] < order[before]:
            return True
        if node.op != "call_function" or node.is_impure():
            return False
        if not all(_hoist(arg, before, order) for arg in node.all_input_nodes):
            return False
        before.prepend(node)
        order[node] = order[before] - 0.5
        return True

    def _kernel_sources(weights: list[Any], xv: torch.Tensor) -> list[torch.fx.Node] | None:
        """The matrices to hand to llamaforge's row GEMV kernel (`llamaforge.kernels.row_gemv`) when it is switched
        on for them: the int8 tensors behind weights widened in the graph (int8 weight-only layers), or plain
        floating-point weights; None when the kernel is off for them or does not take them."""
        from llamaforge.kernels import row_gemv

        casts = [cast_source(w) for w in weights]
        widened = [c is not None for c in casts]
        sources = [c if c is not None else w for w, c in zip(weights, casts, strict=True)]
        vals = [src.meta.get("val") if isinstance(src, torch.fx.Node) else None for src in sources]
        if any(v is None for v in vals) or not row_gemv.supported(xv, vals):  # the op's own shape rule, on fakes
            return None
        int8 = vals[0].dtype == torch.int8
        if int8 and not all(widened):
            return None
        if not int8 and (any(widened) or not vals[0].is_floating_point()):
            return None
        return sources if row_gemv.route_available(vals, xv.shape[-1]) else None

    def rms_normed(x: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, float] | None:
        """(row before the norm, norm weight, eps) when the product's row is an RMSNorm of one row,
        `g * cast(r * rsqrt(mean(r ** 2, -1, keepdim) + eps))` (the cast optional), else None."""
        node = x.args[0] if x.target in (aten.view.default, aten.reshape.default) else x
        if node.op != "call_function" or node.target is not aten.mul.Tensor:
            return None
        width = x.meta["val"].shape[-1]
        for scaled, weight in (node.args, node.args[::-1]):
            wv = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
            if wv is None or tuple(wv.shape) != (width,) or not isinstance(scaled, torch.fx.Node):
                continue
            core = cast_source(scaled) or scaled
            if not isinstance(core, torch.fx.Node) or core.target is not aten.mul.Tensor:
                continue
            for row, rs in (core.args, core.args[::-1]):
                if not (isinstance(rs, torch.fx.Node) and rs.target is aten.rsqrt.default):
                    continue
                plus = rs.args[0]
                if not (isinstance(plus, torch.fx.Node) and plus.target is aten.add.Tensor):
                    continue
                mean, eps = plus.args
                if not (isinstance(mean, torch.fx.Node) and mean.target is aten.mean.dim and isinstance(eps, float)):
                    continue
                square = mean.args[0]
                if not (square.target is aten.pow.Tensor_Scalar and square.args == (row, 2)):
                    continue
                rv = row.meta["val"]
                if list(mean.args[1]) in ([-1], [rv.dim() - 1]) and mean.args[2:3] == (True,) and rv.numel() == width:
                    return row, weight, eps  # over the last dimension of one row (batch 1, one token)
        return None

    def _buffered(add: Any, node: torch.fx.Node) -> torch.fx.Node:
        """`node` read through an identity `as_strided`, which inductor lowers only from a buffer (see the docstring:
        the row is computed once, not inside every thread block); the offset is the node's own."""
        val = node.meta["val"]
        return add(aten.as_strided.default, (node, list(val.shape), list(val.stride())))

    def _folded_product(add: Any, row: Any, weight: Any, eps: float, matrix: Any, width: int) -> torch.fx.Node:
        """`sum(r * g * W, -1) * rsqrt(mean(r ** 2) + eps)` for the row r before its RMSNorm (fp32): the weight
        streaming and the sum of squares share one pass over r, with one sum of squares per output row, so
        inductor emits one reduction and the norm needs no kernel of its own."""
        source = cast_source(row, torch.float32) or row
        if _BUFFER_ROW:
            source = _buffered(add, source)
        r32 = add(prims.convert_element_type.default, (add(aten.reshape.default, (source, [1, width])), torch.float32))
        g32 = add(prims.convert_element_type.default, (weight, torch.float32))
        w32 = add(prims.convert_element_type.default, (matrix, torch.float32))
        scaled = add(aten.unsqueeze.default, (add(aten.mul.Tensor, (r32, g32)), 1))
        prod = add(aten.sum.dim_IntList, (add(aten.mul.Tensor, (scaled, w32)), [2]))
        squares = add(aten.unsqueeze.default, (add(aten.mul.Tensor, (r32, r32)), 1))
        wide = add(aten.expand.default, (squares, [1, w32.meta["val"].shape[0], width]))
        mean = add(aten.div.Tensor, (add(aten.sum.dim_IntList, (wide, [2])), float(width)))
        return add(aten.mul.Tensor, (prod, add(aten.rsqrt.default, (add(aten.add.Tensor, (mean, eps)),))))

    def _stacked(add: Any, matrices: list[torch.fx.Node]) -> torch.fx.Node:
        """Sibling matrices as one, along the output dimension (read in place under force_pointwise_cat)."""
        return matrices[0] if len(matrices) == 1 else add(aten.cat.default, (matrices, 0))

    class RowTimesWeight(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            groups: dict[Any, list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]] = {}
            for node in list(graph.nodes):
                found = one_row_product(node)
                if found is not None:
                    groups.setdefault(found[0], []).append((node, found[1], found[2]))
            for members in groups.values():
                device = members[0][2].meta["val"].device.type
                widths = {n.meta["val"].shape[-1] for n, _, _ in members}
                equal = len(widths) == 1 and _on_cpu_by_default(_UNSTACK_EQUAL, device)
                if not _FUSE_SIBLINGS or equal or len({n.meta["val"].dtype for n, _, _ in members}) > 1:
                    for member in members:
                        self.rewrite(graph, [member])
                else:
                    self.rewrite(graph, members)

        @staticmethod
        def rewrite(graph: torch.fx.Graph, members: list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]) -> None:
            first, _, x = members[0]
            xv = x.meta["val"]

            def add(target, args, _fake=xv.fake_mode):
                new = graph.call_function(target, args, {})
                fake = [
                    [i.meta["val"] for i in a] if isinstance(a, list | tuple) and a and isinstance(a[0], torch.fx.Node)
                    else a.meta["val"] if isinstance(a, torch.fx.Node) else a
                    for a in args
                ]  # fmt: skip
                with _fake:
                    new.meta["val"] = target(*fake)
                return new

            weights = [wt.args[0] for _, wt, _ in members]
            order = {n: i for i, n in enumerate(graph.nodes)} if len(members) > 1 else {}
            if len(members) > 1 and not all(_hoist(w, first, order) for w in weights):
                for member in members:
                    RowTimesWeight.rewrite(graph, [member])
                return
            kernel = _kernel_sources(weights, xv)
            fold = _on_cpu_by_default(_FOLD_NORM, xv.device.type) and not kernel
            normed = rms_normed(x) if fold else None
            with graph.inserting_before(first):
                if normed is not None:  # see the docstring: the norm's row scale after the product
                    red = _folded_product(add, *normed, _stacked(add, weights), xv.shape[-1])
                else:
                    if _BUFFER_ROW or kernel:
                        x = _buffered(add, x)
                    if kernel:  # llamaforge's row GEMV kernel: all the matrices in one launch, fp32 sums
                        red = graph.call_function(torch.ops.llamaforge.gemv_rows.default, (x, kernel), {})
                        with xv.fake_mode:  # its shape, without tracing the Triton launch
                            rows = sum(src.meta["val"].shape[0] for src in kernel)
                            red.meta["val"] = xv.new_empty((xv.shape[0], rows), dtype=torch.float32)
                    else:
                        x32 = add(prims.convert_element_type.default, (x, torch.float32))
                        w32 = add(prims.convert_element_type.default, (_stacked(add, weights), torch.float32))
                        prod = add(aten.mul.Tensor, (add(aten.unsqueeze.default, (x32, 1)), w32))  # (M,1,K)*(N,K)
                        red = add(aten.sum.dim_IntList, (prod, [2]))
                start = 0
                for node, _, _ in members:
                    width = node.meta["val"].shape[1]
                    part = red if len(members) == 1 else add(aten.slice.Tensor, (red, 1, start, start + width))
                    start += width
                    if part.meta["val"].dtype != node.meta["val"].dtype:
                        part = add(prims.convert_element_type.default, (part, node.meta["val"].dtype))
                    node.replace_all_uses_with(part)
            for node, _, _ in members:
                _gemv_rewrites[0] += 1
                _erase_unused(graph, node)  # and what only it used (W.T, the decomposed form's casts and product)

        def uuid(self) -> str:
            from llamaforge.kernels import decode_attention, gate_up, qkv_rope, residual_gemv, row_gemv

            flags = f"{_GEMV_MAX_ROWS}-{_FUSE_SIBLINGS}-{_BUFFER_ROW}-{_FOLD_NORM}-{_UNSTACK_EQUAL}"
            # the fused decode kernels' settings too: inductor's cache keys on this pass's uuid, not on what a
            # Triton op read while being traced
            tags = "-".join(m.launch_tag() for m in (row_gemv, qkv_rope, gate_up, decode_attention, residual_gemv))
            return f"llamaforge-row-times-weight-9-{flags}-{tags}"

    def _erase_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        if node.users or node.op != "call_function" or node.is_impure():
            return
        inputs = node.all_input_nodes
        graph.erase_node(node)
        for arg in inputs:
            _erase_unused(graph, arg)

    return RowTimesWeight()


class _Session:
    """Static buffers for one (batch, cache length, pipeline) and, on CUDA, the decode step captured as a graph.

    All per-step state lives on the device: the token being fed (`cur`), its absolute position (`pos`), the
    context (`ids`, -1 where nothing is yet), the padding mask and per-row left-pad offsets. One step reads them,
    runs the model on one token per row, runs the sampler pipeline, and advances them in place, so replaying it
    needs no host work beyond drawing the sampling noise, and nothing waits for the GPU but the token read-back.
    """

    def __init__(self, model: Any, bsz: int, total: int, stages: list[Sampler], *, compile: bool, graph: bool):
        device = model.device
        self._model = weakref.ref(model)  # the session is cached per model: a strong reference would pin it
        self.bsz, self.total, self.stages = bsz, total, stages
        self.device = device
        self.in_use = False
        self.cache = model.new_cache(bsz, total)
        self.ids = torch.full((bsz, total), -1, dtype=torch.long, device=device)
        self.mask = torch.zeros(bsz, total, dtype=torch.long, device=device)
        self.pad = torch.zeros(bsz, dtype=torch.long, device=device)
        self.cur = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.sampling = not _chooses(stages)
        vocab = model.spec.vocab_size
        self.noise = torch.ones(bsz, vocab, dtype=torch.float32, device=device) if self.sampling else None
        self.forward = _compiled(_decode_forward, model) if compile else _decode_forward
        greedy = len(stages) == 1 and getattr(stages[0], "chooses", False) and getattr(stages[0], "plain_argmax", False)
        self.fused = _compiled(_greedy_step, model) if compile and greedy and _FUSE_GREEDY_STEP else None
        self.want_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None  # the captured decode step
        self.out: torch.Tensor | None = None  # its tokens (a buffer the graph rewrites on each replay)
        # prefill graphs per layout length (GenerationConfig.prefill_graph); None once a capture has failed
        self.prefill_graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] | None = {}
        self.prefill_pool: Any = None
        self.host = torch.empty(total + 1, bsz, dtype=torch.long, pin_memory=device.type == "cuda")
        self.copier: Any = None  # the read-back stream of _SIDE_COPY (created on first use)

    @property
    def model(self) -> Any:
        return self._model()

    # -- per call
    def reset(self, prompts: Sequence[Sequence[int]], plen: int) -> int:
        """Lay the prompts out right-aligned at `plen` (at least the longest prompt's length)."""
        ids = torch.full((self.bsz, self.total), -1, dtype=torch.long)
        mask = torch.zeros(self.bsz, self.total, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, plen - len(p) : plen] = torch.tensor([int(t) for t in p], dtype=torch.long)
            mask[row, plen - len(p) :] = 1  # generated positions count as real tokens
        self.ids.copy_(ids)
        self.mask.copy_(mask)
        self.pad.copy_(torch.tensor([plen - len(p) for p in prompts], dtype=torch.long))
        self.plen = plen
        return plen

    def _draw(self, generator: torch.Generator | None) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=generator)

    def prefill(self, generator: torch.Generator | None, *, graph: bool = False) -> torch.Tensor:
        plen = self.plen
        if graph and self.want_graph and self.prefill_graphs is not None and plen in _PREFILL_BUCKETS:
            logits = self._prefill_graphed(plen)
        else:
            logits = self._prefill_logits(plen, torch.arange(plen, device=self.device))
        self._draw(generator)
        tokens = _pick(self.stages, logits, self.ids, self.noise)
        self.pos.fill_(plen - 1)
        _advance(self.ids, self.cur, self.pos, tokens)
        return tokens

    def _prefill_logits(self, plen: int, positions: torch.Tensor) -> torch.Tensor:
        return self.model(
            self.ids[:, :plen].clamp(min=0),
            attention_mask=self.mask,
            cache=self.cache,
            cache_position=positions,
            logits_to_keep=1,
        ).logits[:, -1]

    def _prefill_graphed(self, plen: int) -> torch.Tensor:
        """The prefill of a `plen`-token layout replayed as a CUDA graph (captured on first use). Its inputs are the
        session's static context, mask and cache; its output buffer is read before any other prefill graph runs,
        so all of them share one memory pool."""
        assert self.prefill_graphs is not None
        entry = self.prefill_graphs.get(plen)
        if entry is None:
            positions = torch.arange(plen, device=self.device)
            try:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up: lazy initialisation must not happen during capture
                    self._prefill_logits(plen, positions)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                if self.prefill_pool is None:
                    self.prefill_pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.prefill_pool):
                    out = self._prefill_logits(plen, positions)
            except Exception as exc:  # anything uncapturable in a plugin: prefill eagerly from now on
                log.warning("prefilling without a CUDA graph: capture failed (%s: %s)", type(exc).__name__, exc)
                torch.cuda.synchronize(self.device)
                self.prefill_graphs = None
                return self._prefill_logits(plen, positions)
            entry = self.prefill_graphs[plen] = (graph, out, positions)
        entry[0].replay()
        return entry[1]

    def _body(self) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(self.model, self.cur, self.mask, self.pad, self.pos, self.cache, self.ids)
        position_ids = self.pos[None, :] - self.pad[:, None]
        logits = self.forward(self.model, self.cur, self.mask, position_ids, self.cache, self.pos)
        tokens = _pick(self.stages, logits, self.ids, self.noise)
        _advance(self.ids, self.cur, self.pos, tokens)
        return tokens

    def step(self, generator: torch.Generator | None) -> torch.Tensor:
        self._draw(generator)
        if self.want_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            return self.replay()
        try:
            return self._body()
        except Exception as exc:  # torch.compile unavailable or failing here: decode eagerly (state is untouched)
            if self.forward is _decode_forward and self.fused is None:
                raise
            log.warning("decoding without torch.compile: %s: %s", type(exc).__name__, exc)
            self.forward, self.fused = _decode_forward, None
            return self._body()

    def replay(self) -> torch.Tensor:
        """One captured decode step; its tokens, valid until the next replay."""
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        """Warm up (compiling if asked) on a side stream, then capture one decode step as a CUDA graph. Warm-up
        steps advance the state, so it is saved and restored; the cache rows they write lie beyond the current
        position and are rewritten before anything attends to them."""
        saved = (self.ids.clone(), self.cur.clone(), self.pos.clone())
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # capturing runs nothing: the state is not advanced
                self.out = self._body()
            self.graph = graph
        except Exception as exc:  # a sampler or kernel that cannot be captured: decode eagerly instead
            log.warning("decoding without a CUDA graph: capture failed (%s: %s)", type(exc).__name__, exc)
            self.want_graph = False
            self.graph = self.out = None
            self.forward, self.fused = _decode_forward, None  # the failure may have been compilation's
            torch.cuda.synchronize(self.device)
        self._restore(saved)

    def _restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        for dst, src in zip((self.ids, self.cur, self.pos), saved):
            dst.copy_(src)

    # -- reading tokens back without stalling the queue
    def send_home(self, index: int, tokens: torch.Tensor) -> Any:
        if self.device.type != "cuda":
            return tokens.tolist()
        buf = self.host[index]
        if _SIDE_COPY:
            # from the context buffer (position plen + index is written once per call, unlike the step's output
            # buffer), on a stream of its own that waits for this step: the decode stream never waits for it
            ready = torch.cuda.Event()
            ready.record()
            if self.copier is None:
                self.copier = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self.copier):
                self.copier.wait_event(ready)
                buf.copy_(self.ids[:, self.plen + index], non_blocking=True)
                return _ticket(buf)
        buf.copy_(tokens, non_blocking=True)
        return _ticket(buf)

    @staticmethod
    def arrive(ticket: Any) -> list[Any]:
        if isinstance(ticket, list):
            return ticket
        buf, event = ticket
        event.synchronize()
        return buf.tolist()


def _ticket(buf: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A pinned host buffer being filled by an asynchronous copy, with the event (recorded on the current stream)
    that `_Session.arrive` waits for before reading it."""
    event = torch.cuda.Event()
    event.record()
    return (buf, event)


def _auto(flag: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if flag is None else bool(flag)


def _session(model: Any, bsz: int, need: int, config: GenerationConfig, stages: list[Sampler]) -> _Session:
    device = model.device
    graph = _graphs(config, device)[0]
    compile = _auto(config.compile, device)
    if not (graph or compile):  # eager: an exact-size cache, nothing worth keeping between calls
        return _Session(model, bsz, need, stages, compile=False, graph=False)
    total = min(model.spec.max_positions, -(-need // _LENGTH_BUCKET) * _LENGTH_BUCKET)
    key = (bsz, total, compile, graph, _pipeline_key(config.samplers), _fingerprint(model))
    pool = _sessions.setdefault(model, OrderedDict())
    session = pool.get(key)
    if session is not None and session.in_use:  # another stream of this model is mid-way: do not share buffers
        return _Session(model, bsz, total, stages, compile=compile, graph=graph)
    if session is None:
        session = _Session(model, bsz, total, stages, compile=compile, graph=graph)
        pool[key] = session
        while len(pool) > _SESSIONS_PER_MODEL:
            pool.popitem(last=False)
    pool.move_to_end(key)
    return session


def _fingerprint(model: Any) -> tuple:
    """What a captured graph depends on: the module objects (an adapter or quantizer swaps some) and where every
    parameter lives (moving the model or changing its dtype reallocates them)."""
    modules = submodules(model)
    params = tuple((p.data_ptr(), p.dtype) for m in modules for p in m._parameters.values() if p is not None)
    return hash((tuple(map(id, modules)), params))


def _pipeline_key(samplers: Sequence[Any]) -> str:
    import json

    return json.dumps([_as_component(s).model_dump(mode="json") for s in samplers], sort_keys=True, default=str)


def clear_sessions(model: Any | None = None) -> None:
    """Free the cached decoding buffers and CUDA graphs (of one model, or all); call after changing weights'
    storage (e.g. moving the model), since captured graphs point at the old tensors."""
    if model is None:
        _sessions.clear()
    else:
        _sessions.pop(model, None)


class _StopWatch:
    """Per-row stop-string detection on a window of recent tokens (decoding the whole row each step is O(n^2))."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 8

    def hit(self, generated: list[int]) -> bool:
        text = self.tokenizer.decode(generated[-self.window :])
        return any(s in text for s in self.stops)


@torch.inference_mode()
def generate_stream(
    model: Any, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, tokenizer: Any = None
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of each row (None for rows that have finished).

    A row finishes at EOS (which is yielded), when its text contains a stop string (the token completing it is
    yielded; `generate` trims), or after max_new_tokens. On CUDA the next step is already queued on the GPU while
    this one's tokens are handed out."""
    _check_prompts(model, prompts, config.max_new_tokens)
    if config.stop_strings and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer; pass tokenizer= or drop stop_strings")
    if config.max_new_tokens == 0:
        return
    stages = build_pipeline(config.samplers)
    device = model.device
    bsz = len(prompts)
    prefill_graph = _graphs(config, device)[1]
    layout = _prefill_length(max(len(p) for p in prompts), config.max_new_tokens, model.spec.max_positions,
                             prefill_graph)  # fmt: skip
    need = layout + config.max_new_tokens
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = _eos_ids(model, config, tokenizer)
    watch = _StopWatch(tokenizer, config.stop_strings) if config.stop_strings else None

    with eval_mode(model):
        session = None
        try:
            session = _session(model, bsz, need, config, stages)
            session.in_use = True
            session.reset(prompts, layout)
            ticket = session.send_home(0, session.prefill(generator, graph=prefill_graph))
            finished = [False] * bsz
            generated: list[list[int]] = [[] for _ in range(bsz)]
            for step in range(config.max_new_tokens):
                following = None
                if step + 1 < config.max_new_tokens:  # queue the next step before waiting for this one's tokens
                    following = session.send_home(step + 1, session.step(generator))
                emitted: list[int | None] = []
                for row, tok in enumerate(session.arrive(ticket)):
                    if finished[row]:
                        emitted.append(None)
                        continue
                    emitted.append(tok)
                    generated[row].append(tok)
                    if tok in eos or (watch is not None and watch.hit(generated[row])):
                        finished[row] = True
                yield emitted
                if all(finished) or following is None:
                    break
                ticket = following
        finally:
            if session is not None:
                session.in_use = False


def _generate_raw(
    model: Any, prompts: Sequence[Sequence[int]], config: GenerationConfig, tokenizer: Any
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, config, tokenizer=tokenizer):
        for row, tok in enumerate(step):
            if tok is not None:
                out[row].append(tok)
    return out


def generate(
    model: Any, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, tokenizer: Any = None
) -> list[list[int]]:
    """Generated ids per prompt (prompt excluded; EOS kept when it ended the row; stop strings trimmed)."""
    out = _generate_raw(model, prompts, config, tokenizer)
    if config.stop_strings and tokenizer is not None:
        out = [_trim_stop(ids, tokenizer, config.stop_strings) for ids in out]
    return out


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _trim_stop(ids: list[int], tokenizer: Any, stops: list[str]) -> list[int]:
    """The longest prefix of `ids` whose text ends before the first stop string (the stop string is not kept)."""
    cut = _stop_at(tokenizer.decode(ids), stops)
    if cut is None:
        return ids
    n = len(ids)
    while n > 0 and len(tokenizer.decode(ids[:n])) > cut:
        n -= 1
    return ids[:n]


def generate_text(model: Any, tokenizer: Any, prompt: str | list[str], config: GenerationConfig) -> str | list[str]:
    """Text in, text out: BOS-prefixed prompts, decoded continuations (special tokens and stop strings removed)."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    encoded = [tokenizer.encode(p, bos=tokenizer.bos_id is not None) for p in prompts]
    texts = [tokenizer.decode(o) for o in _generate_raw(model, encoded, config, tokenizer)]
    if config.stop_strings:
        texts = [t[: _stop_at(t, config.stop_strings)] for t in texts]  # cut exactly where the stop text begins
    return texts[0] if single else texts
