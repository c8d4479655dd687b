"""Decoding: the KV cache against full forwards, parity with transformers, batching, stopping, streaming, seeds, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import llamaforge
from llamaforge.core.generation import (
    GenerationConfig,
    GenerationError,
    clear_sessions,
    generate,
    generate_stream,
    generate_text,
)
from llamaforge.testing import specs


def _model(seed: int = 0, **overrides):
    spec = llamaforge.load_spec("tiny").with_updates(
        vocab_size=97,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        max_positions=96,
        tie_embeddings=False,
        **overrides,
    )
    model = llamaforge.build_model(spec, seed=seed).eval()
    with torch.no_grad():  # spread the logits so greedy choices are not decided by rounding
        model.lm_head.weight.mul_(8)
    return model


class CharTokenizer:
    """One character per id (id + 33), enough to test stop strings."""

    bos_id = None
    eos_id = None

    def encode(self, text, bos=False):
        return [ord(c) - 33 for c in text]

    def decode(self, ids, skip_special=True):
        return "".join(chr(33 + i) for i in ids)


@settings(max_examples=15)
@given(spec=specs(), data=st.data())
def test_incremental_decoding_with_the_cache_matches_a_full_forward(spec, data):
    model = llamaforge.build_model(spec, seed=0).eval()
    length = data.draw(st.integers(2, 24), label="length")
    ids = torch.randint(0, spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, data.draw(st.integers(length, 40), label="cache length"))
        pieces, start = [], 0
        while start < length:
            step = data.draw(st.integers(1, 4), label="chunk")
            stop = min(length, start + step)
            out = model(ids[:, start:stop], cache=cache, cache_position=torch.arange(start, stop))
            pieces.append(out.logits)
            start = stop
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-4, rtol=2e-4)


def test_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = llamaforge.load_model(tmp_path)
    prompts = [[5, 17, 33, 2], [99, 1, 64, 64, 7, 8, 110]]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=24, eos_token_ids=[]))
    for prompt, mine in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0)
        assert mine == ref[0, len(prompt) :].tolist()


def test_batched_generation_equals_each_prompt_alone():
    model = _model()
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47], [7]]
    for config in (
        GenerationConfig(max_new_tokens=10),
        GenerationConfig.from_options(temperature=0.9, top_k=20, repetition_penalty=1.3, max_new_tokens=10),
    ):
        batched = generate(model, prompts, config)
        alone = [generate(model, [p], config)[0] for p in prompts]
        if config.samplers[-1].name == "greedy":
            assert batched == alone
        else:  # sampled rows draw from one generator in batch order; compare the distributions' supports instead
            assert [len(r) for r in batched] == [len(r) for r in alone]


def test_batched_rows_get_the_logits_they_would_alone():
    """Left padding must not change a row's next-token distribution at any step."""
    model = _model(seed=1)
    prompts = [[3, 4], [10, 11, 12, 13, 14, 15]]
    config = GenerationConfig(max_new_tokens=6)
    batched = generate(model, prompts, config)
    for prompt, gen in zip(prompts, batched):
        seq = torch.tensor([prompt + gen])
        with torch.no_grad():
            greedy = model(seq).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert greedy == gen


def test_top_k_generation_stays_in_the_model_top_k():
    model = _model(seed=2)
    prompt = [4, 8, 15, 16]
    config = GenerationConfig.from_options(temperature=3.0, top_k=3, max_new_tokens=16, seed=5)
    out = generate(model, [prompt], config)[0]
    seq = torch.tensor([prompt + out])
    with torch.no_grad():
        top = model(seq).logits[0, len(prompt) - 1 : -1].topk(3, dim=-1).indices
    assert (top == torch.tensor(out)[:, None]).any(-1).all()


def test_temperature_near_zero_equals_greedy():
    model = _model(seed=3)
    prompts = [[1, 5, 9], [2, 2]]
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    cold = generate(model, prompts, GenerationConfig.from_options(temperature=1e-4, max_new_tokens=12, seed=1))
    assert cold == greedy


def test_seeds_reproduce_and_differ():
    model = _model(seed=4)
    prompts = [[1, 2, 3], [4, 5]]
    config = GenerationConfig.from_options(temperature=2.0, max_new_tokens=16, seed=123)
    first = generate(model, prompts, config)
    assert generate(model, prompts, config) == first
    other = GenerationConfig.from_options(temperature=2.0, max_new_tokens=16, seed=124)
    assert generate(model, prompts, other) != first


def test_streaming_equals_non_streaming():
    model = _model(seed=5)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    config = GenerationConfig.from_options(temperature=1.2, top_p=0.9, max_new_tokens=9, seed=7)
    steps = list(generate_stream(model, prompts, config))
    assert all(len(s) == 2 for s in steps)
    streamed = [[s[row] for s in steps if s[row] is not None] for row in range(2)]
    assert streamed == generate(model, prompts, config)


