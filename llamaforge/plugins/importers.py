"""Importers: Hugging Face Llama directories (transformers 4.x or 5.x, sharded or not)."""

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


@hookimpl
def llamaforge_register(register):
    register("importer", "hf", HFImporter)
