"""Small helpers shared by CLI modules."""

from __future__ import annotations

import json
from typing import Any

import click


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print `data` as JSON when asked, else the human-readable text."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human if human is not None else str(data))


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def apply_adapter(model, adapter_dir):
    """Apply a LoRA adapter directory to a loaded model (used by --adapter on generate, eval, serve)."""
    from llamaforge.errors import LlamaforgeError

    try:
        from llamaforge.core.finetune import load_adapter
    except ImportError:
        raise LlamaforgeError(
            "--adapter needs the LoRA support (llamaforge.core.finetune), which is not installed"
        ) from None
    return load_adapter(model, adapter_dir)