def test_eos_stops_a_row_and_the_others_continue():
    model = _model(seed=6)
    prompts = [[1, 2, 3], [30, 31]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=[]))
    at = next(i for i in range(1, 10) if free[0][i] not in free[0][:i])
    eos = free[0][at]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=[eos]))
    assert out[0] == free[0][: at + 1]  # EOS kept, nothing after it
    if eos not in free[1]:
        assert out[1] == free[1]
    steps = list(generate_stream(model, prompts, GenerationConfig(max_new_tokens=10, eos_token_ids=[eos])))
    assert all(s[0] is None for s in steps[at + 1 :])


def test_eos_defaults_to_the_model_spec():
    model = _model(seed=6)
    free = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=10, eos_token_ids=[]))[0]
    model.spec = model.spec.with_updates(eos_token_id=free[2])
    first = free.index(free[2])
    assert generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=10))[0] == free[: first + 1]


def test_stop_strings_end_generation_and_are_trimmed():
    model = _model(seed=7)
    tok = CharTokenizer()
    prompts = [[0, 1, 2]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=20, eos_token_ids=[]))[0]
    text = tok.decode(free)
    stop = text[5:7]
    cut = text.index(stop)
    out = generate(model, prompts, GenerationConfig(max_new_tokens=20, stop_strings=[stop]), tokenizer=tok)[0]
    assert tok.decode(out) == text[:cut]
    assert len(
        list(generate_stream(model, prompts, GenerationConfig(max_new_tokens=20, stop_strings=[stop]), tokenizer=tok))
    ) == cut + len(stop)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(model, prompts, GenerationConfig(max_new_tokens=5, stop_strings=["x"]))


def test_generate_text_round_trip():
    model = _model(seed=8)
    tok = CharTokenizer()
    config = GenerationConfig(max_new_tokens=5)
    single = generate_text(model, tok, "abc", config)
    assert isinstance(single, str) and len(single) == 5
    assert generate_text(model, tok, ["abc", "hello"], config)[0] == single


def test_bad_input_is_a_clear_error():
    model = _model()
    with pytest.raises(GenerationError, match="context"):
        generate(model, [[1] * 90], GenerationConfig(max_new_tokens=10))
    with pytest.raises(GenerationError, match="outside"):
        generate(model, [[1, 500]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[]], GenerationConfig(max_new_tokens=2))
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], GenerationConfig(max_new_tokens=2))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=-1)


def test_zero_new_tokens():
    assert generate(_model(), [[1, 2]], GenerationConfig(max_new_tokens=0)) == [[]]


# ----- CLI --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen-model")
    llamaforge.save_model(_model(seed=9), path)
    return path


def _cli(*args):
    from llamaforge.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_generate_prompt_ids_json(model_dir):
    res = _cli("generate", model_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    expected = generate(llamaforge.load_model(model_dir), [[1, 2, 3]], GenerationConfig(max_new_tokens=6))[0]
    assert data["token_ids"] == expected and "text" not in data


def test_cli_sampling_seed_and_yaml_config(model_dir, tmp_path):
    args = ("generate", model_dir, "--prompt-ids", "4,5", "--max-new-tokens", "8", "--json")
    a = json.loads(_cli(*args, "--temperature", "1.5", "--top-k", "5", "--seed", "3").output)
    b = json.loads(_cli(*args, "--temperature", "1.5", "--top-k", "5", "--seed", "3").output)
    assert a["token_ids"] == b["token_ids"]
    gen = tmp_path / "gen.yaml"
    gen.write_text(
        "samplers:\n  - {name: temperature, params: {temperature: 1.5}}\n  - {name: top_k, params: {top_k: 5}}\n"
    )
    c = json.loads(_cli(*args, "--config", gen, "--seed", "3").output)
    assert c["token_ids"] == a["token_ids"]


def test_cli_stream_prints_the_same_ids(model_dir):
    plain = json.loads(_cli("generate", model_dir, "--prompt-ids", "1,2", "--max-new-tokens", "5", "--json").output)
    res = _cli("generate", model_dir, "--prompt-ids", "1,2", "--max-new-tokens", "5", "--stream")
    assert res.exit_code == 0, res.output
    assert [int(t) for t in res.output.split()] == plain["token_ids"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--prompt-ids", "1,x"), "comma-separated"),
        (("--prompt-ids", "1,9999"), "outside"),
        (("--prompt", "hi"), "tokenizer"),
        ((), "exactly one"),
        (("--prompt-ids", "1", "--greedy", "--top-k", "3"), "conflicts"),
        (("--prompt-ids", ",".join(["1"] * 95), "--max-new-tokens", "5"), "context"),
    ],
)
def test_cli_errors(model_dir, args, message):
    res = _cli("generate", model_dir, *args)
    assert res.exit_code == 2 and message in res.output, res.output


