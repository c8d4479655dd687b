"""The batching engine: one background thread owns the model and decodes every active request together.

Continuous batching over one preallocated KV cache of `max_batch` rows. A request waits in a queue until a row is
free, is prefilled (all newcomers of a step in one right-padded forward), then joins the decode step, which feeds
one token per active row with that row's own position and key mask. A row's cache column equals its token's
position, so rows of any length share the cache; the attended window is cut to the longest live row. Finished or
cancelled rows are freed at once and the last live row is moved into the hole, so live rows are always the prefix
[0, n) of the cache and every step works on views, never on gathered copies.

Results leave the engine thread as `Delta`s pushed into a per-request queue (an asyncio queue when the request was
submitted from an event loop), so the HTTP layer never blocks the loop and never touches the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaforge.core.generation import GenerationError, build_pipeline, choose_tokens
from llamaforge.core.interfaces import KVCache
from llamaforge.core.spec import ComponentSpec

log = logging.getLogger("llamaforge.serve")


@dataclass
class SamplingParams:
    """Per-request decoding settings; `samplers` is a pipeline of registered sampler specs (default greedy)."""

    max_tokens: int = 16
    samplers: list[Any] = field(default_factory=lambda: [ComponentSpec(name="greedy")])
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Delta:
    """A piece of a request's output: new text, and on the last one why it finished (or the error)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class EngineError(RuntimeError):
    """The engine failed a request (a model error, or the engine was shut down)."""


_END = object()


class RequestHandle:
    """What `Engine.submit` returns: iterate it (sync or async) for Deltas; `cancel()` frees its row."""

    def __init__(self, request_id: int, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self.finished = False
        self._loop = loop
        self._aq: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._q: queue.Queue[Any] | None = None if loop is not None else queue.Queue()

    def cancel(self) -> None:
        """Ask the engine to drop this request; its row is freed before the next decode step."""
        if not self.finished:
            self.cancelled = True

    def _push(self, item: Any) -> None:
        if self._q is not None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, item)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening any more
            self.cancelled = True

    def __iter__(self) -> Iterator[Delta]:
        if self._q is None:
            raise TypeError("this request was submitted from an event loop; iterate it with `async for`")
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._aq is None:
            raise TypeError("this request was submitted outside an event loop; iterate it with `for`")
        while True:
            item = await self._aq.get()
            if item is _END:
                return
            yield item


def collect(deltas: Sequence[Delta]) -> Delta:
    """Fold a request's Deltas into one (the whole text, the last finish reason and counts)."""
    out = Delta()
    for d in deltas:
        out.text += d.text
        out.token_ids.extend(d.token_ids)
        out.finish_reason = d.finish_reason or out.finish_reason
        out.prompt_tokens = d.prompt_tokens or out.prompt_tokens
        out.completion_tokens = max(out.completion_tokens, d.completion_tokens)
        out.error = d.error or out.error
    return out


class SlotCache(KVCache):
    """Static K/V buffers (B, Hkv, S, D) addressed per row: each forward works on rows [start, start+n) and writes
    every row's new keys at that row's own columns (`cols`, (n, T)); attention sees the first `max_length` columns.

    `max_length` is what the model reads as the key length, so the engine narrows it to the longest live row."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.capacity = keys[0].size(2) if keys else 0
        self.max_length = self.capacity
        self.start, self.n = 0, keys[0].size(0) if keys else 0
        self.cols: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def window(self, start: int, n: int, width: int, cols: torch.Tensor) -> None:
        self.start, self.n, self.max_length, self.cols = start, n, width, cols
        self._rows = torch.arange(start, start + n, device=cols.device)[:, None]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.keys[layer_idx], self.values[layer_idx]
        # advanced indices on dims 0 and 2 put (n, T) first: the value is (n, T, Hkv, D)
        kc[self._rows, :, self.cols] = k.transpose(1, 2).to(kc.dtype)
        vc[self._rows, :, self.cols] = v.transpose(1, 2).to(vc.dtype)
        rows = slice(self.start, self.start + self.n)
        return kc[rows, :, : self.max_length], vc[rows, :, : self.max_length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        for t in (*self.keys, *self.values):
            t[dst, :, :length].copy_(t[src, :, :length])


class _Detokenizer:
    """Incremental text: decode a short window of recent ids and emit only what became complete (no broken UTF-8
    from byte-level tokens), holding back a possible start of a stop string until it is decided."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string was hit)."""
        self.ids.append(token)
        if self.tok is not None:
            before = self.tok.decode(self.ids[self.prefix : self.read])
            after = self.tok.decode(self.ids[self.prefix :])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before) :]
                self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold if self.stop else len(self.text)), False

    def flush(self) -> str:
        if self.tok is not None and self.read < len(self.ids):
            before = self.tok.decode(self.ids[self.prefix : self.read])
            after = self.tok.decode(self.ids[self.prefix :])
            self.text += after[len(before) :]
            self.read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


