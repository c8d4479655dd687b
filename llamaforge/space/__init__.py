"""Gradio Space bundles: a folder that runs a llamaforge model on a free CPU Space (or locally).

The seed chapter's Space failed because its model needed a GPU. A bundle here is CPU-only by construction: float32
weights, the CPU wheel index for torch, no CUDA-only packages (bitsandbytes, flash-attn, triton) and a generation
path that is the same `generate_text` the CLI uses. llamaforge is vendored into the folder by default (it is not
necessarily on PyPI), so the bundle depends only on public packages.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_APP = Path(__file__).with_name("app.py")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# installed by the Space's Gradio SDK image itself (sdk_version), or useless on CPU
_NOT_IN_REQUIREMENTS = ("gradio", "bitsandbytes", "triton", "flash-attn", "flash_attn", "nvidia-")
_FALLBACK_REQUIREMENTS = [
    "torch>=2.4",
    "transformers>=4.45",
    "tokenizers>=0.19",
    "pluggy>=1.3",
    "pydantic>=2.6",
    "safetensors>=0.4",
    "pyyaml>=6",
    "click>=8.1",
    "tqdm>=4.66",
    "numpy",
]


def core_requirements() -> list[str]:
    """llamaforge's own runtime dependencies (no extras), from its installed metadata."""
    try:
        reqs = importlib.metadata.requires("llamaforge") or []
    except importlib.metadata.PackageNotFoundError:
        return list(_FALLBACK_REQUIREMENTS)
    core = [r for r in reqs if "extra ==" not in r]
    return core or list(_FALLBACK_REQUIREMENTS)


def requirements_txt(*, llamaforge_requirement: str | None, model_repo: str | None) -> str:
    lines = [
        "# CPU-only torch wheels: a free CPU Space has no GPU, and the CUDA build is gigabytes larger.",
        f"--extra-index-url {CPU_TORCH_INDEX}",
    ]
    reqs = core_requirements()
    if llamaforge_requirement:
        reqs = [llamaforge_requirement, *[r for r in reqs if r.startswith("torch")]]
    if model_repo:
        reqs.append("huggingface_hub>=0.23")
    seen = set()
    for r in reqs:
        name = re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()
        if name in seen or name.startswith(_NOT_IN_REQUIREMENTS):
            continue
        seen.add(name)
        lines.append(r)
    return "\n".join(lines) + "\n"


def gradio_version() -> str | None:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return None


def space_readme(*, title: str, license: str, model_repo: str | None, description: str, spec: Any) -> str:
    front: dict[str, Any] = {
        "title": title[:30],
        "emoji": "🦙",
        "colorFrom": "indigo",
        "colorTo": "gray",
        "sdk": "gradio",
    }
    version = gradio_version()
    if version:
        front["sdk_version"] = version
    front |= {
        "app_file": "app.py",
        "pinned": False,
        "license": license,
        "suggested_hardware": "cpu-basic",
        "short_description": description[:60].rstrip(),
        "tags": ["llamaforge", "llama", "text-generation"],
    }
    if model_repo:
        front["models"] = [model_repo]
    where = f"the Hub model repo `{model_repo}`" if model_repo else "the `model/` folder"
    body = (
        f"# {title}\n\n{description}\n\n"
        f"Runs on CPU: the weights come from {where}, generation is llamaforge's `generate_text`.\n\n"
        "Locally:\n\n```bash\npip install -r requirements.txt gradio\npython app.py                  # the web UI\n"
        'python app.py --prompt "Once upon a time"   # one completion, no server\n```\n\n'
        f"Model: {spec.n_layers} layers, width {spec.dim}, vocabulary {spec.vocab_size}, "
        f"context {spec.max_positions}.\n"
    )
    return f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip()}\n---\n\n{body}"


def build_space(
    model: Any,
    out: str | Path,
    *,
    tokenizer: Any = None,
    model_repo: str | None = None,
    title: str | None = None,
    description: str = "Text generation with a small Llama-architecture model built with llamaforge.",
    license: str = "other",
    llamaforge_requirement: str | None = None,
    example_prompt: str = "Once upon a time",
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a ready-to-deploy Gradio Space folder into `out` and return it.

    The model goes into `out/model` (llamaforge format, float32, with its tokenizer) unless `model_repo` names a Hub
    repo that the app downloads at start-up. llamaforge is copied into `out/llamaforge` unless
    `llamaforge_requirement` (e.g. "llamaforge==0.1.0" or a git URL) says where pip gets it.
    """
    from llamaforge.core.io import atomic_write_json, atomic_write_text
    from llamaforge.errors import LlamaforgeError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None and model_repo is None:
        raise LlamaforgeError("a Space needs a tokenizer to turn prompts into tokens; pass --tokenizer PATH")
    shutil.copyfile(TEMPLATE_APP, out / "app.py")
    if model_repo is None:
        import copy

        import torch

        from llamaforge.core.loading import save_model

        target = out / "model"
        if target.exists():
            shutil.rmtree(target)
        if model.dtype != torch.float32:  # CPU matmuls in bf16 are slow or unsupported on older CPUs
            model = copy.deepcopy(model).float()
        save_model(model, target)
        tokenizer.save(target)
    if llamaforge_requirement is None:
        import llamaforge

        vendored = out / "llamaforge"
        if vendored.exists():
            shutil.rmtree(vendored)
        shutil.copytree(
            Path(llamaforge.__file__).parent, vendored, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    title = title or (model.spec.name or "llamaforge model")
    config = {
        "title": title,
        "description": description,
        "model_dir": "model",
        "model_repo": model_repo,
        "example_prompt": example_prompt,
        "defaults": {"max_new_tokens": 64, "temperature": 0.8, "top_k": 40, "top_p": 0.95, **(defaults or {})},
    }
    atomic_write_json(out / "space.json", config)
    atomic_write_text(
        out / "requirements.txt",
        requirements_txt(llamaforge_requirement=llamaforge_requirement, model_repo=model_repo),
    )
    atomic_write_text(
        out / "README.md",
        space_readme(title=title, license=license, model_repo=model_repo, description=description, spec=model.spec),
    )
    return out


def describe(out: str | Path) -> dict[str, Any]:
    from llamaforge.core.hub import folder_plan

    files = folder_plan(out)
    return {
        "out": str(out),
        "files": len(files),
        "bytes": sum(f["bytes"] for f in files),
        "top_level": sorted({f["path"].split("/")[0] for f in files}),
    }


__all__ = ["build_space", "describe", "requirements_txt", "space_readme"]