# ----- CUDA: the compiled, graph-captured decode step must decode exactly what the eager loop decodes ---------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoding_matches_eager(compile):
    from llamaforge.core.generation import clear_sessions

    model = _model(seed=10).cuda()
    fast = {"compile": compile, "cuda_graph": True}
    slow = {"compile": False, "cuda_graph": False}
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47], [7]]
    greedy = GenerationConfig(max_new_tokens=20)
    sampled = GenerationConfig.from_options(
        temperature=1.3, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=3, max_new_tokens=20
    )
    for config in (greedy, sampled):
        one = generate(model, prompts[1:2], GenerationConfig(**{**config.__dict__, **slow}))
        assert generate(model, prompts[1:2], GenerationConfig(**{**config.__dict__, **fast})) == one  # batch 1
        ref = generate(model, prompts, GenerationConfig(**{**config.__dict__, **slow}))
        assert generate(model, prompts, GenerationConfig(**{**config.__dict__, **fast})) == ref
        # the cached session (and graph) is reused for prompts of other lengths
        shorter = [p[:2] for p in prompts]
        ref2 = generate(model, shorter, GenerationConfig(**{**config.__dict__, **slow}))
        assert generate(model, shorter, GenerationConfig(**{**config.__dict__, **fast})) == ref2
        streamed = list(generate_stream(model, shorter, GenerationConfig(**{**config.__dict__, **fast})))
        assert [[s[r] for s in streamed if s[r] is not None] for r in range(3)] == ref2
    clear_sessions(model)


@pytest.mark.gpu
@cuda
def test_cuda_graph_decoding_reads_back_the_same_tokens_on_either_stream(monkeypatch):
    """The per-step read-back on a stream of its own (the default) and on the decode stream give the same tokens,
    greedy and sampled, with a row ended by EOS, and both equal the CPU's greedy tokens."""
    from llamaforge.core import generation

    model = _model(seed=10)
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47], [7]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=14, eos_token_ids=[]))
    configs = [
        GenerationConfig(max_new_tokens=14, eos_token_ids=[free[0][6]]),
        GenerationConfig.from_options(temperature=1.3, top_k=30, seed=3, max_new_tokens=13),
    ]
    on_cpu = generate(model, prompts, configs[0])
    model = model.cuda()
    streams = {}
    for side in (True, False):
        monkeypatch.setattr(generation, "_SIDE_COPY", side)
        generation.clear_sessions(model)
        streams[side] = [list(generate_stream(model, prompts, c)) for c in configs]
        session = next(reversed(generation._sessions[model].values()))
        assert session.graph is not None and (session.copier is not None) is side
    assert streams[True] == streams[False]
    assert [[s[r] for s in streams[True][0] if s[r] is not None] for r in range(3)] == on_cpu
    assert on_cpu[0] == free[0][:7]  # EOS ended row 0
    generation.clear_sessions(model)


@pytest.mark.gpu
@cuda
def test_cuda_graph_stops_at_eos_and_matches_cpu():
    model = _model(seed=11)
    prompts = [[5, 6], [9, 9, 9, 1]]
    cpu = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[]))
    eos = cpu[0][4]
    on_gpu = generate(model.cuda(), prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[eos]))
    assert on_gpu[0] == cpu[0][: cpu[0].index(eos) + 1]


@pytest.fixture
def fused_qkv_calls(monkeypatch):
    """The fused q/k/v + RoPE + cache-write route switched on for any device; counts the op's calls (on a CPU it runs
    the reference)."""
    from llamaforge.kernels import qkv_rope
    from llamaforge.plugins import attention

    calls = _count_reference_calls(qkv_rope, monkeypatch)
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)
    return calls, lambda on: monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", on)


def _count_reference_calls(kernel_module, monkeypatch, name: str = "reference") -> list[int]:
    """A counter of a fused kernel module's reference calls (what its op runs on a CPU)."""
    calls = [0]
    reference = getattr(kernel_module, name)

    def counted(*args):
        calls[0] += 1
        return reference(*args)

    monkeypatch.setattr(kernel_module, name, counted)
    return calls


def _fused_and_plain(model, prompts, configs, switch, tokenizer=None):
    out = {}
    for on in (False, True):
        switch(on)
        clear_sessions(model)
        out[on] = [list(generate_stream(model, prompts, c, tokenizer=tokenizer)) for c in configs]
    clear_sessions(model)
    return out


def test_fused_qkv_rope_route_decodes_the_same_tokens_and_only_where_it_applies(fused_qkv_calls, monkeypatch):
    """Batch-1 decoding steps through the fused op stream the same tokens as the module's own steps (greedy with EOS,
    sampled, a stop string), with the block's RMSNorm folded into the op or not, also with int8 weight-only
    projections; the prefill, batches of several rows and int8_dynamic projections keep the plain path."""
    from llamaforge.plugins import attention

    calls, switch = fused_qkv_calls
    model = _model(seed=12)
    tok = CharTokenizer()
    free = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=10, eos_token_ids=[]))
    configs = [
        GenerationConfig(max_new_tokens=10, eos_token_ids=[free[0][7]]),
        GenerationConfig.from_options(temperature=1.1, top_k=20, seed=4, max_new_tokens=9),
        GenerationConfig(max_new_tokens=10, eos_token_ids=[], stop_strings=[tok.decode(free[0][4:6])]),
    ]
    out = _fused_and_plain(model, [[5, 6, 7]], configs, switch, tok)
    assert out[True] == out[False]
    monkeypatch.setattr(attention, "_FOLD_NORM", False)  # the block's RMSNorm applied before the op instead
    assert _fused_and_plain(model, [[5, 6, 7]], configs, switch, tok)[True] == out[False]
    monkeypatch.setattr(attention, "_FOLD_NORM", True)
    calls[0] = 0
    _fused_and_plain(model, [[5, 6, 7]], configs[1:2], switch)
    assert calls[0] == model.spec.n_layers * 8  # 9 tokens: the prefill's, then 8 decoding steps through the op
    _check_route_scope(12, configs, switch, calls)