class _Pending:
    __slots__ = ("handle", "params", "prompt", "submitted")

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams) -> None:
        self.handle, self.prompt, self.params = handle, prompt, params
        self.submitted = time.perf_counter()


class _Row:
    """A live request in a cache row."""

    __slots__ = ("context", "detok", "eos", "generated", "generator", "handle", "length", "next", "params", "pipeline")

    def __init__(self, pending: _Pending, tokenizer: Any, eos: set[int], device: torch.device) -> None:
        self.handle = pending.handle
        self.params = pending.params
        self.context = list(pending.prompt)
        self.length = 0  # tokens in the cache (= the position of the next input token)
        self.next = -1  # the sampled token, fed at the next decode step
        self.generated = 0
        self.eos = set() if pending.params.ignore_eos else eos | pending.params.stop_token_ids
        self.detok = _Detokenizer(tokenizer, pending.params.stop)
        stages = build_pipeline(pending.params.samplers)
        # None marks plain greedy decoding, which the engine does for all such rows with one argmax
        self.pipeline = None if len(stages) == 1 and getattr(stages[0], "chooses", False) else stages
        self.generator = None
        if pending.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(pending.params.seed)


class Engine:
    """Owns the model on a background thread and serves generation requests in continuous batches.

    `submit(prompt_ids, params)` is thread-safe and returns at once; `stats()` reports what the batching did.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.context = min(max_context or model.spec.max_positions, model.spec.max_positions)
        self.eos = set(eos_token_ids) if eos_token_ids is not None else _default_eos(model, tokenizer)
        self.device = model.device
        base = model.new_cache(max_batch, self.context)
        self.cache = SlotCache(base.keys, base.values)
        self._pending: deque[_Pending] = deque()
        self._rows: list[_Row] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats = {
            "requests": 0,
            "finished": 0,
            "cancelled": 0,
            "errors": 0,
            "steps": 0,
            "decoded_tokens": 0,
            "prefill_tokens": 0,
            "max_rows_in_step": 0,
        }
        self._rows_hist: dict[int, int] = {}

    # ----- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="llamaforge-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----- requests -------------------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise GenerationError when a request cannot fit in a cache row."""
        if prompt_len < 1:
            raise GenerationError("the prompt is empty; give at least one token")
        if prompt_len + max_tokens > self.context:
            raise GenerationError(
                f"this model's context window is {self.context} tokens, but the request needs {prompt_len + max_tokens}"
                f" ({prompt_len} in the prompt + {max_tokens} to generate); shorten the prompt or lower max_tokens"
            )

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        prompt = [int(t) for t in prompt_ids]
        self.check(len(prompt), params.max_tokens)
        vocab = self.model.spec.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        build_pipeline(params.samplers)  # reject bad sampler settings in the caller's thread
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(next(self._ids), len(prompt), loop)
        with self._cv:
            if self._stop:
                raise EngineError("the engine is shut down")
            self._pending.append(_Pending(handle, prompt, params))
            self._stats["requests"] += 1
            self._cv.notify_all()
        return handle

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Delta:
        """Blocking convenience: the whole result of one request."""
        return collect(list(self.submit(prompt_ids, params)))

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out: dict[str, Any] = dict(self._stats)
            out.update(
                active=len(self._rows),
                waiting=len(self._pending),
                max_batch=self.max_batch,
                context=self.context,
                rows_per_step={str(k): v for k, v in sorted(self._rows_hist.items())},
                alive=self.alive,
            )
        return out

    # ----- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._pending and not self._rows:
                        self._cv.wait()
                    if self._stop:
                        break
                    admitted = self._admit()
                try:
                    self._drop_cancelled()
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                except Exception as exc:  # a model failure must not take the server down
                    log.exception("engine step failed")
                    self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down", pending=True)

    def _admit(self) -> list[_Pending]:
        admitted = []
        while self._pending and len(self._rows) + len(admitted) < self.max_batch:
            p = self._pending.popleft()
            if p.handle.cancelled:
                self._stats["cancelled"] += 1
                p.handle.finished = True
                p.handle._push(_END)
                continue
            admitted.append(p)
        return admitted

    def _prefill(self, admitted: list[_Pending]) -> None:
        rows = []
        for p in admitted:
            try:
                rows.append(_Row(p, self.tokenizer, self.eos, self.device))
            except Exception as exc:
                self._finish_handle(p.handle, Delta(error=str(exc), finish_reason="error"))
        if not rows:
            return
        start, k = len(self._rows), len(rows)
        self._rows.extend(rows)  # before the forward, so a failing model fails these requests too
        lengths = [len(r.context) for r in rows]
        width = max(lengths)
        ids = torch.zeros(k, width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(r.context, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device)
        self.cache.window(start, k, width, positions[None].expand(k, -1))
        h = self.model.hidden_states(ids, cache=self.cache, cache_position=positions)
        last = h[torch.arange(k, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        logits = self.model.lm_head(last[:, None])[:, -1]
        self._stats["prefill_tokens"] += sum(lengths)
        for r, n in zip(rows, lengths):
            r.length = n
        self._sample_and_emit(start, logits)

    def _decode(self) -> None:
        n = len(self._rows)
        tokens = torch.tensor([[r.next] for r in self._rows], dtype=torch.long, device=self.device)
        lens = torch.tensor([[r.length] for r in self._rows], dtype=torch.long, device=self.device)
        width = max(r.length for r in self._rows) + 1
        mask = torch.arange(width, device=self.device)[None] <= lens
        self.cache.window(0, n, width, lens)
        out = self.model(
            tokens,
            attention_mask=mask,
            position_ids=lens,
            cache=self.cache,
            cache_position=torch.tensor([width - 1], device=self.device),
        )
        for r in self._rows:
            r.length += 1
        with self._cv:
            self._stats["steps"] += 1
            self._stats["decoded_tokens"] += n
            self._stats["max_rows_in_step"] = max(self._stats["max_rows_in_step"], n)
            self._rows_hist[n] = self._rows_hist.get(n, 0) + 1
        self._sample_and_emit(0, out.logits[:, -1])

    def _sample_and_emit(self, start: int, logits: torch.Tensor) -> None:
        """Choose the next token of rows [start, start + len(logits)), emit text, free the rows that finished."""
        rows = self._rows[start : start + logits.size(0)]
        chosen: list[int] = [0] * len(rows)
        plain = [i for i, r in enumerate(rows) if r.pipeline is None]
        if plain:
            picks = logits[plain].argmax(dim=-1).tolist() if len(plain) < len(rows) else logits.argmax(-1).tolist()
            for i, t in zip(plain, picks):
                chosen[i] = t
        for i, r in enumerate(rows):
            if r.pipeline is not None:
                context = torch.tensor([r.context], dtype=torch.long, device=self.device)
                chosen[i] = int(choose_tokens(r.pipeline, logits[i : i + 1], context, r.generator)[0])
        done: list[int] = []
        for i, (r, tok) in enumerate(zip(rows, chosen)):
            slot = start + i
            if r.handle.cancelled:
                done.append(slot)
                continue
            r.next = tok
            r.context.append(tok)
            r.generated += 1
            finish = None
            if tok in r.eos:
                finish = "stop"
                text, hit = "", False
            else:
                text, hit = r.detok.add(tok)
                if hit:
                    finish = "stop"
            if finish is None and (r.generated >= r.params.max_tokens or r.length >= self.context):
                finish = "length"
            if finish is not None:
                if not hit:
                    text += r.detok.flush()
                delta = Delta(text, [tok], finish, r.handle.prompt_tokens, r.generated)
                self._finish_handle(r.handle, delta)
                done.append(slot)
            else:
                r.handle._push(Delta(text, [tok], None, r.handle.prompt_tokens, r.generated))
        for slot in sorted(done, reverse=True):
            self._free(slot)

    def _finish_handle(self, handle: RequestHandle, delta: Delta) -> None:
        cancelled = handle.cancelled
        handle.finished = True
        if not cancelled:
            handle._push(delta)
        handle._push(_END)
        with self._cv:
            key = "cancelled" if cancelled else ("errors" if delta.error else "finished")
            self._stats[key] += 1

    def _free(self, slot: int) -> None:
        row = self._rows[slot]
        if not row.handle.finished:  # cancelled
            self._finish_handle(row.handle, Delta(finish_reason="cancelled"))
        last = len(self._rows) - 1
        if slot != last:
            moved = self._rows[last]
            self.cache.move_row(last, slot, moved.length)
            self._rows[slot] = moved
        self._rows.pop()

    def _drop_cancelled(self) -> None:
        for slot in sorted((i for i, r in enumerate(self._rows) if r.handle.cancelled), reverse=True):
            self._free(slot)

    def _fail_all(self, message: str, *, pending: bool = False) -> None:
        for r in self._rows:
            if not r.handle.finished:
                self._finish_handle(r.handle, Delta(error=message, finish_reason="error"))
        self._rows.clear()
        if pending:
            with self._cv:
                waiting = list(self._pending)
                self._pending.clear()
            for p in waiting:
                self._finish_handle(p.handle, Delta(error=message, finish_reason="error"))


def _default_eos(model: Any, tokenizer: Any) -> set[int]:
    eos = model.spec.eos_token_id
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer is not None:
        if tokenizer.eos_id is not None:
            ids.add(int(tokenizer.eos_id))
        for name in ("<|eot_id|>", "<|eom_id|>"):
            tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else None
            if tid is not None:
                ids.add(int(tid))
    return ids
