"""Generation: prefill, then incremental decoding over a preallocated static KV cache.

Prompts of different lengths are left-padded into one batch; positions come from the attention mask, so a padded
row produces exactly what it would alone. Sampling is an ordered pipeline of registered sampler plugins.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.interfaces import Sampler
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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        self.samplers = [_as_component(s) for s in self.samplers] or [ComponentSpec(name="greedy")]

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
        unknown = set(data) - {"max_new_tokens", "samplers", "stop_strings", "eos_token_ids", "seed"}
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
    """Run the pipeline on (B, V) logits and pick one token per row."""
    logits = logits.float()
    chooses = False
    for stage in stages:
        logits = stage(logits, context)
        chooses = chooses or getattr(stage, "chooses", False)
    if chooses:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.spec.max_positions:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{model.spec.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )


@torch.inference_mode()
def generate_stream(
    model: Any, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, tokenizer: Any = None
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of each row (None for rows that have finished)."""
    _check_prompts(model, prompts, config.max_new_tokens)
    if config.stop_strings and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")
    stages = build_pipeline(config.samplers)
    device = model.device
    bsz = len(prompts)
    plen = max(len(p) for p in prompts)
    total = plen + config.max_new_tokens
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = _eos_ids(model, config, tokenizer)

    ids = torch.zeros(bsz, total, dtype=torch.long, device=device)
    mask = torch.zeros(bsz, total, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, plen - len(p) : plen] = torch.tensor(list(p), dtype=torch.long)
        mask[row, plen - len(p) :] = 1  # generated positions count as real tokens
    context = torch.where(mask[:, :plen].bool(), ids[:, :plen], torch.full_like(ids[:, :plen], -1))

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(bsz, total)
        out = model(
            ids[:, :plen],
            attention_mask=mask,
            cache=cache,
            cache_position=torch.arange(plen, device=device),
            logits_to_keep=1,
        )
        finished = [False] * bsz
        texts = [""] * bsz
        generated: list[list[int]] = [[] for _ in range(bsz)]
        for step in range(config.max_new_tokens):
            pos = plen + step
            tokens = choose_tokens(stages, out.logits[:, -1], context, generator)
            ids[:, pos] = tokens
            context = torch.cat([context, tokens[:, None]], dim=1)
            host = tokens.tolist()
            emitted: list[int | None] = []
            for row, tok in enumerate(host):
                if finished[row]:
                    emitted.append(None)
                    continue
                emitted.append(tok)
                generated[row].append(tok)
                if tok in eos:
                    finished[row] = True
                elif config.stop_strings:
                    texts[row] = tokenizer.decode(generated[row])
                    if any(s in texts[row] for s in config.stop_strings):
                        finished[row] = True
            yield emitted
            if all(finished) or step == config.max_new_tokens - 1:
                break
            out = model(
                tokens[:, None],
                attention_mask=mask,
                cache=cache,
                cache_position=torch.tensor([pos], device=device),
            )
    finally:
        model.train(was_training)


def generate(
    model: Any, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, tokenizer: Any = None
) -> list[list[int]]:
    """Generated ids per prompt (prompt excluded; EOS kept when it ended the row; stop strings trimmed)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, config, tokenizer=tokenizer):
        for row, tok in enumerate(step):
            if tok is not None:
                out[row].append(tok)
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
    outs = generate(model, encoded, config, tokenizer=tokenizer)
    texts = [tokenizer.decode(o) for o in outs]
    return texts[0] if single else texts
