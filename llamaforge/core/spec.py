"""The declarative model spec.

A spec is plain data (YAML, JSON, a preset name) that says which registered component fills each slot and with
which parameters; the builder supplies the structural arguments (width, layer index). Every behavioural difference
between models is an explicit field here, never a branch on a model's name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamaforge.errors import SpecError, UnknownComponentError

IMPORT_PREFIX = "py:"


class ComponentSpec(BaseModel):
    """A slot's content: a registered name plus parameters (`"rmsnorm"` is shorthand for `{name: rmsnorm}`).

    `name` may also be `py:package.module:attribute`, an explicit escape hatch for a factory that is not
    registered (quick experiments); registered names are the normal route.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


SLOTS: dict[str, str] = {
    "norm": "norm",
    "attention": "attention",
    "attention_kernel": "attention_kernel",
    "position_embedding": "position_embedding",
    "activation": "activation",
    "final_norm": "norm",
    "head": "head",
}
LAYER_SLOTS = ("norm", "attention", "attention_kernel", "activation")


def _parse_layers(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f"layer range {part!r} is empty; write it as low-high")
                out.extend(range(lo, hi + 1))
            elif part.isdigit():
                out.append(int(part))
            else:
                raise ValueError(f"cannot read layer selection {part!r}; use e.g. '0-3', '0,2,5' or [0, 1]")
        return out
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"layers must be an int, a list of ints or a string like '0-3', got {value!r}")


