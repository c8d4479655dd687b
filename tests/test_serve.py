"""Serving: the batching engine against plain `generate`, and the HTTP server's error handling, cancellation and
batching, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from llamaforge.core.generation import GenerationConfig, generate  # noqa: E402
from llamaforge.core.loading import load_model_and_tokenizer  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.engine import Engine, SamplingParams, _Detokenizer, collect  # noqa: E402
from llamaforge.serve.testing import ServerThread, tiny_model_dir  # noqa: E402

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_and_tokenizer(model_dir, require_tokenizer=True)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name=MODEL, max_batch=4, ui=False)
    with ServerThread(app) as s:
        s.engine = app.state.engine
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _reference(model, prompt: list[int], n: int, eos: list[int] | None = None) -> list[int]:
    config = GenerationConfig(max_new_tokens=n, eos_token_ids=[] if eos is None else eos)
    return generate(model, [prompt], config)[0]


# ----- engine ---------------------------------------------------------------------------------------------------
@settings(max_examples=6)
@given(
    jobs=st.lists(
        st.tuples(st.lists(st.integers(3, 300), min_size=1, max_size=12), st.integers(1, 12)), min_size=1, max_size=7
    ),
    max_batch=st.integers(1, 3),
)
def test_engine_matches_generate_with_more_requests_than_rows(loaded, jobs, max_batch):
    """Rows join, finish at different steps and are moved within the cache; each result must be exactly what
    generating that prompt alone gives."""
    model, _ = loaded
    engine = Engine(model, None, max_batch=max_batch, eos_token_ids=[]).start()
    try:
        handles = [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in jobs]
        results = [collect(list(h)) for h in handles]
    finally:
        engine.close()
    for (prompt, n), r in zip(jobs, results):
        assert r.token_ids == _reference(model, prompt, n)
        assert r.finish_reason == "length" and r.completion_tokens == n
    stats = engine.stats()
    assert stats["finished"] == len(jobs) and stats["max_rows_in_step"] <= max_batch


def test_engine_stop_strings_and_seeds(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, eos_token_ids=[]).start()
    try:
        prompt = tok.encode("Once upon a time", bos=True)
        full = engine.generate(prompt, SamplingParams(max_tokens=24))
        assert full.text == tok.decode(_reference(model, prompt, 24))
        stop = full.text[5:8]
        cut = engine.generate(prompt, SamplingParams(max_tokens=24, stop=[stop]))
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
        sampled = SamplingParams(max_tokens=16, samplers=[{"name": "temperature", "params": {"temperature": 1.5}}])
        sampled.seed = 123
        a, b = engine.generate(prompt, sampled), engine.generate(prompt, sampled)
        assert a.token_ids == b.token_ids
        sampled.seed = 124
        assert engine.generate(prompt, sampled).token_ids != a.token_ids
    finally:
        engine.close()


@given(st.text(max_size=40))
def test_detokenizer_streams_exactly_the_decoded_text(loaded, text):
    """Incremental text never splits a multi-byte character and adds up to decoding all ids at once."""
    _, tok = loaded
    ids = tok.encode(text)
    d = _Detokenizer(tok, [])
    pieces = [d.add(t)[0] for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_engine_survives_a_model_failure(loaded):
    model, _ = loaded
    engine = Engine(model, None, max_batch=2, eos_token_ids=[]).start()
    try:
        original = model.lm_head.forward
        model.lm_head.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            bad = engine.generate([1, 2, 3], SamplingParams(max_tokens=4))
        finally:
            model.lm_head.forward = original
        assert bad.error and "boom" in bad.error
        good = engine.generate([1, 2, 3], SamplingParams(max_tokens=4))
        assert good.token_ids == _reference(model, [1, 2, 3], 4)
    finally:
        engine.close()


# ----- HTTP errors ----------------------------------------------------------------------------------------------
def _completion(**kw):
    return {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, **kw}


BAD_REQUESTS = [
    ("/v1/completions", _completion(max_tokens=0), "max_tokens"),
    ("/v1/completions", _completion(max_tokens=-5), "max_tokens"),
    ("/v1/completions", _completion(max_tokens=10**6), "max_tokens"),
    ("/v1/completions", _completion(max_tokens="many"), "max_tokens"),
    ("/v1/completions", _completion(temperature=2.5), "temperature"),
    ("/v1/completions", _completion(temperature=-0.1), "temperature"),
    ("/v1/completions", _completion(top_p=1.5), "top_p"),
    ("/v1/completions", _completion(top_p=-0.2), "top_p"),
    ("/v1/completions", _completion(top_k=0), "top_k"),
    ("/v1/completions", _completion(n=2), "n"),
    ("/v1/completions", _completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", _completion(presence_penalty=0.5), "presence_penalty"),
    ("/v1/completions", _completion(prompt=[5] * 600), "prompt"),
    ("/v1/completions", _completion(prompt=[100000]), None),
    ("/v1/completions", _completion(prompt=[]), "prompt"),
    ("/v1/completions", _completion(best_of=3), "best_of"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_requests_answer_400_with_openai_errors(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_answer_400(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_unknown_model_and_route_answer_404_and_the_server_keeps_serving(client, loaded):
    r = client.post("/v1/completions", json=_completion(model="gpt-4"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405
    model, tok = loaded
    r = client.post("/v1/completions", json=_completion(temperature=0, ignore_eos=True))
    assert r.status_code == 200
    expected = tok.decode(_reference(model, tok.encode("Once upon", bos=True), 4))
    assert r.json()["choices"][0]["text"] == expected
    assert client.get("/health").json()["status"] == "ok"


def test_api_key(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name=MODEL, api_key="s3cret", max_batch=2, ui=False)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=_completion()).json()["error"]["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL
        assert c.post("/v1/completions", json=_completion(), headers=ok).status_code == 200
        assert c.get("/health").status_code == 200


# ----- batching and cancellation --------------------------------------------------------------------------------
def test_concurrent_requests_are_decoded_together(server, client, loaded):
    model, tok = loaded
    before = server.engine.stats()["rows_per_step"]
    prompts = ["Once upon a time", "The fox", "One day the fox found", "Les enfants"]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        body = _completion(prompt=prompts[i], max_tokens=24, temperature=0, ignore_eos=True)
        results[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = server.engine.stats()["rows_per_step"]
    batched = {int(k): v - before.get(k, 0) for k, v in after.items() if int(k) > 1 and v > before.get(k, 0)}
    assert batched, f"no decode step ran more than one row: {after}"
    for i, p in enumerate(prompts):  # batching must not change anyone's answer
        assert results[i] == tok.decode(_reference(model, tok.encode(p, bos=True), 24))


def _wait_idle(engine, cancelled_before: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["cancelled"] > cancelled_before and stats["active"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the engine did not free the row: {engine.stats()}")


def test_client_disconnect_mid_stream_cancels_generation(server, client):
    engine = server.engine
    before = engine.stats()
    body = _completion(max_tokens=480, ignore_eos=True, temperature=0, stream=True)
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: {") for line in got)
    stats = _wait_idle(engine, before["cancelled"])
    decoded = stats["decoded_tokens"] - before["decoded_tokens"]
    assert decoded < 480, "the whole generation ran although the client had gone"


def test_client_disconnect_without_streaming_cancels_generation(server):
    engine = server.engine
    before = engine.stats()
    body = json.dumps(_completion(max_tokens=480, ignore_eos=True, temperature=0)).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 20
        while engine.stats()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    stats = _wait_idle(engine, before["cancelled"])
    assert stats["decoded_tokens"] - before["decoded_tokens"] < 480


# ----- the command --------------------------------------------------------------------------------------------
def test_serve_command_binds_loopback_by_default(model_dir, tmp_path):
    from click.testing import CliRunner

    from llamaforge.cli import cli

    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "127.0.0.1" in help_text and "--api-key" in help_text and "--max-batch" in help_text

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLAMAFORGE_API_KEY": "k", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llamaforge", "serve", str(model_dir), "--port", str(port), "--no-ui"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r.json()["model"] == model_dir.name
        headers = {"Authorization": "Bearer k"}
        body = {"model": model_dir.name, "prompt": "Once", "max_tokens": 3}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30).status_code == 401
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(20)


# ----- quantized models and LoRA adapters -------------------------------------------------------------------------
def test_serves_quantized_models_and_lora_adapters(model_dir, tmp_path):
    """What `llamaforge serve` loads (a quantized directory; a base plus --adapter) answers exactly like `generate`
    on the same model, and the adapter really changes the answers."""
    finetune = pytest.importorskip("llamaforge.core.finetune")
    from llamaforge.core.loading import apply_transform, save_model
    from llamaforge.serve.app import load_for_serving

    base, tok = load_model_and_tokenizer(model_dir, require_tokenizer=True)
    quantized_dir = tmp_path / "int8"
    save_model(apply_transform(base, "quantizer", "int8_weight_only"), quantized_dir)
    tok.save(quantized_dir)

    trained, _ = load_model_and_tokenizer(model_dir)
    finetune.add_adapter(trained, "lora", rank=4)
    with torch.no_grad():  # a fresh LoRA is a no-op (B = 0); give it weights as if it had been trained
        for p in finetune.adapter_parameters(trained):
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    adapter_dir = finetune.save_adapter(trained, tmp_path / "adapter")

    prompt = tok.encode("Once upon a time", bos=True)
    plain = _reference(load_model_and_tokenizer(model_dir)[0], prompt, 12)
    answers = {}
    for label, path, adapter in (("int8", quantized_dir, None), ("lora", model_dir, adapter_dir)):
        model, mtok = load_for_serving(str(path), adapter=adapter and str(adapter))
        app = create_app(model, mtok, model_name=MODEL, max_batch=2, ui=False)
        with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as c:
            body = _completion(prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
            r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        answers[label] = r.json()["choices"][0]["text"]
        assert answers[label] == tok.decode(_reference(model, prompt, 12)), label
    assert answers["lora"] != tok.decode(plain)


def test_chat_prompt_uses_the_tokenizer_template_else_llama3_layout(loaded, model_dir):
    from llamaforge.core.tokenizer import load_tokenizer
    from llamaforge.serve.app import Service

    model, tok = loaded
    engine = Engine(model, tok, max_batch=1)  # never started: only prompt building is under test
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    plain = Service(engine, tok, MODEL)
    assert tok.decode(plain.chat_ids(messages), skip_special=False) == (
        f"{tok.hf.bos_token}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert plain.chat_stops == ["<|eot_id|>"]  # not a special token of this tokenizer: stop on the text
    templated = load_tokenizer(model_dir)
    templated.hf.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    own = Service(engine, templated, MODEL)
    assert templated.decode(own.chat_ids(messages)) == "[system] Be brief.\n[user] hi\n[assistant] "
    assert own.chat_stops == []