def _route_keeps_the_tokens(seed, switch, calls, per_layer):
    """A fused route's first checks: greedy decoding with EOS and seeded sampling stream the same tokens with it,
    and the sampled call's 8 decoding steps after the prefill's token make `per_layer` op calls in each layer.
    Returns the model, the two configs and the tokens."""
    model = _model(seed=seed)
    free = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=10, eos_token_ids=[]))
    configs = [
        GenerationConfig(max_new_tokens=10, eos_token_ids=[free[0][7]]),
        GenerationConfig.from_options(temperature=1.1, top_k=20, seed=4, max_new_tokens=9),
    ]
    out = _fused_and_plain(model, [[5, 6, 7]], configs, switch)
    assert out[True] == out[False] and calls[0] > 0
    calls[0] = 0
    _fused_and_plain(model, [[5, 6, 7]], configs[1:], switch)
    assert calls[0] == model.spec.n_layers * 8 * per_layer
    return model, configs, out


def _check_route_scope(seed, configs, switch, calls, per_layer=1):
    """What the fused routes share: a batch of two rows and int8_dynamic projections keep the plain path, int8
    weight-only projections go through the op (8 decoding steps of configs[1], 9 tokens; `per_layer` calls in each
    layer), all with the same tokens."""
    from llamaforge.core.loading import apply_transform

    calls[0] = 0
    two = _fused_and_plain(_model(seed=seed), [[5, 6, 7], [9]], configs[:1], switch)
    assert two[True] == two[False] and calls[0] == 0
    dynamic = apply_transform(_model(seed=seed), "quantizer", "int8_dynamic")
    one = _fused_and_plain(dynamic, [[5, 6, 7]], configs[:1], switch)
    assert one[True] == one[False] and calls[0] == 0
    weight_only = apply_transform(_model(seed=seed), "quantizer", "int8_weight_only")  # int8 weights with scales
    one = _fused_and_plain(weight_only, [[5, 6, 7]], configs[1:2], switch)
    assert one[True] == one[False] and calls[0] == dynamic.spec.n_layers * 8 * per_layer


def test_fused_attention_route_decodes_the_same_tokens_and_only_where_it_applies(monkeypatch):
    """Batch-1 decoding steps with the attention folded into the fused q/k/v op (on a CPU its reference) stream the
    same tokens as the fused q/k/v op followed by the module's attention kernel; a module whose kernel is another
    plugin (`eager` here), a static cache longer than the route's bound, batches of several rows and int8_dynamic
    projections keep the separate attention."""
    from llamaforge.kernels import qkv_rope
    from llamaforge.plugins import attention

    calls = _count_reference_calls(qkv_rope, monkeypatch, "attention_reference")
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", True)

    def switch(on):
        monkeypatch.setattr(attention, "_FUSED_ATTENTION", on)

    model = _model(seed=15)
    tok = CharTokenizer()
    free = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=10, eos_token_ids=[]))
    assert len(set(free[0])) > 3  # a model that does not repeat one token: the comparison means something
    configs = [
        GenerationConfig(max_new_tokens=10, eos_token_ids=[free[0][7]]),
        GenerationConfig.from_options(temperature=1.1, top_k=20, seed=4, max_new_tokens=9),
        GenerationConfig(max_new_tokens=10, eos_token_ids=[], stop_strings=[tok.decode(free[0][4:6])]),
    ]
    out = _fused_and_plain(model, [[5, 6, 7]], configs, switch, tok)
    assert out[True] == out[False] and calls[0] > 0
    calls[0] = 0
    _fused_and_plain(model, [[5, 6, 7]], configs[1:2], switch)
    assert calls[0] == model.spec.n_layers * 8  # 9 tokens: the prefill's, then 8 decoding steps through the op
    calls[0] = 0
    bound = attention._ATTEND_MAX_LENGTH
    monkeypatch.setattr(attention, "_ATTEND_MAX_LENGTH", 8)  # below the static cache's length
    assert _fused_and_plain(model, [[5, 6, 7]], configs, switch, tok)[True] == out[False] and calls[0] == 0
    monkeypatch.setattr(attention, "_ATTEND_MAX_LENGTH", bound)
    eager = _model(seed=15, attention_kernel="eager")
    assert _fused_and_plain(eager, [[5, 6, 7]], configs, switch, tok)[True] == out[False] and calls[0] == 0
    _check_route_scope(15, configs, switch, calls)


