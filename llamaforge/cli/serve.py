"""`llamaforge serve`: an OpenAI-compatible endpoint (plus a chat page at /ui) for any model llamaforge loads."""

from __future__ import annotations

import ipaddress

import click


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="LLAMAFORGE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 routes (and KEY as the /ui password). Env: LLAMAFORGE_API_KEY.",
)
@click.option(
    "--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024), help="Requests decoded together."
)
@click.option(
    "--max-context",
    default=None,
    type=click.IntRange(2, None),
    help="Tokens per request (prompt + output); default min(model max_positions, 4096). Sizes the KV cache.",
)
@click.option("--adapter", default=None, type=click.Path(exists=True), help="LoRA adapter directory to apply.")
@click.option("--tokenizer", default=None, help="Tokenizer path when the model directory has none.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--name", "model_name", default=None, help="Model id clients use (default: the directory name).")
@click.option("--no-ui", is_flag=True, help="Do not mount the Gradio chat page at /ui.")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve_command(
    model, host, port, api_key, max_batch, max_context, adapter, tokenizer, device, dtype, model_name, no_ui, log_level
):
    """Serve MODEL behind an OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions
    (stream: true for server-sent events), /health, and a chat page at /ui."""
    from llamaforge.serve.app import serve

    if not _is_loopback(host):
        click.echo(
            f"warning: binding {host} exposes the server beyond this machine"
            + ("" if api_key else "; anyone who can reach it can use it (set --api-key)"),
            err=True,
        )
    if max_context is None:
        max_context = 4096
    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_context=max_context,
        adapter=adapter,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        model_name=model_name,
        ui=not no_ui,
        log_level=log_level,
    )


def register(cli: click.Group) -> None:
    cli.add_command(serve_command)
