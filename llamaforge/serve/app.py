"""The OpenAI-compatible HTTP API over the batching engine.

Handlers only parse, validate and translate: every request goes to the engine thread, which batches it with the
others; a handler waits on its own queue, so the event loop is never blocked by the model. Every failure a client
can cause is answered in OpenAI's error shape (400 bad input, 401 key, 404 model or route), never by a crash.
"""

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from llamaforge.core.generation import GenerationError
from llamaforge.serve.engine import Delta, Engine, RequestHandle, SamplingParams
from llamaforge.serve.schemas import ChatCompletionRequest, CompletionRequest, error_body

# Used when the tokenizer carries no chat template: Llama 3's header/eot layout. Tokenizers that know the special
# tokens encode them as single ids; others see plain text, and "<|eot_id|>" then also works as a stop string.
LLAMA3_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class Service:
    """Everything the API and the UI share: the engine, the tokenizer, prompt building and parameter checks."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_stops = [] if self.has_template or tokenizer.token_to_id("<|eot_id|>") is not None else ["<|eot_id|>"]

    # ----- prompts --------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.tokenizer.bos_id is not None)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        template = None if self.has_template else LLAMA3_CHAT_TEMPLATE
        try:
            text = self.tokenizer.hf.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # template errors (e.g. a role the template refuses) are the client's to fix
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return list(self.tokenizer.hf.encode(text, add_special_tokens=False))

    # ----- checks ---------------------------------------------------------------------------------------------
    def check_key(self, request: Any) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(
                401,
                "You didn't provide an API key. Send it in the header 'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}' (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, extra_stops=()) -> SamplingParams:
        unsupported = req.unsupported()
        if unsupported:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported_parameter")
        return SamplingParams(
            max_tokens=max_tokens,
            samplers=req.samplers(),
            stop=[*req.stop_list(), *extra_stops],
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )

    def fit(self, prompt: list[int], max_tokens: int | None, param: str, prompt_param: str = "prompt") -> int:
        """The token budget of one request; a prompt or budget that does not fit the context window is a 400."""
        room = self.engine.context - len(prompt)
        if max_tokens is None:
            max_tokens = room
        try:
            self.engine.check(len(prompt), max(max_tokens, 1))
        except GenerationError as exc:
            which = prompt_param if room < 1 else param
            raise APIError(400, str(exc), param=which, code="context_length_exceeded") from None
        return max_tokens

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return self.engine.submit(prompt, params)
        except GenerationError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None


async def _parse(request: Any, model: type[Any]) -> Any:
    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            raise APIError(
                400, f"Unrecognized request argument supplied: {'.'.join(loc)}", param=param, code="unknown_parameter"
            ) from None
        if err["type"] == "missing":
            raise APIError(
                400, f"Missing required parameter: '{'.'.join(loc)}'.", param=param, code="missing_required_parameter"
            ) from None
        raise APIError(
            400, f"Invalid value for '{'.'.join(loc)}': {err['msg']}", param=param, code="invalid_value"
        ) from None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several requests as they come, tagged with the request's index."""
    if len(handles) == 1:
        async for d in handles[0]:
            yield 0, d
        return
    q: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for d in h:
                await q.put((i, d))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, d = await q.get()
            if d is None:
                remaining -= 1
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()


async def _watch_disconnect(request: Any, handles: list[RequestHandle]) -> None:
    """Cancel the requests when the client goes away before a non-streamed answer is ready."""
    while True:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            for h in handles:
                h.cancel()
            return


