"""A Gradio chat page at /ui for people (the API is for programs).

It talks to the engine in-process, through the same prompt building and limits as /v1/chat/completions, so a
conversation in the browser is batched together with API traffic. With --api-key set, the page asks for the key
as its password.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator
from typing import Any

from llamaforge.serve.engine import SamplingParams
from llamaforge.serve.schemas import ChatCompletionRequest

UI_PATH = "/ui"


def _text(content: Any) -> str:
    """Gradio history content as plain text (a string, a list of parts, or a file component we cannot read)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(_text(part) for part in content)
    return str(content)


def build_ui(service: Any) -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local server
    import gradio as gr

    engine = service.engine

    async def respond(message: Any, history: list[Any], max_tokens: float, temperature: float) -> AsyncIterator[str]:
        messages = []
        for turn in history or []:
            role = turn.get("role") if isinstance(turn, dict) else None
            if role in ("user", "assistant", "system"):
                messages.append({"role": role, "content": _text(turn.get("content"))})
        messages.append({"role": "user", "content": _text(message)})
        try:
            ids = service.chat_ids(messages)
        except Exception as exc:
            yield f"[error: {getattr(exc, 'message', exc)}]"
            return
        budget = min(int(max_tokens), engine.context - len(ids))
        if budget < 1:
            yield "[the conversation no longer fits the context window; clear it and start again]"
            return
        req = ChatCompletionRequest(
            model=service.model_name, messages=[{"role": "user", "content": ""}], temperature=float(temperature)
        )
        handle = engine.submit(
            ids, SamplingParams(max_tokens=budget, samplers=req.samplers(), stop=list(service.chat_stops))
        )
        text, finish = "", None
        try:
            async for delta in handle:
                if delta.error:
                    yield text + f"\n[error: {delta.error}]"
                    return
                finish = delta.finish_reason or finish
                if delta.text:
                    text += delta.text
                    yield text
        finally:
            handle.cancel()
        if not text.strip():
            yield f"[the model finished ({finish}) without producing text]"

    with gr.Blocks(title=f"llamaforge · {service.model_name}", analytics_enabled=False) as blocks:
        gr.Markdown(f"### llamaforge chat · `{service.model_name}`")
        gr.ChatInterface(
            respond,
            additional_inputs=[
                gr.Slider(
                    1, max(1, engine.context - 1), value=min(128, engine.context - 1), step=1, label="Max tokens"
                ),
                gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)"),
            ],
            analytics_enabled=False,
            fill_height=True,
        )
    return blocks


def mount_ui(app: Any, service: Any) -> Any:
    blocks = build_ui(service)
    import gradio as gr

    auth = None
    if service.api_key:
        key = service.api_key.encode()

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest((password or "").encode(), key)

    return gr.mount_gradio_app(app, blocks, path=UI_PATH, auth=auth, ssr_mode=False)
