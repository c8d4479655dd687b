"""A Gradio Space for one llamaforge model, CPU only.

Written into a Space folder by `llamaforge space`; runs the same locally (`python app.py`, or
`python app.py --prompt "Once upon a time"` to print one completion without starting a server). The model is the
`model/` folder beside this file or, when the bundle references a Hub repo instead, that repo's snapshot.
llamaforge itself is either vendored beside this file or installed from requirements.txt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if (HERE / "llamaforge" / "__init__.py").exists():
    sys.path.insert(0, str(HERE))  # the vendored copy wins over any installed llamaforge

CONFIG: dict[str, Any] = {}
if (HERE / "space.json").exists():
    CONFIG = json.loads((HERE / "space.json").read_text(encoding="utf-8"))

_STATE: dict[str, Any] = {}


def model_dir() -> Path:
    """The local model folder, or a snapshot of the referenced Hub model repo (downloaded once, then cached)."""
    local = HERE / CONFIG.get("model_dir", "model")
    if local.is_dir():
        return local
    repo = os.environ.get("LLAMAFORGE_MODEL_REPO") or CONFIG.get("model_repo")
    if not repo:
        raise RuntimeError(f"no model: {local} is missing and space.json names no model_repo")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo))


def load() -> tuple[Any, Any]:
    """Model and tokenizer, loaded on first use in float32 on CPU (the free Space hardware has no GPU)."""
    if "model" not in _STATE:
        import torch

        import llamaforge
        from llamaforge.core.tokenizer import load_tokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        path = model_dir()
        _STATE["model"] = llamaforge.load_model(path, device="cpu", dtype="float32").eval()
        _STATE["tokenizer"] = load_tokenizer(path)
    return _STATE["model"], _STATE["tokenizer"]


def generate(
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    seed: int | None = None,
) -> str:
    """The model's continuation of `prompt` (temperature 0 means greedy)."""
    from llamaforge.core.generation import GenerationConfig, generate_text

    model, tokenizer = load()
    n_prompt = len(tokenizer.encode(prompt, bos=tokenizer.bos_id is not None))
    room = model.spec.max_positions - n_prompt
    if room <= 0:
        return f"[the prompt is {n_prompt} tokens; this model's context is {model.spec.max_positions}]"
    sampling = {} if temperature <= 0 else {"temperature": float(temperature), "top_k": int(top_k) or None}
    if sampling and 0 < top_p < 1:
        sampling["top_p"] = float(top_p)
    config = GenerationConfig.from_options(
        max_new_tokens=min(int(max_new_tokens), room), seed=None if seed is None else int(seed), **sampling
    )
    return generate_text(model, tokenizer, prompt, config)


def build_demo() -> Any:
    import gradio as gr

    title = CONFIG.get("title", "llamaforge model")
    defaults = CONFIG.get("defaults", {})
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{CONFIG.get('description', '')}")
        prompt = gr.Textbox(label="Prompt", value=CONFIG.get("example_prompt", "Once upon a time"), lines=3)
        with gr.Row():
            max_new = gr.Slider(1, 512, value=defaults.get("max_new_tokens", 64), step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=defaults.get("temperature", 0.8), step=0.05, label="Temperature")
            top_k = gr.Slider(0, 200, value=defaults.get("top_k", 40), step=1, label="Top-k (0: off)")
            top_p = gr.Slider(0.05, 1.0, value=defaults.get("top_p", 0.95), step=0.05, label="Top-p")
        button = gr.Button("Generate", variant="primary")
        output = gr.Textbox(label="Completion", lines=8)
        button.click(generate, inputs=[prompt, max_new, temperature, top_k, top_p], outputs=output)
    return demo


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", help="print one completion and exit instead of serving the UI")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.prompt is not None:
        print(generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
        return
    on_space = bool(os.environ.get("SPACE_ID"))
    build_demo().launch(server_name="0.0.0.0" if on_space else None)


if __name__ == "__main__":
    main()
