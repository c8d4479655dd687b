"""Helpers to run a real server in-process: for tests, benchmarks and notebooks.

`ServerThread(app)` runs uvicorn on a socket it binds itself (127.0.0.1, a free port), so there is no race for the
port and nothing leaves the machine. `tiny_model_dir(path)` writes a small random model with a trained byte-level
tokenizer beside it, the layout `llamaforge serve` loads.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

TINY_TEXTS = [
    "Once upon a time there was a little fox who lived in a forest.",
    "The fox liked to run, to jump and to play with the other animals.",
    "One day the fox found a shiny stone near the river and showed it to a bird.",
    "Les enfants jouent dans le jardin; ça sent bon le café. 日本語のテキストも少し。 🙂",
] * 8


def tiny_model_dir(
    directory: str | Path,
    *,
    vocab_size: int = 320,
    max_positions: int = 512,
    dim: int = 64,
    n_layers: int = 2,
    seed: int = 0,
    **spec_updates: Any,
) -> Path:
    """A random llamaforge model plus tokenizer in `directory`; returns the directory. `spec_updates` override
    the small shape (e.g. n_heads, n_kv_heads)."""
    import llamaforge as lf
    from llamaforge.core.tokenizer import train_tokenizer

    directory = Path(directory)
    tok = train_tokenizer(TINY_TEXTS, vocab_size, min_frequency=1)
    spec = lf.load_spec("tiny").with_updates(
        vocab_size=tok.vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        max_positions=max_positions,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    if spec_updates:
        spec = spec.with_updates(**spec_updates)
    model = lf.build_model(spec, seed=seed, dtype="float32")
    lf.save_model(model, directory)
    tok.save(directory)
    return directory


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; use as a context manager. `.url` is the base URL."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
