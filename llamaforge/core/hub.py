"""Publishing to the Hugging Face Hub: stage a model folder with a model card, then create the repo and upload.

Staging is separate from uploading so that `--dry-run` shows exactly the files (and card) a push would send, and so
that a Space bundle can reuse the same upload path. Everything goes through `huggingface_hub.HfApi`, which honours
HF_ENDPOINT / `endpoint=` (a private Hub, or a stand-in server in tests) and HF_TOKEN / `token=`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from llamaforge.errors import LlamaforgeError


class HubError(LlamaforgeError, RuntimeError):
    """The Hub refused or could not be reached; the message names the step and the fix."""


NATIVE_FORMAT = "llamaforge"


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise HubError(f"--repo must look like USER/NAME (or ORG/NAME), got {repo_id!r}")
    return repo_id


def _card_metadata(spec: Any, fmt: str, license: str, tags: list[str], base_model: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "transformers" if fmt == "hf" else NATIVE_FORMAT,
        "license": license,
        "pipeline_tag": "text-generation",
        "tags": sorted({NATIVE_FORMAT, "llama", "text-generation", *tags}),
    }
    if base_model:
        meta["base_model"] = base_model
    return meta


def model_card(
    model: Any,
    *,
    repo_id: str,
    fmt: str,
    license: str = "other",
    tags: list[str] | None = None,
    base_model: str | None = None,
    extra_text: str = "",
) -> str:
    """README.md for a model repo: YAML metadata the Hub indexes, then what the model is and how to load it."""
    spec = model.spec
    meta = _card_metadata(spec, fmt, license, list(tags or []), base_model)
    params = model.num_parameters()
    name = repo_id.split("/")[-1]
    if fmt == "hf":
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n'
        )
    else:
        usage = (
            "```python\nfrom huggingface_hub import snapshot_download\nimport llamaforge\n\n"
            f'model = llamaforge.load_model(snapshot_download("{repo_id}"))\n```\n'
        )
    spec_yaml = yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip()
    rope = "none" if spec.rope_scaling is None else str(spec.rope_scaling)
    rows = [
        ("parameters", f"{params:,}"),
        ("layers", spec.n_layers),
        ("width (dim)", spec.dim),
        ("attention heads / kv heads", f"{spec.n_heads} / {spec.kv_heads}"),
        ("feed-forward width", spec.ffn_hidden_size),
        ("vocabulary", spec.vocab_size),
        ("context (max positions)", spec.max_positions),
        ("RoPE theta / scaling", f"{spec.rope_theta:g} / {rope}"),
        ("tied embeddings", spec.tie_embeddings),
        ("weights dtype", str(model.dtype).removeprefix("torch.")),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = (
        f"# {name}\n\n"
        f"A Llama-architecture language model built and exported with llamaforge (format: `{fmt}`).\n\n"
        f"{table}\n\n## Usage\n\n{usage}\n"
        f"## llamaforge spec\n\nThe declarative spec this model was built from:\n\n```yaml\n{spec_yaml}\n```\n"
    )
    if extra_text:
        body += f"\n{extra_text.strip()}\n"
    front = yaml.safe_dump(meta, sort_keys=False).rstrip()
    return f"---\n{front}\n---\n\n{body}"


def stage_model(
    model: Any,
    out: str | Path,
    *,
    fmt: str = "hf",
    tokenizer: Any = None,
    repo_id: str = "user/model",
    license: str = "other",
    tags: list[str] | None = None,
    base_model: str | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Write the folder a push would upload: the exported model (registered exporter `fmt`, or `llamaforge` for
    llamaforge's own spec.yaml + safetensors), its tokenizer, and README.md."""
    from llamaforge.core.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == NATIVE_FORMAT:
        from llamaforge.core.loading import save_model

        save_model(model, out)
        if tokenizer is not None:
            tokenizer.save(out)
    else:
        from llamaforge.registry import registries

        exporter = registries().exporter.get(fmt)()
        exporter.export(model, out, tokenizer=tokenizer, **(options or {}))
    atomic_write_text(
        out / "README.md",
        model_card(model, repo_id=repo_id, fmt=fmt, license=license, tags=tags, base_model=base_model),
    )
    return out


def folder_plan(folder: str | Path) -> list[dict[str, Any]]:
    """What an upload of `folder` sends: relative path and size of every file, sorted."""
    folder = Path(folder)
    return [
        {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(folder).parts and "__pycache__" not in p.parts
    ]


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload with llamaforge",
    space_sdk: str | None = None,
) -> dict[str, Any]:
    """Create the repo (fine if it exists) and upload `folder` in one commit; returns the repo and commit URLs."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise HubError("pushing needs huggingface_hub; install it with `pip install 'llamaforge[hub]'`") from None
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repo"
    try:
        kwargs: dict[str, Any] = {"repo_type": repo_type, "private": private, "exist_ok": True}
        if repo_type == "space":
            kwargs["space_sdk"] = space_sdk or "gradio"
        url = api.create_repo(repo_id, **kwargs)
        step = "upload the files"
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            commit_message=commit_message,
            ignore_patterns=["__pycache__/*", "**/__pycache__/*", "*.pyc"],
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = {
            401: "log in with `hf auth login` or set HF_TOKEN",
            403: "the token lacks write access to this namespace",
        }.get(status or 0, "check the repo id, your token and the endpoint")
        raise HubError(f"could not {step} for {repo_id} on {api.endpoint}: {exc} ({hint})") from None
    except OSError as exc:  # connection refused, DNS failures
        raise HubError(f"could not reach {api.endpoint} to {step}: {exc}") from None
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "private": private,
        "url": str(url),
        "commit_url": getattr(commit, "commit_url", str(commit)),
        "endpoint": api.endpoint,
    }


def copy_tree(src: Path, dst: Path, ignore: tuple[str, ...] = ("__pycache__", "*.pyc")) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore), dirs_exist_ok=True)