def test_fused_gate_up_route_decodes_the_same_tokens_and_only_where_it_applies(monkeypatch):
    """One-row calls through the fused RMSNorm + gate/up + SiLU op (on a CPU its reference) stream the same tokens,
    alone and together with the fused q/k/v route, also with int8 weight-only projections; the prefill, batches of
    several rows and int8_dynamic projections keep the plain path."""
    from llamaforge.core import model as model_module
    from llamaforge.kernels import gate_up
    from llamaforge.plugins import attention

    calls = _count_reference_calls(gate_up, monkeypatch)
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)

    def switch(on):  # both weight kinds' switches (plain and int8 weight-only)
        monkeypatch.setattr(model_module, "_FUSED_GATE_UP", on)
        monkeypatch.setattr(model_module, "_FUSED_GATE_UP_INT8", on)

    model, configs, out = _route_keeps_the_tokens(14, switch, calls, per_layer=1)
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", True)  # both fused kernels in one step
    assert _fused_and_plain(model, [[5, 6, 7]], configs, switch)[True] == out[False]
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)
    _check_route_scope(14, configs, switch, calls)


def test_fused_gate_up_switches_are_per_weight_kind(monkeypatch):
    """The int8 weight-only switch routes int8 projections only and the plain switch plain ones only; None means
    CUDA only, so on a CPU None routes nothing (the defaults: both on for CUDA)."""
    from llamaforge.core import model as model_module
    from llamaforge.kernels import gate_up
    from llamaforge.plugins import attention

    assert model_module._FUSED_GATE_UP is None and model_module._FUSED_GATE_UP_INT8 is None
    calls = _count_reference_calls(gate_up, monkeypatch)
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)
    _check_switches_per_weight_kind(monkeypatch, model_module, ("_FUSED_GATE_UP", "_FUSED_GATE_UP_INT8"), calls, 16, 1)


def _check_switches_per_weight_kind(monkeypatch, module, names, calls, seed, per_layer):
    """A route's two switches (`names`: plain weights, int8 weight-only) each route their own weight kind only; None
    means CUDA only, so on a CPU it routes nothing. `per_layer`: op calls in each layer per decoding step."""
    from llamaforge.core.loading import apply_transform

    plain = _model(seed=seed)
    int8 = apply_transform(_model(seed=seed), "quantizer", "int8_weight_only")
    config = GenerationConfig(max_new_tokens=5, eos_token_ids=[])
    steps = plain.spec.n_layers * 4 * per_layer  # the 4 decoding steps after the prefill's token
    for plain_on, int8_on, want_plain, want_int8 in [(False, True, 0, steps), (True, False, steps, 0),
                                                     (None, None, 0, 0), (True, True, steps, steps)]:  # fmt: skip
        monkeypatch.setattr(module, names[0], plain_on)
        monkeypatch.setattr(module, names[1], int8_on)
        for model, want in ((plain, want_plain), (int8, want_int8)):
            calls[0] = 0
            generate(model, [[5, 6, 7]], config)
            assert calls[0] == want, (plain_on, int8_on, model is int8)


def test_residual_route_decodes_the_same_tokens_and_only_where_it_applies(monkeypatch):
    """One-row calls through the residual GEMV op (o_proj and down_proj with the residual additions after them; on a
    CPU its reference) stream the same tokens, alone and with the fused q/k/v + attention and gate/up routes, also
    with int8 weight-only projections; the prefill, batches of several rows and int8_dynamic projections keep the
    plain path. Each switch routes its own weight kind only."""
    from llamaforge.core import model as model_module
    from llamaforge.kernels import residual_gemv
    from llamaforge.plugins import attention

    assert residual_gemv.PLAIN is None and residual_gemv.INT8 is None  # the defaults: CUDA only
    calls = _count_reference_calls(residual_gemv, monkeypatch)
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)

    def switch(on):
        monkeypatch.setattr(residual_gemv, "PLAIN", on)
        monkeypatch.setattr(residual_gemv, "INT8", on)

    model, configs, out = _route_keeps_the_tokens(17, switch, calls, per_layer=2)  # o_proj and down_proj
    for fused in (True, None):  # every fused route in one step (None: none of them on a CPU)
        monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", fused)
        monkeypatch.setattr(attention, "_FUSED_ATTENTION", fused)
        monkeypatch.setattr(model_module, "_FUSED_GATE_UP", fused)
        assert _fused_and_plain(model, [[5, 6, 7]], configs, switch)[True] == out[False]
    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", False)
    _check_route_scope(17, configs, switch, calls, per_layer=2)
    _check_switches_per_weight_kind(monkeypatch, residual_gemv, ("PLAIN", "INT8"), calls, 17, 2)