class LayerOverride(BaseModel):
    """Different components or FFN width for selected layers (ablations, hybrid stacks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[int]
    norm: ComponentSpec | None = None
    attention: ComponentSpec | None = None
    attention_kernel: ComponentSpec | None = None
    activation: ComponentSpec | None = None
    ffn_hidden: int | None = Field(default=None, gt=0)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> list[int]:
        return _parse_layers(value)


class ModelSpec(BaseModel):
    """A decoder-only language model, Llama 3 by default."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str | None = None
    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0, description="hidden width")
    n_layers: int = Field(ge=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="defaults to n_heads (multi-head attention)")
    head_dim: int | None = Field(default=None, gt=0, description="defaults to dim // n_heads")
    ffn_hidden: int | None = Field(default=None, gt=0, description="explicit FFN width; else Llama's rule")
    multiple_of: int = Field(default=256, gt=0)
    ffn_dim_multiplier: float | None = Field(default=None, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=500000.0, gt=0)
    rope_scaling: ComponentSpec | None = None
    max_positions: int = Field(default=8192, gt=0)
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=0.02, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bos_token_id: int | None = Field(default=None, ge=0)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = Field(default=None, ge=0)

    norm: ComponentSpec = ComponentSpec(name="rmsnorm")
    attention: ComponentSpec = ComponentSpec(name="rope_attention")
    attention_kernel: ComponentSpec = ComponentSpec(name="sdpa")
    position_embedding: ComponentSpec = ComponentSpec(name="rope")
    activation: ComponentSpec = ComponentSpec(name="swiglu")
    final_norm: ComponentSpec = ComponentSpec(name="rmsnorm")
    head: ComponentSpec = ComponentSpec(name="linear")
    layer_overrides: list[LayerOverride] = Field(default_factory=list)

    # ----- derived sizes --------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def layer(self, index: int) -> LayerSpec:
        """The components of layer `index` after applying overrides (later overrides win)."""
        values: dict[str, Any] = {s: getattr(self, s) for s in LAYER_SLOTS}
        values["ffn_hidden"] = self.ffn_hidden_size
        for ov in self.layer_overrides:
            if index in ov.layers:
                for key in (*LAYER_SLOTS, "ffn_hidden"):
                    v = getattr(ov, key)
                    if v is not None:
                        values[key] = v
        return LayerSpec(**values)

    # ----- validation -----------------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if self.head_dim is None and self.dim % self.n_heads != 0:
            divisors = [h for h in range(1, min(self.dim, 128) + 1) if self.dim % h == 0]
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide dim ({self.dim}) when head_dim is not set; "
                f"set head_dim explicitly or use n_heads in {divisors[-8:]}"
            )
        if self.n_heads % self.kv_heads != 0:
            divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise ValueError(
                f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads}); use one of {divisors}"
            )
        for i, ov in enumerate(self.layer_overrides):
            bad = [n for n in ov.layers if not 0 <= n < self.n_layers]
            if bad:
                raise ValueError(
                    f"layer_overrides[{i}].layers names layers {bad} but the model has n_layers={self.n_layers} "
                    f"(valid: 0-{self.n_layers - 1})"
                )
        if self.tie_embeddings and self.head.name != "linear":
            raise ValueError(
                f"tie_embeddings=true needs head 'linear' (a vocab x dim matrix to share), got {self.head.name!r}"
            )
        for key in ("bos_token_id", "pad_token_id"):
            v = getattr(self, key)
            if v is not None and v >= self.vocab_size:
                raise ValueError(f"{key} ({v}) must be < vocab_size ({self.vocab_size})")
        return self

    @model_validator(mode="after")
    def _check_components(self) -> ModelSpec:
        from llamaforge.registry.manager import lookup

        def check(kind: str, comp: ComponentSpec, where: str) -> None:
            if comp.name.startswith(IMPORT_PREFIX):
                return
            try:
                entry = lookup(kind, comp.name)
            except UnknownComponentError as exc:
                raise ValueError(f"{where}: {exc}") from None
            try:
                entry.validate_params(comp.params)
            except ValidationError as exc:
                raise ValueError(f"{where}.params for {kind} {comp.name!r}: {_short_errors(exc)}") from None
            except SpecError as exc:
                raise ValueError(f"{where}.params: {exc}") from None
            check_spec = entry.extra.get("check_spec")
            if check_spec is not None:
                check_spec(self, comp.params)  # raises ValueError naming the field and the fix

        for slot, kind in SLOTS.items():
            check(kind, getattr(self, slot), slot)
        if self.rope_scaling is not None:
            check("rope_scaling", self.rope_scaling, "rope_scaling")
        for i, ov in enumerate(self.layer_overrides):
            for slot in LAYER_SLOTS:
                comp = getattr(ov, slot)
                if comp is not None:
                    check(SLOTS[slot], comp, f"layer_overrides[{i}].{slot}")
        return self

    # ----- I/O ------------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: dict[str, Any], *, origin: str = "spec") -> ModelSpec:
        """Validate a plain dict, raising SpecError with every problem named by field."""
        if not isinstance(data, dict):
            raise SpecError(f"{origin}: a model spec must be a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(f"invalid {origin}: {_short_errors(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def save(self, path: str | Path) -> None:
        from llamaforge.core.io import atomic_write_text

        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text)

    def with_updates(self, **updates: Any) -> ModelSpec:
        """A re-validated copy with some fields changed (dotted keys reach into slots: 'norm.name')."""
        data = self.model_dump(exclude_unset=False)
        for key, value in updates.items():
            set_dotted(data, key, value)
        return ModelSpec.parse(data)


class LayerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    norm: ComponentSpec
    attention: ComponentSpec
    attention_kernel: ComponentSpec
    activation: ComponentSpec
    ffn_hidden: int


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` inside nested dicts, creating mappings (and turning string shorthands into dicts)."""
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if isinstance(nxt, str):
            nxt = {"name": nxt, "params": {}}
        elif isinstance(nxt, BaseModel):
            nxt = nxt.model_dump()
        elif not isinstance(nxt, dict):
            nxt = {}
        cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _short_errors(exc: ValidationError) -> str:
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {loc!r}; remove it or check its spelling"
            msgs.append(msg)
            continue
        msgs.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(msgs)


# ----- presets --------------------------------------------------------------------------------------------------
_LLAMA3_SCALING_31 = {
    "name": "llama3",
    "params": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_positions": 8192},
}
_LLAMA3_SCALING_32 = {
    "name": "llama3",
    "params": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_positions": 8192},
}
_LLAMA3_TOKENS = {"bos_token_id": 128000, "eos_token_id": 128001}

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
        max_positions=8192,
        dtype="bfloat16",
        **_LLAMA3_TOKENS,
    ),
    "llama3-70b": dict(
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=28672,
        rope_theta=500000.0,
        max_positions=8192,
        dtype="bfloat16",
        **_LLAMA3_TOKENS,
    ),
    "llama3.1-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING_31,
        max_positions=131072,
        dtype="bfloat16",
        **_LLAMA3_TOKENS,
    ),
    "llama3.2-1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_hidden=8192,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING_32,
        max_positions=131072,
        tie_embeddings=True,
        dtype="bfloat16",
        **_LLAMA3_TOKENS,
    ),
    "llama3.2-3b": dict(
        vocab_size=128256,
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        ffn_hidden=8192,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING_32,
        max_positions=131072,
        tie_embeddings=True,
        dtype="bfloat16",
        **_LLAMA3_TOKENS,
    ),
    "tiny": dict(
        vocab_size=4096,
        dim=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        multiple_of=32,
        rope_theta=10000.0,
        max_positions=256,
        tie_embeddings=True,
    ),
    # The seed chapter's feed-forward baseline: embedding -> Linear(288, 288) -> ReLU -> Linear(288, vocab).
    "seed-feedforward": dict(
        vocab_size=32001,
        dim=288,
        n_layers=0,
        n_heads=6,
        max_positions=128,
        rope_theta=10000.0,
        final_norm="identity",
        head={"name": "mlp", "params": {"hidden": 288, "activation": "relu", "bias": True}},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
    ),
    "seed-llama": dict(
        vocab_size=32001,
        dim=768,
        n_layers=8,
        n_heads=6,
        ffn_hidden=768,
        max_positions=128,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_spec(source: str | Path | dict[str, Any] | ModelSpec) -> ModelSpec:
    """A spec from a preset name, a YAML/JSON file, a dict, or a spec (returned as is)."""
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, dict):
        return ModelSpec.parse(source)
    text_source = str(source)
    if text_source in PRESETS:
        return ModelSpec.parse({"name": text_source, **PRESETS[text_source]}, origin=f"preset {text_source!r}")
    path = Path(text_source)
    if path.is_dir() and (path / "spec.yaml").exists():
        path = path / "spec.yaml"
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(text_source, preset_names(), n=1)
        hint = f" Did you mean preset {close[0]!r}?" if close else ""
        raise SpecError(
            f"{text_source!r} is neither a preset nor an existing file.{hint} Presets: {', '.join(preset_names())}."
        )
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot parse spec file {path}: {exc}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict | str) and "dim" not in data:
        data = data["model"]
        if isinstance(data, str):
            return load_spec(data)
    if isinstance(data, dict) and "preset" in data:
        base = data.pop("preset")
        if base not in PRESETS:
            raise SpecError(f"{path}: unknown preset {base!r}; presets: {', '.join(preset_names())}")
        merged = {"name": base, **PRESETS[base]}
        merged.update(data)
        data = merged
    return ModelSpec.parse(data, origin=f"spec file {path}")
