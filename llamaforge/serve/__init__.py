"""Serving: an OpenAI-compatible HTTP API with continuous batching, SSE streaming and a Gradio chat UI.

`create_app(model, tokenizer, ...)` builds the FastAPI app; `serve(path, ...)` loads a model and runs it under
uvicorn (what `llamaforge serve` does); `Engine` is the batching engine on its own, usable without HTTP.
FastAPI, uvicorn and Gradio are imported only when an app is built.
"""

from __future__ import annotations

from llamaforge.serve.app import APIError, create_app, serve
from llamaforge.serve.engine import Delta, Engine, RequestHandle, SamplingParams

__all__ = ["APIError", "Delta", "Engine", "RequestHandle", "SamplingParams", "create_app", "serve"]
