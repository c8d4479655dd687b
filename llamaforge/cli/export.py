"""`llamaforge export`, `llamaforge push` and `llamaforge space`.

MODEL is anything `llamaforge.load_model` reads: a run/model directory, a Hugging Face directory, Meta's
params.json + consolidated.NN.pth directory, or a llama2.c .bin file (its tokenizer.bin is picked up from beside it,
or given with --tokenizer). Formats are the names in the exporter registry, so a plugin's exporter (e.g. `peft`)
is available here as soon as it is registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llamaforge.cli._util import emit, json_option


def resolve_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> Any:
    from llamaforge.core.llama2c import find_tokenizer

    return find_tokenizer(model, tokenizer)


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs with YAML-typed values (2 -> int, true -> bool, 1e9 -> float)."""
    import yaml

    from llamaforge.errors import SpecError

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--option takes KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _files(out: Path) -> list[dict[str, Any]]:
    from llamaforge.core.hub import folder_plan

    if out.is_file():
        return [{"path": out.name, "bytes": out.stat().st_size}]
    return folder_plan(out)


def _human_files(files: list[dict[str, Any]]) -> str:
    width = max((len(f["path"]) for f in files), default=4)
    lines = [f"  {f['path']:<{width}}  {f['bytes']:>14,} bytes" for f in files]
    lines.append(f"  {'total':<{width}}  {sum(f['bytes'] for f in files):>14,} bytes")
    return "\n".join(lines)


tokenizer_option = click.option(
    "--tokenizer",
    default=None,
    help="Tokenizer directory or file (llama2.c tokenizer.bin, tokenizer.model, tokenizer.json) when MODEL has none.",
)


@click.command("export")
@click.argument("model")
@click.option("--format", "fmt", default="hf", show_default=True, help="An exporter name: hf, llama2c, meta, ...")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory (llama2c: or .bin).")
@tokenizer_option
@click.option("--dtype", default=None, help="Cast weights (float32, bfloat16, float16) where the format allows.")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Exporter option, repeatable: hf max_shard_bytes=N; llama2c version=0|1; meta shards=N.",
)
@json_option
def export_cmd(
    model: str, fmt: str, out: Path, tokenizer: str | None, dtype: str | None, options: tuple[str, ...], as_json: bool
) -> None:
    """Write MODEL in another format (Hugging Face, llama2.c, Meta, or any registered exporter)."""
    from llamaforge.core.loading import load_model
    from llamaforge.registry import registries

    exporter_cls = registries().exporter.get(fmt)  # unknown names fail listing the registered ones
    opts = parse_options(options)
    if dtype is not None:
        opts["dtype"] = dtype
    tok = resolve_tokenizer(model, tokenizer)
    loaded = load_model(model)
    written = Path(exporter_cls().export(loaded, out, tokenizer=tok, **opts))
    files = _files(written)
    data = {"format": fmt, "out": str(written), "tokenizer": tok is not None, "files": files}
    emit(data, as_json, f"exported {model} as {fmt} to {written}\n{_human_files(files)}")


