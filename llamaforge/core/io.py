"""Atomic file writes and safetensors helpers.

Everything llamaforge writes goes to a temporary file in the destination directory and is renamed into place, so
an interrupted run never leaves a half-written checkpoint where a good one used to be.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, writer: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda p: p.write_bytes(data))


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later aliases of shared storage (tied weights), keeping the first name; make tensors contiguous."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous()
    return out


def save_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = unique_tensors(state)
    _atomic(Path(path), lambda p: save_file(tensors, str(p), metadata=metadata or {}))


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from llamaforge.errors import ModelFileError

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise ModelFileError(f"weights file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"cannot read safetensors file {path}: {exc}") from None
