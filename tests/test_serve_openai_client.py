"""The official `openai` client against a real uvicorn server on 127.0.0.1: completions and chat, streamed and
not, plus the typed errors the client raises for our error bodies."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llamaforge.core.generation import GenerationConfig, generate  # noqa: E402
from llamaforge.core.loading import load_model_and_tokenizer  # noqa: E402
from llamaforge.serve.app import create_app  # noqa: E402
from llamaforge.serve.testing import ServerThread, tiny_model_dir  # noqa: E402

MODEL = "tiny-openai"
KEY = "test-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = load_model_and_tokenizer(tiny_model_dir(tmp_path_factory.mktemp("m")), require_tokenizer=True)
    app = create_app(model, tok, model_name=MODEL, api_key=KEY, max_batch=4, ui=False)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield client, model, tok, app.state.service, server


def _expected(model, tok, ids, n):
    eos = sorted({tok.eos_id, model.spec.eos_token_id} - {None})
    out = generate(model, [ids], GenerationConfig(max_new_tokens=n, eos_token_ids=eos))[0]
    return tok.decode(out), len(out)


def test_models(setup):
    client, *_ = setup
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(setup):
    client, model, tok, _, _ = setup
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text, n = _expected(model, tok, tok.encode("Once upon a time", bos=True), 12)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time", bos=True))


def test_completion_stream(setup):
    client, *_ = setup
    args = {"model": MODEL, "prompt": "The fox", "max_tokens": 20, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat(setup):
    client, model, tok, service, _ = setup
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    text, n = _expected(model, tok, service.chat_ids(messages), 10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == n


def test_chat_stream_with_usage(setup):
    client, *_ = setup
    messages = [{"role": "user", "content": "Once upon a time"}]
    args = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**args)
    stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_sampling_is_seeded(setup):
    client, *_ = setup
    args = {"model": MODEL, "prompt": "One day", "max_tokens": 16, "temperature": 1.2, "top_p": 0.95, "seed": 7}
    a = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    b = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    assert a == b


def test_typed_errors(setup):
    client, _, _, _, server = setup
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=7)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