@click.command("push")
@click.argument("model")
@click.option("--repo", "repo_id", required=True, help="Hub repo id, USER/NAME or ORG/NAME.")
@click.option("--format", "fmt", default="hf", show_default=True, help="An exporter name, or 'llamaforge'.")
@tokenizer_option
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="Stage and list what would be uploaded; contact nobody.")
@click.option("--license", "license_", default="other", show_default=True, help="License id for the model card.")
@click.option("--tag", "tags", multiple=True, help="Extra model-card tag, repeatable.")
@click.option("--base-model", default=None, help="Hub id of the model this one derives from (model card).")
@click.option("--message", default="Upload with llamaforge", show_default=True, help="Commit message.")
@click.option("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@click.option("--dtype", default=None, help="Cast weights where the format allows (e.g. bfloat16).")
@json_option
def push_cmd(
    model: str,
    repo_id: str,
    fmt: str,
    tokenizer: str | None,
    private: bool,
    dry_run: bool,
    license_: str,
    tags: tuple[str, ...],
    base_model: str | None,
    message: str,
    endpoint: str | None,
    token: str | None,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Export MODEL with a model card and upload it to a Hugging Face Hub repo (created if needed)."""
    import tempfile

    from llamaforge.core.hub import NATIVE_FORMAT, check_repo_id, push_folder, stage_model
    from llamaforge.core.loading import load_model
    from llamaforge.registry import registries

    check_repo_id(repo_id)
    if fmt != NATIVE_FORMAT:
        registries().exporter.get(fmt)
    tok = resolve_tokenizer(model, tokenizer)
    loaded = load_model(model)
    options = {"dtype": dtype} if dtype else {}
    with tempfile.TemporaryDirectory(prefix="llamaforge-push-") as tmp:
        staged = stage_model(
            loaded,
            tmp,
            fmt=fmt,
            tokenizer=tok,
            repo_id=repo_id,
            license=license_,
            tags=list(tags),
            base_model=base_model,
            options=options,
        )
        files = _files(staged)
        card = (staged / "README.md").read_text(encoding="utf-8")
        data: dict[str, Any] = {
            "repo_id": repo_id,
            "format": fmt,
            "private": private,
            "dry_run": dry_run,
            "files": files,
            "bytes": sum(f["bytes"] for f in files),
        }
        if dry_run:
            data["model_card"] = card
            human = (
                f"dry run: would create {'private ' if private else ''}model repo {repo_id} and upload:\n"
                f"{_human_files(files)}\n\nmodel card (README.md):\n{card}"
            )
            emit(data, as_json, human)
            return
        result = push_folder(staged, repo_id, private=private, token=token, endpoint=endpoint, commit_message=message)
    data.update(result)
    emit(data, as_json, f"pushed {len(files)} files to {result['url']}\ncommit: {result['commit_url']}")


@click.command("space")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the Space into.")
@tokenizer_option
@click.option("--model-repo", default=None, help="Reference this Hub model repo instead of bundling the weights.")
@click.option("--title", default=None, help="Space title (default: the model's name).")
@click.option("--license", "license_", default="other", show_default=True)
@click.option(
    "--llamaforge-requirement",
    default=None,
    help="pip requirement for llamaforge (e.g. 'llamaforge==0.1.0'); default: vendor the package into the Space.",
)
@click.option("--push", "push_repo", default=None, metavar="USER/NAME", help="Also upload the folder to this Space.")
@click.option("--private", is_flag=True, help="With --push: create the Space private.")
@click.option("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@json_option
def space_cmd(
    model: str,
    out: Path,
    tokenizer: str | None,
    model_repo: str | None,
    title: str | None,
    license_: str,
    llamaforge_requirement: str | None,
    push_repo: str | None,
    private: bool,
    endpoint: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Write a ready-to-deploy Gradio Space (app.py, requirements.txt, README.md, model) that runs on CPU."""
    from llamaforge.core.hub import check_repo_id, push_folder
    from llamaforge.core.loading import load_model
    from llamaforge.space import build_space, describe

    if push_repo:
        check_repo_id(push_repo)
    if model_repo:
        check_repo_id(model_repo)
    tok = resolve_tokenizer(model, tokenizer)
    loaded = load_model(model)
    build_space(
        loaded,
        out,
        tokenizer=tok,
        model_repo=model_repo,
        title=title,
        license=license_,
        llamaforge_requirement=llamaforge_requirement,
    )
    data = describe(out)
    human = (
        f"wrote a Gradio Space to {out} ({data['files']} files, {data['bytes']:,} bytes: "
        f"{', '.join(data['top_level'])})\nrun it locally: cd {out} && python app.py"
    )
    if push_repo:
        result = push_folder(
            out,
            push_repo,
            repo_type="space",
            private=private,
            token=token,
            endpoint=endpoint,
            space_sdk="gradio",
            commit_message="Deploy with llamaforge space",
        )
        data["push"] = result
        human += f"\npushed to {result['url']}"
    emit(data, as_json, human)


def register(cli: click.Group) -> None:
    cli.add_command(export_cmd)
    cli.add_command(push_cmd)
    cli.add_command(space_cmd)
