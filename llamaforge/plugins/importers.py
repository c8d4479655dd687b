"""Importers: Hugging Face Llama directories (transformers 4.x or 5.x, sharded or not), llama2.c checkpoints (a
single .bin file) and Meta's original format (params.json + consolidated.NN.pth)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaforge.core.hf_config import spec_from_hf_config
from llamaforge.core.interfaces import Importer
from llamaforge.core.io import load_safetensors
from llamaforge.core.spec import ModelSpec
from llamaforge.errors import ModelFileError
from llamaforge.registry import hookimpl


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None


class HFImporter(Importer):
    """A directory with config.json and model.safetensors / model.safetensors.index.json / pytorch_model.bin."""

    def can_load(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").exists()

    def load_spec(self, path: Path) -> ModelSpec:
        return spec_from_hf_config(_read_json(path / "config.json"))

    def load_state_dict(self, path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.exists():
            state = load_safetensors(single)
        elif index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(f"{index} has no weight_map")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_safetensors(path / shard))
        elif (path / "pytorch_model.bin").exists():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ModelFileError(
                f"{path} has config.json but no weights (model.safetensors, model.safetensors.index.json or "
                f"pytorch_model.bin)"
            )
        # non-persistent buffers some writers include
        return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


class Llama2cImporter(Importer):
    """A llama2.c checkpoint file (legacy v0 or version 1 header, fp32), recognised by header and exact size; also a
    directory holding one as model.bin (what the `llama2c` exporter writes)."""

    @staticmethod
    def _file(path: Path) -> Path:
        path = Path(path)
        return path / "model.bin" if path.is_dir() else path

    def can_load(self, path: Path) -> bool:
        from llamaforge.core.llama2c import looks_like_checkpoint

        return looks_like_checkpoint(self._file(path))

    def load_spec(self, path: Path) -> ModelSpec:
        from llamaforge.core.llama2c import read_header, spec_from_config

        name = Path(path).name if Path(path).is_dir() else Path(path).stem
        return spec_from_config(read_header(self._file(path)), name=name)

    def load_state_dict(self, path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
        from llamaforge.core.llama2c import read_checkpoint
        from llamaforge.core.meta_format import meta_to_hf_state

        _, state = read_checkpoint(self._file(path))
        return meta_to_hf_state(state, spec)


class MetaImporter(Importer):
    """Meta's original Llama 3 layout: params.json plus one consolidated.NN.pth per model-parallel rank."""

    def __init__(self) -> None:
        self._cache: tuple[Path, ModelSpec, dict[str, torch.Tensor]] | None = None

    def can_load(self, path: Path) -> bool:
        from llamaforge.core.meta_format import is_meta_dir

        return is_meta_dir(path)

    def _load(self, path: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
        # tying is decided by comparing output and embedding weights, so the spec needs the tensors too
        from llamaforge.core.meta_format import load_meta

        path = Path(path).resolve()
        if self._cache is None or self._cache[0] != path:
            self._cache = (path, *load_meta(path))
        return self._cache[1], self._cache[2]

    def load_spec(self, path: Path) -> ModelSpec:
        return self._load(path)[0]

    def load_state_dict(self, path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
        state = self._load(path)[1]
        self._cache = None
        return state


@hookimpl
def llamaforge_register(register):
    register("importer", "hf", HFImporter)
    register("importer", "llama2c", Llama2cImporter)
    register("importer", "meta", MetaImporter)