async def _gather(request: Any, handles: list[RequestHandle]) -> list[Delta]:
    results = [Delta(prompt_tokens=h.prompt_tokens) for h in handles]
    watcher = asyncio.ensure_future(_watch_disconnect(request, handles))
    try:
        async for i, d in _merge(handles):
            r = results[i]
            r.text += d.text
            r.finish_reason = d.finish_reason or r.finish_reason
            r.completion_tokens = max(r.completion_tokens, d.completion_tokens)
            r.error = d.error or r.error
    finally:
        watcher.cancel()
        for h in handles:
            h.cancel()
    return results


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str = "llamaforge",
    api_key: str | None = None,
    max_batch: int = 8,
    max_context: int | None = None,
    ui: bool = True,
    engine: Engine | None = None,
) -> Any:
    """The FastAPI app: OpenAI-style /v1 routes, /health and (with `ui`) a Gradio chat at /ui.

    The engine thread starts here and stops with the app's lifespan; `app.state.engine` exposes its stats."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    if tokenizer is None:
        raise GenerationError("serving needs a tokenizer; pass one (the CLI's --tokenizer)")
    engine = engine or Engine(model, tokenizer, max_batch=max_batch, max_context=max_context)
    engine.start()
    service = Service(engine, tokenizer, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="llamaforge", version="1", lifespan=lifespan)
    app.state.engine = engine
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return JSONResponse(error_body(f"Invalid request: {loc}: {err.get('msg')}", code="invalid_value"), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            error_body(f"{exc.detail}: {request.method} {request.url.path}", code=codes.get(exc.status_code)),
            exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": service.created,
            "owned_by": "llamaforge",
            "max_model_len": engine.context,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse(
            {"status": "ok" if ok else "engine stopped", "model": model_name, "engine": engine.stats()},
            200 if ok else 503,
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        service.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        service.check_key(request)
        service.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        service.check_key(request)
        req: CompletionRequest = await _parse(request, CompletionRequest)
        service.check_model(req.model)
        prompts, texts = [], []
        for p in req.prompts():
            ids = service.encode(p) if isinstance(p, str) else list(p)
            prompts.append(ids)
            texts.append(p if isinstance(p, str) else tokenizer.decode(ids))
        budgets = [service.fit(ids, req.max_tokens, "max_tokens") for ids in prompts]
        params = [service.params(req, b) for b in budgets]
        handles = [service.submit(ids, p) for ids, p in zip(prompts, params)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if req.stream:

            async def events() -> AsyncIterator[str]:
                usage = [0] * len(handles)
                try:
                    if req.echo:
                        for i, t in enumerate(texts):
                            yield _sse(chunk(i, t, None))
                    async for i, d in _merge(handles):
                        if d.error:
                            yield _sse(error_body(d.error, "server_error"))
                            continue
                        usage[i] = d.completion_tokens
                        if d.text or d.finish_reason:
                            yield _sse(chunk(i, d.text, d.finish_reason))
                    if req.stream_options and req.stream_options.include_usage:
                        prompt_total = sum(h.prompt_tokens for h in handles)
                        body = {**chunk(0, "", None), "choices": [], "usage": _usage(prompt_total, sum(usage))}
                        yield _sse(body)
                    yield "data: [DONE]\n\n"
                finally:
                    for h in handles:
                        h.cancel()

            return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

        results = await _gather(request, handles)
        _raise_failed(results)
        choices = [
            {
                "index": i,
                "text": (texts[i] if req.echo else "") + r.text,
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        service.check_key(request)
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        service.check_model(req.model)
        ids = service.chat_ids([{"role": m.role, "content": m.text()} for m in req.messages])
        limit = req.token_limit()
        budget = service.fit(
            ids, limit, "max_completion_tokens" if req.max_completion_tokens else "max_tokens", "messages"
        )
        handle = service.submit(ids, service.params(req, budget, service.chat_stops))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if req.stream:

            async def events() -> AsyncIterator[str]:
                completion = 0
                try:
                    yield _sse(chunk({"role": "assistant", "content": ""}, None))
                    async for d in handle:
                        if d.error:
                            yield _sse(error_body(d.error, "server_error"))
                            continue
                        completion = d.completion_tokens
                        if d.text:
                            yield _sse(chunk({"content": d.text}, None))
                        if d.finish_reason:
                            yield _sse(chunk({}, d.finish_reason))
                    if req.stream_options and req.stream_options.include_usage:
                        yield _sse(
                            {**chunk({}, None), "choices": [], "usage": _usage(handle.prompt_tokens, completion)}
                        )
                    yield "data: [DONE]\n\n"
                finally:
                    handle.cancel()

            return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

        (result,) = await _gather(request, [handle])
        _raise_failed([result])
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }

    if ui:
        from llamaforge.serve.ui import mount_ui

        app = mount_ui(app, service)
    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _raise_failed(results: list[Delta]) -> None:
    for r in results:
        if r.error:
            raise APIError(500, r.error, type_="server_error", code="generation_failed")


def load_for_serving(
    model_path: str,
    *,
    adapter: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) as `llamaforge serve` loads them: anything `load_model` reads (quantized directories
    included, their transforms rebuilt), plus an optional LoRA adapter directory applied on top."""
    from llamaforge.core.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(
        model_path, tokenizer=tokenizer, device=device, dtype=dtype, require_tokenizer=True
    )
    if adapter:
        from llamaforge.cli._util import apply_adapter

        model = apply_adapter(model, adapter) or model
    return model.eval(), tok


def serve(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_context: int | None = None,
    adapter: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_name: str | None = None,
    ui: bool = True,
    log_level: str = "info",
) -> None:
    """Load a model (see `load_for_serving`) and serve it under uvicorn until interrupted."""
    from pathlib import Path

    import uvicorn

    model, tok = load_for_serving(model_path, adapter=adapter, tokenizer=tokenizer, device=device, dtype=dtype)
    name = model_name or Path(model_path).resolve().name
    app = create_app(model, tok, model_name=name, api_key=api_key, max_batch=max_batch, max_context=max_context, ui=ui)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