@pytest.mark.slow  # an inductor compilation: ~15 s on an idle CPU
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("attend", [False, True])
def test_fused_qkv_rope_route_in_the_compiled_step_writes_the_cache_in_place(fused_qkv_calls, attend, monkeypatch):
    """Compiled, the op stays one call per layer that writes the cache where it is (no copy of the cache per step),
    and the tokens are those of the plain compiled step; with the attention folded in too (no attention kernel of
    its own left in the step, its counters not copied either)."""
    from torch._inductor.utils import run_and_get_code

    from llamaforge.core import generation
    from llamaforge.core import model as model_module
    from llamaforge.kernels import residual_gemv
    from llamaforge.plugins import attention

    monkeypatch.setattr(attention, "_FUSED_ATTENTION", attend)
    calls, switch = fused_qkv_calls
    model = _model(seed=13)
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=[], compile=True)
    out = _fused_and_plain(model, [[1, 2, 3]], [config], switch)
    assert out[True] == out[False] and calls[0] > 0
    switch(True)
    monkeypatch.setattr(model_module, "_FUSED_GATE_UP", True)  # and the feed-forward's fused op in the same graph
    monkeypatch.setattr(residual_gemv, "PLAIN", True)  # and o_proj / down_proj with their residual additions
    torch._dynamo.reset()
    cache = model.new_cache(1, 16)
    keys_before = [k.clone() for k in cache.keys]
    args = (model, torch.tensor([[4]]), torch.ones(1, 16, dtype=torch.long), torch.tensor([[3]]), cache,
            torch.tensor([3]))  # fmt: skip
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(generation._decode_forward), *args)
    code = "\n".join(codes)
    op = "qkv_rope_attention_reference" if attend else "qkv_rope_cache_reference"
    assert code.count(f"torch.ops.llamaforge.{op}.default(") == model.spec.n_layers
    assert ("scaled_dot_product" in code) != attend
    assert code.count("torch.ops.llamaforge.gate_up_silu_reference.default(") == model.spec.n_layers
    assert code.count("torch.ops.llamaforge.residual_linear_reference.default(") == 2 * model.spec.n_layers
    assert ".copy_(" not in code  # mutated in place, not functionalised into a copy of every cache buffer
    changed = [(k != k0).any(dim=(0, 1, 3)).nonzero().flatten().tolist() for k, k0 in zip(cache.keys, keys_before)]
    assert changed == [[3]] * model.spec.n_layers


@pytest.mark.slow  # an inductor compilation: ~10 s on an idle CPU
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gemv_pass_rewrites_one_row_products_and_keeps_their_values():
    """The decode-step graph pass (used on CUDA) checked through inductor on CPU with a single linear layer."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    def two(x, w, w2):  # a row read at a storage offset, and a row computed in the graph
        return F.linear(x[:, 3:], w).relu(), F.linear(F.silu(x[:, :40]) * x[:, 1:41], w2)

    torch._dynamo.reset()
    before = generation._gemv_rewrites[0]
    fn = torch.compile(two, options={"post_grad_custom_pre_pass": generation._gemv_pass()})
    w, w2 = torch.randn(24, 40), torch.randn(16, 40)
    x = torch.randn(1, 43)
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph would skip the pass
        got = fn(x, w, w2)
    for a, b in zip(got, two(x, w, w2), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert generation._gemv_rewrites[0] == before + 2


@pytest.mark.slow  # an inductor compilation: ~15 s on an idle CPU
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gemv_pass_stacks_products_of_one_row_including_computed_weights(counting_gemv_pass):
    """q/k/v-like products of one input become one reduction over stacked weights; weights computed in the graph
    (an int8 matrix's cast, defined after the first product) are moved ahead so the stacked product can use them."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(32, 40, generator=g), torch.randn(8, 40, generator=g)
    qi = torch.randint(-127, 128, (16, 40), dtype=torch.int8, generator=g)
    scale = torch.rand(16, generator=g)

    def layer(x):
        q = F.linear(x, wq).relu()  # used before the next products are reached in graph order
        k = F.linear(x, wk)
        v = F.linear(x, qi.to(x.dtype)) * scale
        return q.sum(-1, keepdim=True) + k[..., :1] + v[..., :1], q, k, v

    spy, stacked = counting_gemv_pass(lambda graph: sum(n.target is torch.ops.aten.cat.default for n in graph.nodes))
    torch._dynamo.reset()
    before = generation._gemv_rewrites[0]
    fn = torch.compile(layer, options={"post_grad_custom_pre_pass": spy})
    x = torch.randn(1, 1, 40, generator=g)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = fn(x)
    for a, b in zip(got, layer(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert generation._gemv_rewrites[0] == before + 3 and stacked == [1]


def _lowered_nodes(fn, x, buffer_row: bool, monkeypatch) -> tuple[int, torch.Tensor]:
    """IR nodes inductor lowers `fn` to with the GEMV pass, and its output."""
    from torch._inductor import metrics

    from llamaforge.core import generation

    monkeypatch.setattr(generation, "_BUFFER_ROW", buffer_row)
    monkeypatch.setattr(generation, "_FOLD_NORM", False)  # on a CPU the norm would be folded into the product
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(fn, options={"post_grad_custom_pre_pass": generation._gemv_pass()})
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(x)
    return metrics.ir_nodes_pre_fusion, out


def _normed_head(device: str, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    norm_w = torch.randn(64, generator=g).to(device, dtype)
    head = torch.randn(200, 64, generator=g).to(device, dtype)

    def fn(x):  # the model's last step: RMSNorm of the residual, then the output head
        x32 = x.float()
        h = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * norm_w
        return torch.nn.functional.linear(h, head)

    return fn, torch.randn(1, 1, 64, generator=g).to(device, dtype)


@pytest.mark.slow  # two inductor compilations (~15 s)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gemv_pass_buffers_the_row_instead_of_recomputing_it_in_the_reduction(monkeypatch):
    """Without the buffer, inductor inlines the RMSNorm scaling into the head's reduction (every thread block
    recomputes the row on a GPU); with it, the row is lowered as its own node and the values do not change. fp32:
    on a CPU the pass leaves 16-bit products to oneDNN."""
    fn, x = _normed_head("cpu", torch.float32)
    inlined, a = _lowered_nodes(fn, x, False, monkeypatch)
    buffered, b = _lowered_nodes(fn, x, True, monkeypatch)
    assert buffered == inlined + 1
    for out in a, b:  # a buffered bf16 row is rounded like eager; an inlined one stays fp32, hence the tolerance
        torch.testing.assert_close(out, fn(x), atol=0.1, rtol=0.02)


@pytest.mark.gpu
@cuda
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_gemv_pass_buffers_the_row_on_cuda(monkeypatch):
    """The same on the GPU, where a profile once showed the row still inlined (see generation._gemv_pass)."""
    fn, x = _normed_head("cuda")
    inlined, a = _lowered_nodes(fn, x, False, monkeypatch)
    buffered, b = _lowered_nodes(fn, x, True, monkeypatch)
    assert buffered == inlined + 1
    for out in a, b:
        torch.testing.assert_close(out, fn(x), atol=0.1, rtol=0.02)


@pytest.mark.slow  # compiles the whole decode step of a small model on CPU (~30 s each)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("quantizer", [None, "int8_weight_only"])
def test_gemv_pass_over_a_whole_cpu_decode_step_keeps_the_tokens(quantizer):
    """The decode step's graph pass in a CPU compile (on by default there for fp32 and int8 weights): every product
    of the step is rewritten (q/k/v and gate/up stacked, rows buffered) and greedy decoding gives the eager
    tokens."""
    from llamaforge.core import generation
    from llamaforge.core.loading import apply_transform

    model = _model(seed=14)
    if quantizer:
        model = apply_transform(model, "quantizer", quantizer)
    prompts = [[3, 4, 5, 6]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=8, compile=False))
    torch._dynamo.reset()
    before = generation._gemv_rewrites[0]
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = generate(model, prompts, GenerationConfig(max_new_tokens=8, compile=True))
    layers = model.spec.n_layers
    assert generation._gemv_rewrites[0] - before >= 7 * layers  # q, k, v, o, gate, up, down in every layer
    assert compiled == eager
    generation.clear_sessions(model)


@pytest.mark.slow  # compiles the whole decode step of a small model on CPU (~20 s)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_decoding_with_the_one_write_cache_gives_the_eager_tokens(monkeypatch, counting_gemv_pass):
    """The cache layout with keys and values in one buffer per layer (`cache._ONE_WRITE`) under the compiled step:
    one indexed write per layer in the step's graph, and the eager tokens."""
    from llamaforge.core import cache as cache_mod
    from llamaforge.core import generation

    monkeypatch.setattr(cache_mod, "_ONE_WRITE", True)
    spy, writes = counting_gemv_pass(lambda g: sum(n.target is torch.ops.aten.index_put.default for n in g.nodes))
    monkeypatch.setattr(generation, "_gemv_pass", lambda: spy)
    model = _model(seed=15)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=8, compile=False))
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = generate(model, prompts, GenerationConfig(max_new_tokens=8, compile=True))
    assert compiled == eager
    session = next(reversed(generation._sessions[model].values()))
    assert session.cache.kv is not None
    # one write per layer (two with separate buffers), and the step's write of the new token into the context
    assert writes and set(writes) == {model.spec.n_layers + 1}
    generation.clear_sessions(model)


@pytest.mark.slow  # compiles the whole decode step of a small model on CPU (~30 s)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_greedy_step_gives_the_eager_tokens():
    from llamaforge.core import generation

    model = _model(seed=13)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=10, compile=False))
    compiled = generate(model, prompts, GenerationConfig(max_new_tokens=10, compile=True))
    assert compiled == eager
    session = next(reversed(generation._sessions[model].values()))
    assert session.fused is not None  # the greedy pipeline took the one-graph step
    generation.clear_sessions(model)


def test_session_fingerprint_follows_what_a_captured_graph_depends_on():
    """Same model: same key. A swapped module, a reallocated parameter or a dtype change: a new key (a captured
    graph would read the old tensors). In-place weight updates keep the storage, so the key stays."""
    from torch import nn

    from llamaforge.core.generation import _fingerprint

    model = _model(seed=3)
    key = _fingerprint(model)
    assert _fingerprint(model) == key
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert _fingerprint(model) == key
    proj = model.model.layers[0].mlp.up_proj
    proj.weight.data = proj.weight.data.clone()
    moved = _fingerprint(model)
    assert moved != key
    model.model.layers[1].mlp.down_proj = nn.Linear(proj.out_features, proj.in_features, bias=False)
    swapped = _fingerprint(model)
    assert swapped != moved
    model.to(torch.float64)
    assert _fingerprint(model) != swapped


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.sampled_from([7, 128, 1000, 1536, 4096, 32000, 50257, 128256]),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_two_stage_argmax_equals_argmax_ties_included(rows, vocab, levels, seed):
    from llamaforge.core.generation import argmax_rows

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()  # few levels: many tied maxima
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_cli_text_prompt_with_a_tokenizer_and_stop_string(tmp_path):
    from llamaforge.core.tokenizer import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat", "a dog ran to the park"] * 20, vocab_size=300)
    spec = llamaforge.load_spec("tiny").with_updates(
        vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=48, max_positions=64
    )
    llamaforge.save_model(llamaforge.build_model(spec, seed=0), tmp_path)
    tok.save(tmp_path)
    base = ("generate", tmp_path, "--prompt", "the cat", "--max-new-tokens", "12", "--json")
    res = _cli(*base, "--temperature", "1.0", "--seed", "1")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["text"] == tok.decode(data["token_ids"]) and data["prompt_ids"][0] == tok.bos_id
    full = json.loads(_cli(*base, "--temperature", "1.0", "--seed", "1", "--stop", "zzz").output)
    assert full["token_ids"] == data["token_ids"]  # a stop string that never appears changes nothing
    if len(data["text"]) > 3:
        stop = data["text"][2:4]
        cut = json.loads(_cli(*base, "--temperature", "1.0", "--seed", "1", "--stop", stop).output)
        assert stop not in cut["text"] and data["text"].startswith(cut["text"])


def test_a_failing_compile_falls_back_to_eager_decoding(monkeypatch, caplog):
    from llamaforge.core import generation

    def broken(fn, **options):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _model(seed=12)
    ref = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=6))
    for samplers in ([{"name": "greedy"}], [{"name": "top_k", "params": {"top_k": 1}}]):  # fused step / forward
        caplog.clear()
        with caplog.at_level("WARNING"):
            cfg = GenerationConfig(max_new_tokens=6, compile=True, samplers=samplers, seed=0)
            assert generate(model, [[1, 2, 3]], cfg) == ref
        assert "without torch.compile" in caplog.text
    generation.clear_sessions(model)


@pytest.mark.parametrize(
    ("prompts", "new", "layout", "sampled"),
    [
        ([[3, 4, 5]], 10, 16, False),
        ([[3, 4, 5], list(range(7, 24))], 8, 32, False),  # rows of different lengths share the 32-token layout
        ([[1] * 16], 5, 16, False),
        ([list(range(1, 40))], 6, 64, True),
        ([list(range(1, 80))], 10, 79, False),  # 128 + 10 would pass max_positions (96): the exact length
    ],
)
def test_prefill_buckets_change_no_tokens(monkeypatch, prompts, new, layout, sampled):
    """prefill_graph pads prompts on the left to a bucket length; the padding is masked, so nothing changes."""
    from llamaforge.core import generation

    model = _model(seed=5)
    knobs = {"temperature": 0.8, "top_k": 20, "seed": 3} if sampled else {}
    ref = generate(model, prompts, GenerationConfig.from_options(max_new_tokens=new, compile=False, **knobs))
    layouts = []
    reset = generation._Session.reset
    monkeypatch.setattr(generation._Session, "reset", lambda self, *a: layouts.append(reset(self, *a)) or layouts[-1])
    config = GenerationConfig.from_options(max_new_tokens=new, compile=False, prefill_graph=True, **knobs)
    assert generate(model, prompts, config) == ref
    assert layouts == [layout]


def test_prefill_graph_must_be_a_bool_or_none():
    with pytest.raises(GenerationError, match="prefill_graph"):
        GenerationConfig(prefill_graph="yes")


@pytest.mark.parametrize(
    ("device", "options", "want"),
    [
        ("cuda", {}, (True, True)),  # auto: prefill graphs wherever the decode step replays one
        ("cuda", {"cuda_graph": False}, (False, False)),
        ("cuda", {"prefill_graph": False}, (True, False)),
        ("cpu", {}, (False, False)),
        ("cpu", {"prefill_graph": True}, (False, True)),  # the bucket layout still applies (tested above)
    ],
)
def test_prefill_graphs_are_on_by_default_where_the_decode_step_is_a_cuda_graph(device, options, want):
    from llamaforge.core import generation

    config = GenerationConfig(max_new_tokens=4, **options)
    assert generation._graphs(config, torch.device(device)) == want


def test_cpu_decoding_lays_prompts_out_at_their_own_length_by_default(monkeypatch):
    from llamaforge.core import generation

    layouts = []
    reset = generation._Session.reset
    monkeypatch.setattr(generation._Session, "reset", lambda self, *a: layouts.append(reset(self, *a)) or layouts[-1])
    generate(_model(seed=5), [[3, 4, 5]], GenerationConfig(max_new_tokens=3, compile=False))
    assert layouts == [3]  # no padding to the 16-token bucket: nothing on a CPU would replay its graph


@pytest.mark.gpu
@cuda
def test_prefill_graph_on_cuda_gives_the_eager_prefill_tokens():
    from llamaforge.core import generation

    model = _model(seed=11).cuda()
    for prompts in ([[5, 6], [9, 9, 9, 1]], [[7, 7, 7], [1, 2]]):  # the second call replays the captured graph
        ref = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[], prefill_graph=False))
        got = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=[]))  # on by default here
        assert got == ref
    session = next(reversed(generation._sessions[model].values()))
    assert session.prefill_graphs is not None and 16 in session.prefill_graphs
    generation.clear_sessions(model)
