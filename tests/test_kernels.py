"""The Triton decode-attention kernel: its PyTorch reference against the model's eager attention, the kernel itself
in Triton's CPU interpreter (a subprocess, since the interpreter is chosen when Triton is imported), and on a GPU
where there is one."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.core.interfaces import AttentionMask
from llamaforge.kernels import decode_attention as dec
from llamaforge.plugins.attention import eager, flash_decode, sdpa

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(seed: int, b: int, kv: int, rep: int, length: int, d: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kv * rep, 1, d, generator=g).to(dtype)
    k = torch.randn(b, kv, length, d, generator=g).to(dtype)
    v = torch.randn(b, kv, length, d, generator=g).to(dtype)
    allowed = torch.rand(b, length, generator=g) < 0.7
    allowed[:, -1] = True  # the current position: a decoding query always sees itself
    if b > 1:
        allowed[1, : length // 2] = False  # a left-padded row
    return q, k, v, allowed


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    kv=st.integers(1, 4),
    rep=st.sampled_from([1, 2, 3, 4]),
    length=st.integers(1, 70),
    d=st.sampled_from([8, 16, 32]),
)
def test_reference_is_the_models_attention_for_one_query(seed, b, kv, rep, length, d):
    q, k, v, allowed = _case(seed, b, kv, rep, length, d)
    mask = AttentionMask(causal=False, mask=allowed[:, None, None, :])
    torch.testing.assert_close(dec.reference(q, k, v, allowed, 1 / math.sqrt(d)), eager(q, k, v, mask=mask))
    # the plugin routes to the kernel on CUDA only; elsewhere it is sdpa
    torch.testing.assert_close(flash_decode(q, k, v, mask=mask), sdpa(q, k, v, mask=mask), atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 64), kv=st.integers(1, 32), length=st.integers(1, 8192), block=st.sampled_from([16, 32, 64]))
def test_split_plan_covers_the_cache_in_whole_blocks(b, kv, length, block):
    splits = dec.plan(b, kv, length, block)
    chunk = dec._chunk(length, splits, block)
    blocks = -(-length // block)
    assert splits & (splits - 1) == 0 and chunk % block == 0
    assert splits * chunk >= length and splits <= blocks  # covers the cache; never more splits than blocks
    assert splits == 1 or length // splits >= dec._MIN_SPLIT  # no split too short to pay for the combining pass
    if length >= 128 * dec._MIN_SPLIT and blocks >= 128:
        assert b * kv * splits >= 64  # a short batch over a long cache still spreads over the GPU


def _in_the_interpreter(script: str, expect: str) -> None:
    """Run `script` in a fresh Python with Triton's CPU interpreter (chosen when Triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    assert proc.returncode == 0 and expect in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter_matches_the_reference():
    """Every launch shape against the reference, without and with an extent, with and without tensor-core block
    products (fp16 there: the interpreter's dot mistakes bf16 for integers; bf16 runs in the GPU test)."""
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import decode_attention as dec
        from tests.test_kernels import _case
        cases = [  # (seed, batch, kv heads, heads per kv head, cache length, head size, splits, block, dtype)
            (0, 1, 8, 4, 64, 64, None, None, torch.float32),  # Llama-3.2-1B's grouping, automatic split
            (1, 2, 2, 3, 37, 16, None, None, torch.float32),  # 3 query heads per group (padded to 4 in the kernel)
            (2, 2, 4, 1, 100, 32, 1, None, torch.float32),  # one program per row and head: no combining pass
            (3, 1, 1, 8, 300, 64, 4, None, torch.float16),
            (4, 3, 3, 2, 17, 16, 8, None, torch.float32),  # splits that see no allowed position at all
            (5, 2, 2, 4, 90, 32, 2, 64, torch.float16),  # the last block ragged
            (6, 1, 1, 1, 1, 16, 1, None, torch.float32),  # a cache of one position
        ]
        checked = 0
        for seed, b, kv, rep, length, d, splits, block, dtype in cases:
            q, k, v, allowed = _case(seed, b, kv, rep, length, d, dtype)
            extent = torch.randint(1, length + 1, (b,), generator=torch.Generator().manual_seed(seed))
            for ext in (None, extent):
                want = dec.reference(q, k, v, allowed, 0.3, ext)
                for dot in (False, True):
                    got = dec.launch(q, k, v, allowed, 0.3, ext, splits=splits, block=block, dot=dot)
                    seen = torch.isfinite(want)  # a row whose extent cuts off all it may see has no value
                    assert torch.equal(torch.isfinite(got), seen)
                    tol = 1e-5 if dtype is torch.float32 else 2e-2
                    torch.testing.assert_close(got.float()[seen], want.float()[seen], atol=tol, rtol=tol)
                    checked += 1
        print("ok", checked)
        """
    )
    _in_the_interpreter(script, "ok 28")


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    length=st.integers(1, 40),
    data=st.data(),
)
def test_the_models_decoding_mask_allows_nothing_at_or_past_its_extent(b, length, data):
    """The extent lets `flash_decode` skip the unwritten cache; a wrong one would drop keys. Over random padding
    (rows that allow nothing included, which the model opens to every position) and positions."""
    from llamaforge.core.model import LlamaForgeModel

    pos = data.draw(st.integers(0, length - 1))
    seen = data.draw(st.lists(st.lists(st.booleans(), min_size=pos + 1, max_size=pos + 1), min_size=b, max_size=b))
    cache = type("Cache", (), {"max_length": length})()
    m = LlamaForgeModel._attention_mask(b, 1, torch.device("cpu"), torch.tensor(seen), cache, torch.tensor([pos]))
    assert m.extent is not None and m.extent.shape == (b,)
    beyond = torch.arange(length)[None, :] >= m.extent[:, None]
    assert not (m.mask.reshape(b, length) & beyond).any()
    assert ((1 <= m.extent) & (m.extent <= length)).all()
    q, k, v, _ = _case(0, b, 2, 2, length, 16)
    torch.testing.assert_close(
        dec.reference(q, k, v, m.mask.reshape(b, length), 0.25, m.extent),
        dec.reference(q, k, v, m.mask.reshape(b, length), 0.25),
    )


def test_flash_decode_route_check_traces_without_a_graph_break():
    """The route check runs inside the compiled decode step: past the device test it must be plain tensor-metadata
    logic that dynamo traces in one graph (no importlib lookup per call)."""
    q, k, _, _ = _case(0, 1, 8, 4, 64, 64, torch.float32)

    def routed(q, k):
        return q * 2 if dec.TRITON_OPS and dec.supported(q, k) else q - 1

    out = torch.compile(routed, fullgraph=True, backend="eager")(q, k)  # fullgraph: a break would raise
    assert torch.equal(out, routed(q, k))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda_matches_the_reference(dtype):
    for seed, b, kv, rep, length, d in [(0, 1, 8, 4, 512, 64), (1, 4, 2, 3, 129, 32), (2, 32, 8, 4, 384, 64)]:
        q, k, v, allowed = (t.cuda() for t in _case(seed, b, kv, rep, length, d, dtype))
        extent = torch.randint(length // 2, length + 1, (b,), generator=torch.Generator().manual_seed(seed)).cuda()
        allowed[:, length // 2 - 1] = True  # every row sees something below its extent
        assert dec.available(q, k)
        tol = 2e-2 if dtype is torch.bfloat16 else 1e-5
        for ext in (None, extent):
            want = dec.reference(q, k, v, allowed, 0.125, ext).float()
            torch.testing.assert_close(dec.decode_attention(q, k, v, allowed, 0.125, ext).float(), want, atol=tol,
                                       rtol=tol)  # fmt: skip
            for dot in (False, True):  # dot: tensor cores in bf16 (fp32 stays off them)
                for splits in (1, 4):
                    got = dec.launch(q, k, v, allowed, 0.125, ext, splits=splits, block=64, dot=dot).float()
                    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", ["tiny", "1b-heads-bf16"])
def test_compiled_decoding_with_flash_decode_gives_the_sdpa_tokens(shape, caplog):
    """In one whole CUDA graph: no graph break, no fallback to eager decoding; in fp32 the sdpa tokens.
    `1b-heads-bf16` has the 1B model's attention layout (32 query heads of 64, 8 kv heads) in bf16, where the
    kernel once failed to compile inside the step (an fp64 scale) and decoding silently fell back to eager."""
    import logging

    from torch._dynamo.utils import counters

    import llamaforge
    from llamaforge.core import generation
    from llamaforge.core.generation import GenerationConfig, clear_sessions, generate

    spec = llamaforge.load_spec("tiny").with_updates(eos_token_id=None)
    if shape != "tiny":
        spec = spec.with_updates(dim=2048, n_heads=32, n_kv_heads=8, n_layers=2, ffn_hidden=512, dtype="bfloat16")
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=[])
    out = {}
    for kernel in ("sdpa", "flash_decode"):
        torch._dynamo.reset()
        counters.clear()
        model = llamaforge.build_model(spec.with_updates(attention_kernel=kernel), device="cuda", seed=0).eval()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out[kernel] = generate(model, prompts, config)
            session = next(iter(generation._sessions[model].values()))
            with torch.inference_mode():  # the session's buffers are inference tensors
                saved = (session.ids.clone(), session.cur.clone(), session.pos.clone())
                session.pos.fill_(session.plen)  # the step once more outside the graph, from the prompt's end (as
                session._body()  # the benchmarks' kernel tables run it)
                session._restore(saved)
        # no eager fallback of generation, no recompile-limit fallback of dynamo (an H200 kernel table of the 1B
        # step once showed eager RMSNorm kernels beside the compiled ones)
        noted = [r.getMessage()[-300:] for r in caplog.records if r.name.startswith(("llamaforge", "torch._dynamo"))]
        assert not noted, noted
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert all(s.graph is not None for s in generation._sessions[model].values())
        clear_sessions(model)
    if shape == "tiny":  # fp32: the same tokens (in bf16 near-tied logits of random weights may flip a greedy pick;
        # the kernel's values at this layout are checked against the reference above)
        assert out["flash_decode"] == out["sdpa"]


# ----- int8 GEMV -------------------------------------------------------------------------------------------------
def _int8_case(seed: int, rows: list[int], k: int, dtype=torch.float32):
    from llamaforge.plugins.quantizers import quantize_int8_rows

    g = torch.Generator().manual_seed(seed)
    weights, scales = zip(*(quantize_int8_rows(torch.randn(n, k, generator=g)) for n in rows), strict=True)
    return torch.randn(1, k, generator=g).to(dtype), list(weights), [s.to(dtype) for s in scales]


def _close_to(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_row_gemv_kernel_in_the_interpreter_matches_the_reference():
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import row_gemv
        from tests.test_kernels import _close_to, _int8_case
        cases = [  # (seed, rows of each matrix, columns, block_n, block_k, split-K, dtype)
            (0, [37], 100, 8, 64, 1, torch.float32),  # ragged rows and columns, two column steps
            (1, [64, 16, 16], 300, 16, 128, 1, torch.bfloat16),  # q/k/v-like: three matrices in one launch
            (2, [5, 3], 3, 4, 1024, 1, torch.float32),  # block_k clipped to the row length; partial blocks
            (3, [24, 8, 1], 256, 8, 256, 1, torch.float32),  # exact tiles, a one-row matrix last
            (4, [40], 512, 8, 64, 4, torch.float32),  # split-K: four slices of two tiles each
            (5, [24, 8, 8], 300, 8, 64, 3, torch.bfloat16),  # slices of whole tiles, the last one ragged
            (6, [16], 100, 8, 64, 8, torch.float32),  # more slices asked than tiles: two, none left empty
        ]
        for seed, rows, k, bn, bk, split, dtype in cases:
            x, weights, _ = _int8_case(seed, rows, k, dtype)
            for ws in (weights, [w.to(dtype) for w in weights]):  # int8 weights, and floating-point ones
                got = row_gemv.launch(x, ws, block_n=bn, block_k=bk, split=split)
                assert got.shape == (1, sum(rows)) and got.dtype == torch.float32
                _close_to(got, row_gemv.reference(x, ws), 1e-2 if dtype is torch.bfloat16 else 1e-5)
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 7")


def _sm90_global_loads(kernel, args: dict, constexprs: dict, num_warps: int) -> list[str]:
    """The global-memory load instructions of a Triton kernel compiled for an H100/H200 (sm_90) without a GPU."""
    return _global_loads(_sm90_ptx(kernel, args, constexprs, num_warps))


def _global_loads(ptx: str) -> list[str]:
    return re.findall(r"ld\.global(?:\.\w+)*", ptx)


def _sm90_ptx(kernel, args: dict, constexprs: dict, num_warps: int) -> str:
    """PTX of a Triton kernel compiled for an H100/H200 (sm_90) without a GPU, specialised as the launcher would
    be for `args` (pointer -> dtype string, integer -> value): 16-byte-aligned pointers, integers divisible by 16
    marked so unless the kernel excludes them from specialisation. Skips the test where this Triton cannot compile
    for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    runtime = {kernel.arg_names[j] if isinstance(j, int) else j for j in kernel.do_not_specialize or ()}
    signature, attrs = {}, {}
    # constexpr parameters left out take their defaults, as at a launch
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        signature[name] = value if isinstance(value, str) else "i32"
        if (isinstance(value, str) and value.startswith("*")) or (
            not isinstance(value, str) and name not in runtime and value % 16 == 0
        ):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
    except CompilationError:  # the kernel's own fault: a failure, not a reason to skip
        raise
    except Exception as exc:  # e.g. a Triton build without the NVIDIA backend's tools
        pytest.skip(f"Triton could not compile for sm_90 here: {type(exc).__name__}: {str(exc)[:200]}")
    return ptx


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "i8"])
def test_row_gemv_kernel_loads_weights_sixteen_bytes_at_a_time_on_hopper(dtype):
    """The kernel is bound by reading weights, so each thread must load them in 16-byte vectors. Compiled to PTX
    for sm_90 here (no GPU needed): a version that kept the row strides from being specialised loaded each value
    on its own (`ld.global.b16` / `ld.global.b8`) and ran slower than inductor in the H200 decode step."""

    from llamaforge.kernels import row_gemv

    k = 2048  # Llama-3.2-1B's width; q/k/v rows; k_chunk: a split-K of two
    args = {"x_ptr": "*bf16", "w0_ptr": f"*{dtype}", "w1_ptr": f"*{dtype}", "w2_ptr": f"*{dtype}", "y_ptr": "*fp32",
            "n0": 2048, "n1": 512, "n2": 512, "k_len": k, "sw0": k, "sw1": k, "sw2": k, "blocks0": 256,
            "blocks01": 320, "k_chunk": k // 2, "sy": 3072}  # fmt: skip
    constexprs = {"BLOCK_N": row_gemv._BLOCK_N, "BLOCK_K": 1024, "INT8": dtype == "i8"}
    ptx = _sm90_ptx(row_gemv._kernel(), args, constexprs, row_gemv._WARPS)
    loads = _global_loads(ptx)
    assert any(".v4." in ld for ld in loads), loads
    assert not [ld for ld in loads if ld.endswith((".b8", ".b16", ".u8", ".u16", ".s8"))], loads
    # int8 values become fp32 through their float bits, not one integer-to-float conversion (I2F) each
    assert not re.findall(r"cvt\.rn\.f32\.[su]", ptx)


def _decode_attention_ptx(scale: str = "fp32", **constexprs) -> str:
    """The flash-decoding kernel's sm_90 PTX at the 1B shape (8 kv heads of 64, 4 query heads each; a cache of
    2,048 positions; an int64 extent as the model makes it)."""
    from llamaforge.kernels import decode_attention

    t = 2048
    args = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "ok_ptr": "*u8", "ext_ptr": "*i64", "m_ptr": "*fp32",
            "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16", "scale": scale, "length": t, "sq_b": 2048,
            "sq_h": 64, "sk_b": 8 * t * 64, "sk_h": t * 64, "sk_l": 64, "sv_b": 8 * t * 64, "sv_h": t * 64, "sv_l": 64,
            "sok_b": t, "so_b": 2048, "so_h": 64}  # fmt: skip
    settings = {"KV_HEADS": 8, "REP": 4, "REP_P": 4, "D": 64, "BLOCK": 32, "SPLITS": 2, "EXTENT": True, "DOT": False}
    settings.update(constexprs)
    return _sm90_ptx(decode_attention._kernels()[0], args, settings, decode_attention._WARPS)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("scale", ["fp32", "fp64"])
@pytest.mark.parametrize("dot", [False, True])
def test_flash_decode_kernel_compiles_whatever_float_type_the_scale_arrives_as(scale, dot):
    """Inside torch.compile (inductor's launch of the custom op, H200, 1B shape) the softmax scale reached the kernel
    as fp64, the scores were promoted to fp64, and Triton rejected the loop (the running maximum changed type), so
    decoding with `flash_decode` silently fell back to eager. The kernel keeps the scaled scores in fp32."""
    constexprs = {"REP_P": 16, "BLOCK": 64, "DOT": True} if dot else {"SPLITS": 16}
    assert _global_loads(_decode_attention_ptx(scale, **constexprs))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_flash_decode_kernel_loads_keys_and_values_sixteen_bytes_at_a_time_on_hopper():
    """The cache rows are read in 16-byte vectors (only the byte mask and the extent a value at a time); with
    tensor-core products (`DOT`) they are copied to shared memory asynchronously (cp.async: the loop's next blocks
    load while this one is computed) and the products are mma instructions."""
    loads = _global_loads(_decode_attention_ptx())
    assert sum(".v4." in ld for ld in loads) >= 2, loads  # keys and values
    assert not [ld for ld in loads if ld.endswith((".b16", ".u16"))], loads  # no bf16 read one value at a time
    ptx = _decode_attention_ptx(REP_P=16, BLOCK=64, DOT=True, SPLITS=1)
    assert len(re.findall(r"cp\.async\.\w+\.shared\.global [^;]*, 0x10", ptx)) >= 2, "no 16-byte async copies"
    assert "mma.sync" in ptx
    assert not [ld for ld in _global_loads(ptx) if ld.endswith((".b16", ".u16"))]


def test_row_gemv_launch_settings_come_from_the_measured_table_else_the_defaults(monkeypatch):
    from llamaforge.kernels import row_gemv

    qkv = [torch.zeros(2048, 64, dtype=torch.int8), torch.zeros(512, 64, dtype=torch.int8)]
    defaults = (row_gemv._BLOCK_N, row_gemv._BLOCK_K, row_gemv._WARPS)
    assert row_gemv.settings_for(qkv, 64) == defaults
    monkeypatch.setattr(row_gemv, "_SETTINGS", {(1, 2560, 64): (16, 512, 4)})
    assert row_gemv.settings_for(qkv, 64) == (16, 512, 4)
    assert row_gemv.settings_for([w.to(torch.bfloat16) for w in qkv], 64) == defaults  # bf16: another entry


def test_row_gemv_route_is_per_product_from_the_measured_table_unless_forced(monkeypatch):
    """By default (None) only the products measured faster on this GPU go to the kernel, with their measured
    launch settings; True/False force every product of that weight kind on or off; hand-set settings win."""
    from llamaforge.kernels import row_gemv

    down_bf16 = [torch.zeros(96, 64, dtype=torch.bfloat16)]
    gate_up_bf16 = [torch.zeros(128, 64, dtype=torch.bfloat16)] * 2
    qkv_int8 = [torch.zeros(64, 64, dtype=torch.int8)] * 3
    table = {(2, 96, 64): (4, 64, 4), (1, 192, 64): (8, 32, 2)}
    monkeypatch.setattr(row_gemv, "_measured_here", lambda device: table)
    monkeypatch.setattr(row_gemv, "INT8", None)
    monkeypatch.setattr(row_gemv, "FLOAT", None)
    triton = hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None
    assert row_gemv.route_available(down_bf16, 64) is triton
    assert row_gemv.route_available(qkv_int8, 64) is triton
    assert row_gemv.route_available(gate_up_bf16, 64) is False  # not measured faster: inductor keeps it
    assert row_gemv.settings_for(down_bf16, 64) == (4, 64, 4)
    assert row_gemv.settings_for(gate_up_bf16, 64) == (row_gemv._BLOCK_N, row_gemv._BLOCK_K, row_gemv._WARPS)
    monkeypatch.setattr(row_gemv, "_SETTINGS", {(2, 96, 64): (16, 64, 8)})
    assert row_gemv.settings_for(down_bf16, 64) == (16, 64, 8)
    monkeypatch.setattr(row_gemv, "FLOAT", True)
    assert row_gemv.route_available(gate_up_bf16, 64) is triton
    monkeypatch.setattr(row_gemv, "FLOAT", False)
    assert row_gemv.route_available(down_bf16, 64) is False
    assert row_gemv.route_available(qkv_int8, 64) is triton  # the int8 switch is separate
    monkeypatch.setattr(row_gemv, "INT8", False)
    assert row_gemv.route_available(qkv_int8, 64) is False


def test_row_gemv_measured_table_applies_only_to_its_gpu_architecture(monkeypatch):
    from llamaforge.kernels import row_gemv

    assert row_gemv._measured_here(torch.device("cpu")) == {}
    assert row_gemv._measured_here(torch.device("meta")) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(row_gemv, "_MEASURED", {(9, 0): {(2, 2048, 8192): (4, 2048, 4)}})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert row_gemv._measured_here(torch.device("cuda")) == {}  # measured on an H200 (9.0), not an A100
    table = {(2, 2048, 8192): (4, 2048, 4)}
    monkeypatch.setattr(row_gemv, "_MEASURED", {(9, 0): table})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert row_gemv._measured_here(torch.device("cuda")) == table


def test_gemv_pass_cache_key_follows_the_row_gemv_launch_settings(monkeypatch):
    """A graph compiled with one launch setting must not come back from inductor's cache under another."""
    from llamaforge.core import generation
    from llamaforge.kernels import row_gemv

    before, block_k = generation._gemv_pass().uuid(), row_gemv._BLOCK_K
    monkeypatch.setattr(row_gemv, "_BLOCK_K", block_k * 2)
    assert generation._gemv_pass().uuid() != before
    monkeypatch.setattr(row_gemv, "_BLOCK_K", block_k)
    assert generation._gemv_pass().uuid() == before
    monkeypatch.setattr(row_gemv, "_SETTINGS", {(2, 3072, 2048): (16, 512, 4)})
    assert generation._gemv_pass().uuid() != before
    monkeypatch.setattr(row_gemv, "_SETTINGS", {})
    monkeypatch.setattr(row_gemv, "FLOAT", True)  # the routing, too
    assert generation._gemv_pass().uuid() != before


def test_decode_cache_key_follows_the_fused_kernels_launch_settings(monkeypatch):
    """The fused decode kernels' settings are read while torch.compile traces their Triton ops, which inductor's
    on-disk cache does not key on (an H200 run replayed the default kernel for other settings): the decode pass's
    uuid, which it does key on, carries them."""
    from llamaforge.core import generation
    from llamaforge.kernels import decode_attention, gate_up, qkv_rope, residual_gemv

    before = generation._gemv_pass().uuid()
    for module, name, value in ((qkv_rope, "_PAIRS", 2), (qkv_rope, "_BLOCK_K", 2048), (qkv_rope, "_WARPS", 8),
                                (qkv_rope, "_ONE_PASS", not qkv_rope._ONE_PASS), (gate_up, "_BLOCK_N", 16),
                                (gate_up, "_BLOCK_K", 2048), (gate_up, "_WARPS", 8), (decode_attention, "_SPLITS", 3),
                                (decode_attention, "_BLOCK", 128), (decode_attention, "_WARPS", 2),
                                (decode_attention, "_DOT", not decode_attention._DOT),
                                (residual_gemv, "_DEFAULT", (8, 512, 4)),
                                (residual_gemv, "_SETTINGS", {}), (gate_up, "_SETTINGS", {}),
                                (gate_up, "_DEFAULT", (8, 512, 4))):  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(module, name, value)
            assert generation._gemv_pass().uuid() != before, name
    assert generation._gemv_pass().uuid() == before


def _pass_input_graph(layer, args, form: str) -> torch.fx.GraphModule:
    """`layer` as inductor's aten graph, the graph the decode pass gets: `mm` gives one-row products as `mm` (the
    CPU's form); `decomposed` traces on the meta device with coordinate-descent tuning on, where inductor's own
    decomposition has already turned each into `sum(row[:, :, None] * W.T[None], 1)` (the form on a GPU)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = args if form == "mm" else [a.to("meta") for a in args]
    with inductor_config.patch(coordinate_descent_tuning=form == "decomposed"):
        return make_fx(layer, decomposition_table=select_decomp_table(), tracing_mode="fake")(*traced)


@pytest.mark.parametrize(
    ("dtype", "int8", "rewritten"),
    [
        (torch.float32, False, True),
        (torch.float32, True, True),  # int8 weight-only: the widening fuses into the reduction
        (torch.bfloat16, False, False),  # oneDNN's bf16 products (AMX / AVX-512 BF16) beat the reduction on a CPU
        (torch.float16, False, False),
    ],
)
def test_gemv_pass_on_a_cpu_rewrites_fp32_and_int8_products_only(dtype, int8, rewritten):
    """On this 2-core CPU (~100M spec, batch 1, compiled decoding) the pass took fp32 decoding from 31-32 to 55-60
    tok/s and int8 weight-only from 18 to 95, and bf16 from 68.5 down to 56.7: so on a CPU it leaves 16-bit weights
    alone."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    x, weights, scales = _int8_case(9, [24, 8], 32, dtype)
    if not int8:
        weights = [(q.float() * s.float()[:, None]).to(dtype) for q, s in zip(weights, scales, strict=True)]

    def layer(x, w0, w1):
        return tuple(F.linear(x, w.to(x.dtype)) for w in (w0, w1))

    args = (x.reshape(1, 1, -1), *weights)
    gm = _pass_input_graph(layer, args, "mm")
    before = generation._gemv_rewrites[0]
    generation._gemv_pass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert generation._gemv_rewrites[0] - before == (2 if rewritten else 0)
    assert any(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes) is not rewritten
    for got, want in zip(gm(*args), layer(*args), strict=True):
        torch.testing.assert_close(got, want, atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


def _count(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(n.target is target for n in gm.graph.nodes)


def _rms_normed(x: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    """RMSNorm as the model writes it (fp32 statistics, cast back, then the weight)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * norm_w


@pytest.mark.parametrize(
    ("form", "flag", "folded"),
    [("mm", None, True), ("mm", False, False), ("decomposed", None, False), ("decomposed", True, True)],
)
def test_gemv_pass_folds_an_rmsnorm_into_its_products_on_cpus(form, flag, folded, monkeypatch):
    """By default on a CPU (`mm`, the CPU's form) the RMSNorm before one-row products is applied after them, in
    their reduction: no mean is left for inductor, and in fp32 the values are eager's. The GPU form keeps the
    norm unless the switch is on (the H200 measured no gain; see generation._gemv_pass)."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    g = torch.Generator().manual_seed(4)
    args = (torch.randn(1, 1, 40, generator=g), torch.rand(40, generator=g) + 0.5, torch.randn(24, 40, generator=g),
            torch.randn(8, 40, generator=g))  # fmt: skip

    def layer(x, norm_w, wq, wk):  # RMSNorm, then two products of its row (q and k)
        h = _rms_normed(x, norm_w)
        return F.linear(h, wq), F.linear(h, wk)

    monkeypatch.setattr(generation, "_FOLD_NORM", flag)
    gm = _pass_input_graph(layer, args, form)
    assert _count(gm, torch.ops.aten.mean.dim) == 1
    generation._gemv_pass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert _count(gm, torch.ops.aten.mean.dim) == (0 if folded else 1)
    assert _count(gm, torch.ops.aten.cat.default) == 1  # q and k (different widths) still one stacked reduction
    if form == "mm":
        for got, want in zip(gm(*args), layer(*args), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gemv_pass_folds_a_bf16_rmsnorm_through_its_casts(monkeypatch):
    """bf16 (the GPU form, with the fold switched on): the norm's casts are looked through, and the folded product
    reads the bf16 row itself, before its fp32 cast."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    aten = torch.ops.aten
    g = torch.Generator().manual_seed(8)
    x, norm_w = torch.randn(1, 1, 40, generator=g).bfloat16(), (torch.rand(40, generator=g) + 0.5).bfloat16()
    args = (x, norm_w, torch.randn(24, 40, generator=g).bfloat16())

    def layer(x, norm_w, w):
        return F.linear(_rms_normed(x, norm_w), w)

    monkeypatch.setattr(generation, "_FOLD_NORM", True)
    gm = _pass_input_graph(layer, args, "decomposed")
    before = generation._gemv_rewrites[0]
    generation._gemv_pass()(gm.graph)
    gm.graph.lint()
    assert generation._gemv_rewrites[0] == before + 1 and _count(gm, aten.mean.dim) == 0
    rows = [n for n in gm.graph.nodes if n.target is aten.as_strided.default]
    assert len(rows) == 1 and rows[0].args[0].op == "placeholder"  # the bf16 input row, buffered as it is


@pytest.mark.parametrize(
    ("form", "flag", "stacked"),
    [("mm", None, False), ("mm", False, True), ("decomposed", None, True), ("decomposed", True, False)],
)
def test_gemv_pass_keeps_equal_width_siblings_apart_on_cpus(form, flag, stacked, monkeypatch):
    """gate/up-like products (one row, equal widths) stay two reductions on a CPU by default, which inductor fuses
    with SiLU(gate)*up; on the GPU form they are stacked into one, unless the switch says otherwise."""
    from torch.nn import functional as F

    from llamaforge.core import generation

    g = torch.Generator().manual_seed(6)
    args = (torch.randn(1, 1, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, 40, generator=g))

    def mlp(x, wg, wu):
        return F.silu(F.linear(x, wg)) * F.linear(x, wu)

    monkeypatch.setattr(generation, "_UNSTACK_EQUAL", flag)
    gm = _pass_input_graph(mlp, args, form)
    before = generation._gemv_rewrites[0]
    generation._gemv_pass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert generation._gemv_rewrites[0] == before + 2
    assert _count(gm, torch.ops.aten.cat.default) == (1 if stacked else 0)
    if form == "mm":
        torch.testing.assert_close(gm(*args), mlp(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["mm", "decomposed"])
@pytest.mark.parametrize("kind", ["int8", "float"])
def test_gemv_pass_hands_sibling_products_to_the_kernel_op_in_one_call(kind, form, monkeypatch):
    """With the kernel switched on for the weights' kind, the decode graph pass replaces the products sharing a row
    (q/k/v) by one call of the row GEMV op (int8 scales stay in the graph), and the graph computes what it did
    before; switched on only for the other kind, the graph keeps its reductions (the pass's own, stacked).

    `decomposed`: the graph the pass gets on a GPU, where inductor (with coordinate-descent tuning, as the decode
    step compiles) has already turned each one-row `mm` into `sum(row[:, :, None] * W.T[None], 1)` in fp32; traced
    here on the meta device, which that decomposition treats as a GPU. The pass once matched only `mm` and so did
    nothing on GPUs."""
    from torch.nn import functional as F

    from llamaforge.core import generation
    from llamaforge.kernels import row_gemv

    x, weights, scales = _int8_case(5, [32, 8, 8], 40)
    if kind == "int8":

        def layer(x, q0, q1, q2, s0, s1, s2):  # three int8 weight-only layers reading one row
            return tuple(F.linear(x, q.to(x.dtype)) * s.to(x.dtype) for q, s in ((q0, s0), (q1, s1), (q2, s2)))

        args = (x.reshape(1, 1, 40), *weights, *scales)
    else:

        def layer(x, w0, w1, w2):
            return tuple(F.linear(x, w) for w in (w0, w1, w2))

        args = (x.reshape(1, 1, 40), *(w.float() * s[:, None] for w, s in zip(weights, scales, strict=True)))

    aten = torch.ops.aten

    def calls(switched_on: bool) -> tuple[list, torch.fx.GraphModule]:
        # switched on for this kind of weights, or only for the other kind
        def route(ws, k):
            return ((ws[0].dtype == torch.int8) == (kind == "int8")) == switched_on

        monkeypatch.setattr(row_gemv, "route_available", route)
        gm = _pass_input_graph(layer, args, form)
        assert _count(gm, aten.mm.default) == (3 if form == "mm" else 0)
        before = generation._gemv_rewrites[0]
        generation._gemv_pass()(gm.graph)
        assert generation._gemv_rewrites[0] == before + 3
        gm.graph.lint()
        gm.recompile()
        left = [n for n in gm.graph.nodes if n.target is aten.mm.default or (n.target is aten.sum.dim_IntList
                and list(n.args[1]) == [1])]  # fmt: skip
        assert left == []  # the products, in either form, are gone (and what only they used)
        return [n for n in gm.graph.nodes if n.target is torch.ops.llamaforge.gemv_rows.default], gm

    for switched_on in (True, False):
        found, gm = calls(switched_on)
        if switched_on:
            assert len(found) == 1 and len(found[0].args[1]) == 3
        else:
            assert found == [] and _count(gm, aten.cat.default) == 1  # stacked
        for got, want in zip(gm(*args), layer(*args), strict=True):  # the op's CPU kernel is the reference
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_row_gemv_settings_specialise_symbolic_sizes(monkeypatch):
    """Compiled with dynamic shapes (a second call with other sizes), the op sees SymInt sizes: the launch setting
    is still found, by specialising on them (a guard) rather than failing to hash them (H200, 2026-12-02)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from llamaforge.kernels import row_gemv

    monkeypatch.setitem(row_gemv._SETTINGS, (1, 2048 + 512, 2048), (4, 2048, 4, 2))
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    dynamic_rows = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    weights = [mode.from_tensor(torch.zeros(n, 2048, dtype=torch.int8), symbolic_context=dynamic_rows)
               for n in (2048, 512)]  # fmt: skip
    assert all(isinstance(w.size(0), torch.SymInt) for w in weights)
    assert row_gemv.settings_for(weights, 2048) == (4, 2048, 4, 2)
    assert len(env.guards) == 2  # one per row count: the graph is only reused at these sizes


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("split", [1, 4])
def test_row_gemv_on_cuda_matches_the_reference_at_llama_shapes(split, monkeypatch):
    """Also with split-K (four slices of each row's length, summed by the op), through the custom op."""
    from llamaforge.kernels import row_gemv

    monkeypatch.setattr(row_gemv, "_SPLIT_K", split)
    cases = [([2048, 512, 512], 2048), ([8192, 8192], 2048), ([2048], 8192), ([128256], 2048), ([1000], 300)]
    for seed, (rows, k) in enumerate(cases):
        x, weights, _ = _int8_case(seed, rows, k, torch.bfloat16)
        x, weights = x.cuda(), [w.cuda() for w in weights]
        _close_to(row_gemv.gemv_rows(x, weights), row_gemv.reference(x, weights), 1e-2)
        compiled = torch.compile(row_gemv.gemv_rows)  # traced into a graph: the slices' sum included
        _close_to(compiled(x, weights), row_gemv.reference(x, weights), 1e-2)


@pytest.mark.gpu
@cuda
def test_compiled_int8_decoding_through_the_gemv_kernel_gives_the_matmul_tokens(monkeypatch):
    import llamaforge
    from llamaforge.core.generation import GenerationConfig, clear_sessions, generate
    from llamaforge.core.loading import apply_transform
    from llamaforge.kernels import row_gemv

    spec = llamaforge.load_spec("tiny").with_updates(eos_token_id=None)
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=[])
    out = {}
    for enabled in (False, True):
        monkeypatch.setattr(row_gemv, "INT8", enabled)
        torch._dynamo.reset()
        model = apply_transform(llamaforge.build_model(spec, device="cuda", seed=0).eval(), "quantizer",
                                "int8_weight_only")  # fmt: skip
        out[enabled] = generate(model, [[3, 4, 5]], config)
        clear_sessions(model)
    assert out[True] == out[False]


# ----- fused q/k/v + RoPE + cache write (llamaforge.kernels.qkv_rope) -----------------------------------------------
def _qkv_case(seed: int, hq: int, hkv: int, d: int, k: int, length: int, pos: int, dtype=torch.float32,
              int8: bool = False):  # fmt: skip
    """Inputs of the fused q/k/v op; with int8, weights quantized per row and their scales appended."""
    from llamaforge.plugins.quantizers import quantize_int8_rows

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    weights = [(torch.randn(h * d, k, generator=g) / k**0.5).to(dtype) for h in (hq, hkv, hkv)]
    angle = torch.rand(d // 2, generator=g) * 6
    cos = torch.cat((angle.cos(), angle.cos())).to(dtype)
    sin = torch.cat((-angle.sin(), angle.sin())).to(dtype)  # rotate-half's sign folded in, as RotaryEmbedding does
    kc, vc = (torch.randn(1, hkv, length, d, generator=g).to(dtype) for _ in range(2))
    case = [x, *weights, cos, sin, kc, vc, torch.tensor([pos])]
    if int8:
        quantized = [quantize_int8_rows(w) for w in weights]
        case[1:4] = [q for q, _ in quantized]
        case.append(tuple(sc.to(dtype) for _, sc in quantized))
    return case


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    hkv=st.integers(1, 3),
    rep=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([8, 16, 64]),
    k=st.integers(2, 80),
    length=st.integers(1, 12),
    int8=st.booleans(),
    fold=st.booleans(),
    data=st.data(),
)
def test_qkv_rope_reference_is_the_attention_modules_projection_rope_and_cache_write(seed, hkv, rep, d, k, length,
                                                                                     int8, fold, data):  # fmt: skip
    """The reference (what the kernel computes) against the module's own steps: the block's RMSNorm when it is
    folded in, three linears (plain, or int8 weight-only through Int8Linear), RotaryEmbedding's rotation, the static
    cache's write; the cache rows other than the step's position are left alone."""
    from llamaforge.core.cache import StaticKVCache
    from llamaforge.kernels import qkv_rope
    from llamaforge.plugins.norms import RMSNorm
    from llamaforge.plugins.positions import RotaryEmbedding
    from llamaforge.plugins.quantizers import Int8Linear

    pos = data.draw(st.integers(0, length - 1))
    x, wq, wk, wv, _, _, kc, vc, position = _qkv_case(seed, hkv * rep, hkv, d, k, length, pos)[:9]
    scales = None
    linears = [lambda t, w=w: torch.nn.functional.linear(t, w) for w in (wq, wk, wv)]
    if int8:
        modules = [Int8Linear.from_float(w, None, dynamic=False) for w in (wq, wk, wv)]
        wq, wk, wv = (m.weight for m in modules)
        scales = tuple(m.weight_scale for m in modules)
        linears = modules
    rope = RotaryEmbedding(d, 16, 10000.0)
    cos, sin = rope(torch.tensor([[pos + 3]]), torch.float32)
    cache = StaticKVCache(n_layers=1, batch_size=1, n_kv_heads=hkv, head_dim=d, max_length=length, device="cpu",
                          dtype=torch.float32)  # fmt: skip
    cache.keys[0].copy_(kc)
    cache.values[0].copy_(vc)
    norm, row = None, x
    if fold:
        rms = RMSNorm(k, eps=1e-5)
        with torch.no_grad():
            rms.weight.uniform_(0.5, 1.5)
        norm, row = (rms.weight.detach(), rms.eps), rms(x).detach()
    q = linears[0](row).view(1, 1, hkv * rep, d).transpose(1, 2)
    kk = linears[1](row).view(1, 1, hkv, d).transpose(1, 2)
    vv = linears[2](row).view(1, 1, hkv, d).transpose(1, 2)
    q, kk = rope.apply(q, kk, (cos, sin))
    want_k, want_v = cache.update(0, kk, vv, position)
    got = qkv_rope.reference(x, wq, wk, wv, cos.reshape(-1), sin.reshape(-1), kc, vc, position, scales, norm)
    torch.testing.assert_close(got, q.transpose(1, 2).reshape(1, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc, want_v, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_qkv_rope_kernel_in_the_interpreter_matches_the_reference():
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import qkv_rope
        from tests.test_kernels import _qkv_case
        cases = [  # (seed, q heads, kv heads, head size, width, cache length, position, dtype, int8 weights)
            (0, 8, 2, 64, 256, 16, 5, torch.float32, False),  # grouped query heads, several column steps
            (1, 4, 4, 16, 100, 7, 6, torch.float32, False),  # one kv head per query head; ragged; last position
            (2, 6, 2, 32, 300, 9, 0, torch.bfloat16, False),
            (3, 2, 1, 64, 64, 4, 3, torch.bfloat16, False),
            (4, 8, 2, 64, 256, 16, 5, torch.float32, True),  # int8 weight-only, scales in fp32
            (5, 6, 2, 32, 300, 9, 8, torch.bfloat16, True),
        ]
        for seed, hq, hkv, d, k, length, pos, dtype, int8 in cases:
            x, wq, wk, wv, cos, sin, kc, vc, position, *scales = _qkv_case(seed, hq, hkv, d, k, length, pos, dtype,
                                                                           int8)
            scales = scales[0] if scales else None
            g = (torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype)
            for norm in (None, (g, 1e-5)):  # an RMSNorm folded in: its statistics over the row in every program
                want_k, want_v = kc.clone(), vc.clone()
                want = qkv_rope.reference(x, wq, wk, wv, cos, sin, want_k, want_v, position, scales, norm)
                for pairs, block_k, one_pass in ((4, 64, False), (8, 128, False), (2, 1024, False), (4, 64, True)):
                    got_k, got_v = kc.clone(), vc.clone()
                    got = qkv_rope.launch(x, wq, wk, wv, cos, sin, got_k, got_v, position, scales, norm, pairs=pairs,
                                          block_k=block_k, warps=2, one_pass=one_pass)
                    tol = 2e-2 if dtype is torch.bfloat16 else 1e-5
                    for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
                        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
                    untouched = torch.arange(length) != pos
                    assert torch.equal(got_k[:, :, untouched], kc[:, :, untouched])
                    assert torch.equal(got_v[:, :, untouched], vc[:, :, untouched])
            # a position past the cache (the generation loop never gives one): q as usual, no store anywhere
            got_k, got_v = kc.clone(), vc.clone()
            got = qkv_rope.launch(x, wq, wk, wv, cos, sin, got_k, got_v, torch.tensor([length]), scales, None,
                                  warps=2)
            want = qkv_rope.reference(x, wq, wk, wv, cos, sin, kc.clone(), vc.clone(), position, scales, None)
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
            assert torch.equal(got_k, kc) and torch.equal(got_v, vc)
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 6")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_qkv_rope_attention_kernel_in_the_interpreter_matches_the_reference():
    """With the attention folded in: the output of the last program of each group (the interpreter runs programs one
    after another, so that is the group's last in launch order) against the reference, with a mask with holes, an
    extent below the cache's length, grouped and ungrouped heads, int8 weights, a folded norm, loop steps shorter
    and longer than the positions in use; the counters are back at zero after every launch."""
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import qkv_rope
        from tests.test_kernels import _qkv_case
        cases = [  # (seed, q heads, kv heads, head size, width, cache length, position, dtype, int8 weights)
            (0, 8, 2, 64, 256, 16, 5, torch.float32, False),
            (1, 4, 4, 16, 100, 7, 6, torch.float32, False),  # one kv head per query head; the last position
            (2, 6, 2, 32, 300, 9, 0, torch.float16, False),  # tensor-core products (fp16: see the test above)
            (3, 8, 1, 64, 64, 300, 200, torch.float16, False),  # several loop steps
            (4, 8, 2, 64, 256, 16, 5, torch.float32, True),
            (5, 6, 2, 32, 300, 40, 33, torch.float16, True),
        ]
        for seed, hq, hkv, d, k, length, pos, dtype, int8 in cases:
            x, wq, wk, wv, cos, sin, kc, vc, position, *scales = _qkv_case(seed, hq, hkv, d, k, length, pos, dtype,
                                                                           int8)
            scales = scales[0] if scales else None
            g = torch.Generator().manual_seed(seed)
            allowed = torch.rand(1, length, generator=g) < 0.7  # holes, and allowed positions past the extent
            allowed[0, pos] = True
            extent, sync, scale = torch.tensor([pos + 1]), torch.zeros(hkv + 1, dtype=torch.int32), d**-0.5
            for norm in (None, ((torch.rand(k, generator=g) + 0.5).to(dtype), 1e-5)):
                want_k, want_v = kc.clone(), vc.clone()
                want = qkv_rope.attention_reference(x, wq, wk, wv, cos, sin, want_k, want_v, position, allowed,
                                                    extent, scale, scales, norm)
                for block_l in (16, 128):
                    got_k, got_v = kc.clone(), vc.clone()
                    got = qkv_rope.launch(x, wq, wk, wv, cos, sin, got_k, got_v, position, scales, norm, warps=2,
                                          block_k=64, attend=(allowed, extent, sync, scale), block_l=block_l)
                    tol = 1e-5 if dtype is torch.float32 else 2e-2
                    for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
                        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
                    assert not sync.any()
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 6")


def _qkv_ptx_args(dtype: str) -> dict:
    """The q/k/v kernel's runtime arguments at Llama-3.2-1B's shape (width 2,048, a 2,048-position cache) for
    `_sm90_ptx`, its weights in `dtype`."""
    k, t = 2048, 2048
    return {"x_ptr": "*bf16", "wq_ptr": f"*{dtype}", "wk_ptr": f"*{dtype}", "wv_ptr": f"*{dtype}", "sq_ptr": "*bf16",
            "sk_ptr": "*bf16", "sv_ptr": "*bf16", "cos_ptr": "*bf16", "g_ptr": "*bf16", "eps": "fp32",
            "sin_ptr": "*bf16", "q_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "pos_ptr": "*i64", "k_len": k,
            "swq": k, "swk": k, "swv": k, "progs_q": 256, "progs_qk": 320, "kc_head": t * 64, "kc_pos": 64,
            "vc_head": t * 64, "vc_pos": 64, "cache_len": t, "ok_ptr": "*u8", "ext_ptr": "*i64", "o_ptr": "*bf16",
            "sync_ptr": "*i32", "scale": "fp32"}  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(
    ("dtype", "norm", "one_pass", "attn"),
    [("bf16", False, False, False), ("i8", False, False, False), ("bf16", True, False, False),
     ("bf16", True, True, False), ("bf16", True, True, True), ("i8", True, True, True)],
)  # fmt: skip
def test_qkv_rope_kernel_loads_weights_sixteen_bytes_at_a_time_on_hopper(dtype, norm, one_pass, attn):
    """Also with the attention folded in, which must count its programs with a gpu-scope acquire-release atomic and
    run its block products on tensor cores."""
    from llamaforge.kernels import qkv_rope

    args = _qkv_ptx_args(dtype)
    constexprs = {"HALF": 32, "PAIRS": qkv_rope._PAIRS, "BLOCK_K": qkv_rope._BLOCK_K, "INT8": dtype == "i8",
                  "NORM": norm, "ONE_PASS": one_pass, "ATTN": attn, "REP": 4, "REP_P": 16,
                  "BLOCK_L": qkv_rope._BLOCK_L, "DOT": attn}  # fmt: skip
    ptx = _sm90_ptx(qkv_rope._kernel(), args, constexprs, qkv_rope._WARPS)
    loads = _global_loads(ptx)
    assert any(".v4." in ld for ld in loads), loads
    # byte loads: none, but the attention's mask (a byte per position and thread, in the software-pipelined loop's
    # prologue and body)
    assert len([ld for ld in loads if ld.endswith((".b8", ".u8", ".s8"))]) <= (4 if attn else 0), loads
    if dtype == "i8":  # int8 widened through the float's bits, no I2F per value (a folded norm converts its width)
        assert not re.findall(r"cvt\.rn\.f32\.[su]8", ptx) and len(re.findall(r"cvt\.rn\.f32\.[su]32", ptx)) <= norm
    assert bool(re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)) == attn
    assert ("mma.sync" in ptx or "wgmma" in ptx) == attn


@pytest.mark.gpu
@cuda
def test_qkv_rope_on_cuda_matches_the_reference_at_llama_shapes():
    """The op on CUDA (eagerly and traced by torch.compile) at the 1B and 8B attention shapes, bf16."""
    from llamaforge.kernels import qkv_rope

    shapes = [(32, 8, 2048, False, False), (32, 8, 4096, False, False), (6, 2, 300, False, True),
              (32, 8, 2048, True, False), (32, 8, 2048, True, True)]  # fmt: skip
    for seed, (hq, hkv, k, int8, fold) in enumerate(shapes):
        case = _qkv_case(seed, hq, hkv, 64, k, 384, 100 + seed, torch.bfloat16, int8)
        x, wq, wk, wv, cos, sin, kc, vc, position = (t.cuda() for t in case[:9])
        scales = tuple(sc.cuda() for sc in case[9]) if int8 else None
        norm = ((torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16), 1e-5) if fold else None
        want_k, want_v = kc.clone(), vc.clone()
        want = qkv_rope.reference(x, wq, wk, wv, cos, sin, want_k, want_v, position, scales, norm)
        for fn in (qkv_rope.qkv_rope_cache, torch.compile(qkv_rope.qkv_rope_cache)):
            got_k, got_v = kc.clone(), vc.clone()
            got = fn(x, wq, wk, wv, cos, sin, got_k, got_v, position, scales, norm)
            for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
                _close_to(a, b, 1e-2)


@pytest.mark.gpu
@cuda
def test_qkv_rope_attention_on_cuda_matches_the_reference_at_llama_shapes():
    """With the attention folded in, on CUDA (eagerly and traced by torch.compile; three calls each, so a counter left
    behind by one launch would break the next), at the 1B attention shape, bf16 and int8 weights, a folded norm, the
    benchmark's 384-position cache and a 1,024-position one, a mask with holes."""
    from llamaforge.kernels import qkv_rope

    shapes = [(384, 100, False, False), (384, 300, True, True), (1024, 900, False, True), (1024, 3, True, False)]
    for seed, (length, pos, int8, fold) in enumerate(shapes):
        case = _qkv_case(seed, 32, 8, 64, 2048, length, pos, torch.bfloat16, int8)
        x, wq, wk, wv, cos, sin, kc, vc, position = (t.cuda() for t in case[:9])
        scales = tuple(sc.cuda() for sc in case[9]) if int8 else None
        norm = ((torch.rand(2048, device="cuda") + 0.5).to(torch.bfloat16), 1e-5) if fold else None
        allowed = torch.rand(1, 1, 1, length, device="cuda") < 0.8
        allowed[..., pos] = True
        extent, sync = torch.tensor([pos + 1], device="cuda"), torch.zeros(8, dtype=torch.int32, device="cuda")
        want_k, want_v = kc.clone(), vc.clone()
        want = qkv_rope.attention_reference(x, wq, wk, wv, cos, sin, want_k, want_v, position, allowed, extent,
                                            0.125, scales, norm)  # fmt: skip
        for fn in (qkv_rope.qkv_rope_attention, torch.compile(qkv_rope.qkv_rope_attention)):
            for _ in range(3):
                got_k, got_v = kc.clone(), vc.clone()
                got = fn(x, wq, wk, wv, cos, sin, got_k, got_v, position, allowed, extent, sync, 0.125, scales, norm)
                for a, b in ((got, want), (got_k, want_k), (got_v, want_v)):
                    _close_to(a, b, 1e-2)
                assert not sync.any()


# ----- fused RMSNorm + gate/up + SiLU (llamaforge.kernels.gate_up) --------------------------------------------------
def _gate_up_case(seed: int, n: int, k: int, dtype=torch.float32, int8: bool = False, fold: bool = False):
    """x, gate and up weights, their int8 scales (or None), an RMSNorm's (weight, eps) (or None)."""
    from llamaforge.plugins.quantizers import quantize_int8_rows

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype)
    weights = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for _ in range(2)]
    scales = None
    if int8:
        quantized = [quantize_int8_rows(w) for w in weights]
        weights = [q for q, _ in quantized]
        scales = tuple(sc.to(dtype) for _, sc in quantized)
    norm = ((torch.rand(k, generator=g) + 0.5).to(dtype), 1e-5) if fold else None
    return x, weights[0], weights[1], scales, norm


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), k=st.integers(2, 80), int8=st.booleans(),
       fold=st.booleans())  # fmt: skip
def test_gate_up_reference_is_the_blocks_norm_and_swiglu_front_half(seed, n, k, int8, fold):
    """The reference against the modules it stands for: RMSNorm, gate and up (plain or Int8Linear), SiLU * up."""
    from llamaforge.kernels import gate_up
    from llamaforge.plugins.norms import RMSNorm
    from llamaforge.plugins.quantizers import Int8Linear

    x, wg, wu, _, _ = _gate_up_case(seed, n, k)
    row, norm = x, None
    if fold:
        rms = RMSNorm(k)
        with torch.no_grad():
            rms.weight.uniform_(0.5, 1.5)
        row, norm = rms(x).detach(), (rms.weight.detach(), rms.eps)
    if int8:
        modules = [Int8Linear.from_float(w, None, dynamic=False) for w in (wg, wu)]
        want = torch.nn.functional.silu(modules[0](row)) * modules[1](row)
        got = gate_up.reference(x, modules[0].weight, modules[1].weight,
                                (modules[0].weight_scale, modules[1].weight_scale), norm)  # fmt: skip
    else:
        want = torch.nn.functional.silu(torch.nn.functional.linear(row, wg)) * torch.nn.functional.linear(row, wu)
        got = gate_up.reference(x, wg, wu, None, norm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_gate_up_kernel_in_the_interpreter_matches_the_reference():
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import gate_up
        from tests.test_kernels import _close_to, _gate_up_case
        cases = [  # (seed, rows, width, dtype, int8, RMSNorm folded in)
            (0, 37, 100, torch.float32, False, False),  # ragged rows and width
            (1, 64, 256, torch.bfloat16, False, True),
            (2, 24, 300, torch.float32, True, True),
            (3, 16, 64, torch.bfloat16, True, False),
        ]
        for seed, n, k, dtype, int8, fold in cases:
            x, wg, wu, scales, norm = _gate_up_case(seed, n, k, dtype, int8, fold)
            want = gate_up.reference(x, wg, wu, scales, norm)
            for block_n, block_k in ((8, 64), (4, 128), (16, 1024)):
                got = gate_up.launch(x, wg, wu, scales, norm, block_n=block_n, block_k=block_k, warps=2)
                # bf16: the interpreter's conversions to bf16 need not round as the GPU's do (an ulp or two of the
                # rounded gate and up, multiplied); the GPU test holds the kernel to 1e-2
                _close_to(got, want, 2e-2 if dtype is torch.bfloat16 else 1e-5)
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 4")


def _gate_up_ptx_args(dtype: str) -> dict:
    """The gate/up kernel's runtime arguments at Llama-3.2-1B's shape (8,192 rows of 2,048) for `_sm90_ptx`, its
    weights in `dtype`."""
    k = 2048
    return {"x_ptr": "*bf16", "wg_ptr": f"*{dtype}", "wu_ptr": f"*{dtype}", "sg_ptr": "*bf16", "su_ptr": "*bf16",
            "g_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32", "n_rows": 8192, "k_len": k, "swg": k,
            "swu": k}  # fmt: skip


def _gate_up_constexprs(dtype: str, **extra) -> tuple[dict, int]:
    """The gate/up kernel's launch constants for weights in `dtype` at the 1B shape (its settings for that weight
    kind), and its warps."""
    from llamaforge.kernels import gate_up

    block_n, block_k, warps = gate_up.settings_for(
        torch.empty(0, dtype=torch.int8 if dtype == "i8" else torch.bfloat16)
    )
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "INT8": dtype == "i8", **extra}, warps


def test_gate_up_settings_are_fixed_per_weight_kind_with_overrides_for_every_kind(monkeypatch):
    """bf16 weights and int8 ones each have their own fixed launch setting (timed per kind on an H200); fp32 takes
    the plain one; the A/B overrides apply to every kind, one value at a time."""
    from llamaforge.kernels import gate_up

    bf16, i8, f32 = (torch.empty(0, dtype=d) for d in (torch.bfloat16, torch.int8, torch.float32))
    assert gate_up.settings_for(bf16) == gate_up._DEFAULT == gate_up.settings_for(f32) == (16, 512, 4)
    assert gate_up.settings_for(i8) == gate_up._SETTINGS[1] == (8, 512, 4)
    monkeypatch.setattr(gate_up, "_WARPS", 8)
    assert gate_up.settings_for(bf16) == (16, 512, 8) and gate_up.settings_for(i8) == (8, 512, 8)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(("dtype", "norm"), [("bf16", True), ("i8", True), ("bf16", False)])
def test_gate_up_kernel_loads_weights_sixteen_bytes_at_a_time_on_hopper(dtype, norm):
    from llamaforge.kernels import gate_up

    constexprs, warps = _gate_up_constexprs(dtype, NORM=norm)
    ptx = _sm90_ptx(gate_up._kernel(), _gate_up_ptx_args(dtype), constexprs, warps)
    loads = _global_loads(ptx)
    assert any(".v4." in ld for ld in loads), loads
    assert not [ld for ld in loads if ld.endswith((".b8", ".u8", ".s8"))], loads


def _loop_bodies(ptx: str) -> list[list[str]]:
    """The PTX lines of each loop body (from its header label to the branch back to it)."""
    lines = ptx.splitlines()
    bodies = []
    for head in (i for i, line in enumerate(lines) if "Loop Header" in line):
        label = next(m.group(1) for line in lines[head::-1] if (m := re.match(r"(\$L\w+):", line)))
        end = next(i for i in range(head, len(lines)) if re.search(rf"bra(\.uni)?\s+{re.escape(label)};", lines[i]))
        bodies.append(lines[head:end])
    return bodies


def _loop_body_barriers_before_wide_loads(ptx: str) -> list[int]:
    """For each 16-byte global load in the PTX's loop bodies, how many block barriers of its body come before it."""
    counts = []
    for body in _loop_bodies(ptx):
        seen = 0
        for line in body:
            seen += "bar.sync" in line
            if "ld.global.v4" in line:
                counts.append(seen)
    return counts


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(("kernel", "dtype"), [("gate_up", "bf16"), ("gate_up", "i8"), ("qkv", "i8")])
def test_each_loop_step_issues_its_weight_loads_ahead_of_the_row_tiles_barriers_on_hopper(kernel, dtype):
    """Written after the row's tile, a loop step's weight loads were issued by sm_90 code only once that tile had
    been loaded and laid out for every row through shared memory (barriers): two memory round trips per step. The
    kernels now load the weights first; no barrier may stand between a loop step's first wide load and its weight
    loads."""
    from llamaforge.kernels import gate_up, qkv_rope

    if kernel == "gate_up":
        fn, args = gate_up._kernel(), _gate_up_ptx_args(dtype)
        constexprs, warps = _gate_up_constexprs(dtype, NORM=True)
    else:
        fn, warps, args = qkv_rope._kernel(), qkv_rope._WARPS, _qkv_ptx_args(dtype)
        constexprs = {"HALF": 32, "PAIRS": qkv_rope._PAIRS, "BLOCK_K": qkv_rope._BLOCK_K, "INT8": True, "NORM": True,
                      "ONE_PASS": True}  # fmt: skip
    counts = _loop_body_barriers_before_wide_loads(_sm90_ptx(fn, args, constexprs, warps))
    assert len(counts) >= 4 and set(counts) == {0}, counts


@pytest.mark.gpu
@cuda
def test_gate_up_on_cuda_matches_the_reference_at_llama_shapes():
    from llamaforge.kernels import gate_up

    shapes = [(8192, 2048, False, True), (14336, 4096, False, True), (100, 300, False, False), (8192, 2048, True, True)]
    for seed, (n, k, int8, fold) in enumerate(shapes):
        x, wg, wu, scales, norm = _gate_up_case(seed, n, k, torch.bfloat16, int8, fold)
        x, wg, wu = x.cuda(), wg.cuda(), wu.cuda()
        scales = tuple(sc.cuda() for sc in scales) if scales else None
        norm = (norm[0].cuda(), norm[1]) if norm else None
        want = gate_up.reference(x, wg, wu, scales, norm)
        for fn in (gate_up.gate_up_silu, torch.compile(gate_up.gate_up_silu)):
            _close_to(fn(x, wg, wu, scales, norm), want, 1e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("qkv", "ffn", "attn", "res"), [(True, False, False, False), (False, True, False, False),
                                                       (True, True, False, False), (True, False, True, False),
                                                       (True, True, True, False), (False, False, False, True),
                                                       (True, True, True, True)])  # fmt: skip
@pytest.mark.parametrize("quant", [None, "int8_weight_only"])
def test_compiled_graphed_decoding_through_the_fused_kernels_gives_the_plain_tokens(qkv, ffn, attn, res, quant,
                                                                                    monkeypatch):  # fmt: skip
    import llamaforge
    from llamaforge.core import model as model_module
    from llamaforge.core.generation import GenerationConfig, clear_sessions, generate
    from llamaforge.core.loading import apply_transform
    from llamaforge.kernels import residual_gemv
    from llamaforge.plugins import attention

    spec = llamaforge.load_spec("tiny").with_updates(eos_token_id=None)
    model = llamaforge.build_model(spec, device="cuda", seed=0, dtype=torch.bfloat16).eval()
    if quant:
        model = apply_transform(model, "quantizer", quant)
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=[])
    out = {}
    for on in (False, True):  # on: None, CUDA only, what a default would be
        monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", None if on and qkv else False)
        monkeypatch.setattr(attention, "_FUSED_ATTENTION", None if on and attn else False)
        monkeypatch.setattr(model_module, "_FUSED_GATE_UP", None if on and ffn else False)
        monkeypatch.setattr(model_module, "_FUSED_GATE_UP_INT8", None if on and ffn else False)
        monkeypatch.setattr(residual_gemv, "PLAIN", None if on and res else False)
        monkeypatch.setattr(residual_gemv, "INT8", None if on and res else False)
        torch._dynamo.reset()
        clear_sessions(model)
        out[on] = generate(model, [[3, 4, 5]], config)
    clear_sessions(model)
    assert out[True] == out[False]


# ----- one row times a matrix plus the residual (llamaforge.kernels.residual_gemv) ---------------------------------
def _residual_case(seed: int, n: int, k: int, dtype=torch.float32, int8: bool = False):
    """x (1, K), a weight (N, K) (int8 with its rows' scales, or in x's dtype with None), a residual (1, N)."""
    from llamaforge.plugins.quantizers import quantize_int8_rows

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    scale = None
    if int8:
        w, scale = quantize_int8_rows(w)
        scale = scale.to(dtype)
    return x, w, scale, (torch.randn(1, n, generator=g) * 2).to(dtype)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), k=st.integers(2, 80), int8=st.booleans(),
       bf16=st.booleans())  # fmt: skip
def test_residual_reference_is_the_linear_then_the_residual_addition(seed, n, k, int8, bf16):
    """The reference against the modules it stands for: residual + linear(x), the linear an nn.Linear or an
    Int8Linear; and `add_linear` with the route on (a CPU runs the reference) against the two steps."""
    from llamaforge.kernels import residual_gemv
    from llamaforge.plugins.quantizers import Int8Linear

    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w, scale, residual = _residual_case(seed, n, k, dtype, int8)
    if int8:
        linear = Int8Linear(k, n, bias=False, dtype=dtype)
        linear.weight.copy_(w)
        linear.weight_scale.copy_(scale)
    else:
        linear = torch.nn.Linear(k, n, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
    with torch.no_grad():
        want = residual + linear(x)
        got = residual_gemv.reference(x, w, scale, residual)
        tol = 2e-2 if bf16 else 1e-5  # bf16: nn.Linear's own CPU kernel may round its sums differently
        torch.testing.assert_close(got.float(), want.float(), atol=tol * (1 + want.abs().max().item()), rtol=0)
        assert got.dtype == dtype and got.shape == (1, n)
        saved = residual_gemv.PLAIN, residual_gemv.INT8
        for plain, int8_on in ((True, True), (False, False)):
            residual_gemv.PLAIN, residual_gemv.INT8 = plain, int8_on
            try:
                routed = residual_gemv.add_linear(linear, x[None], residual[None])
            finally:
                residual_gemv.PLAIN, residual_gemv.INT8 = saved
            assert routed.shape == (1, 1, n)
            torch.testing.assert_close(routed[0], got if plain else want)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_residual_gemv_kernel_in_the_interpreter_matches_the_reference():
    script = textwrap.dedent(
        """
        import torch
        from llamaforge.kernels import residual_gemv
        from tests.test_kernels import _close_to, _residual_case
        cases = [  # (seed, rows, width, dtype, int8)
            (0, 37, 100, torch.float32, False),  # ragged rows and width
            (1, 64, 256, torch.bfloat16, False),
            (2, 24, 300, torch.float32, True),
            (3, 16, 64, torch.bfloat16, True),
        ]
        for seed, n, k, dtype, int8 in cases:
            x, w, scale, residual = _residual_case(seed, n, k, dtype, int8)
            want = residual_gemv.reference(x, w, scale, residual)
            for block_n, block_k in ((8, 64), (4, 128), (16, 1024)):
                got = residual_gemv.launch(x, w, scale, residual, block_n=block_n, block_k=block_k, warps=2)
                assert got.shape == want.shape and got.dtype == want.dtype
                _close_to(got, want, 2e-2 if dtype is torch.bfloat16 else 1e-5)
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 4")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(("dtype", "k"), [("bf16", 2048), ("i8", 2048), ("bf16", 8192), ("i8", 8192)])
def test_residual_gemv_kernel_loads_weights_sixteen_bytes_at_a_time_on_hopper(dtype, k):
    """At Llama-3.2-1B's o_proj (2,048 x 2,048) and down_proj (2,048 x 8,192) shapes, with their launch settings."""
    from llamaforge.kernels import residual_gemv

    block_n, block_k, warps = residual_gemv._SETTINGS.get((1 if dtype == "i8" else 2, k), residual_gemv._DEFAULT)
    args = {"x_ptr": "*bf16", "w_ptr": f"*{dtype}", "s_ptr": "*bf16", "r_ptr": "*bf16", "out_ptr": "*bf16",
            "n_rows": 2048, "k_len": k, "sw": k}  # fmt: skip
    constexprs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "INT8": dtype == "i8"}
    ptx = _sm90_ptx(residual_gemv._kernel(), args, constexprs, warps)
    loads = _global_loads(ptx)
    assert any(".v4." in ld for ld in loads), loads
    assert not [ld for ld in loads if ld.endswith((".b8", ".u8", ".s8"))], loads
    assert _loop_body_barriers_before_wide_loads(ptx) and set(_loop_body_barriers_before_wide_loads(ptx)) == {0}
    if dtype == "i8":  # widened through the float's bits, no I2F per value
        assert not re.findall(r"cvt\.rn\.f32\.[su](8|32)", ptx)


@pytest.mark.gpu
@cuda
def test_residual_gemv_on_cuda_matches_the_reference_at_llama_shapes():
    from llamaforge.kernels import residual_gemv

    shapes = [(2048, 2048, False), (2048, 8192, False), (2048, 2048, True), (2048, 8192, True), (100, 300, True)]
    for seed, (n, k, int8) in enumerate(shapes):
        x, w, scale, residual = (t.cuda() if t is not None else None
                                 for t in _residual_case(seed, n, k, torch.bfloat16, int8))  # fmt: skip
        want = residual_gemv.reference(x, w, scale, residual)
        for fn in (residual_gemv.residual_linear, torch.compile(residual_gemv.residual_linear)):
            _close_to(fn(x, w, scale, residual), want, 1e-2)


# ----- int8 weight-only products of a few rows (eager CUDA calls) -----------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_int8_mm_kernel_in_the_interpreter_matches_the_reference():
    """Ragged row / output / width counts, a 3-D row block, one row, and other launch tiles, against the PyTorch
    form (fp16 here: the interpreter's dot mistakes bf16 for integers; bf16 runs in the GPU test). The epilogue
    rounds like the PyTorch form, so only the fp32 sums' order differs."""
    script = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from llamaforge.kernels import int8_mm
        torch.manual_seed(0)
        cases = [((16, 256), 96, {}), ((5, 200), 70, {}), ((1, 128), 64, {}), ((2, 33, 64), 130, {}),
                 ((7, 300), 50, {"block_n": 32, "block_k": 64, "block_m": 32})]
        for shape, n, launch in cases:
            x = torch.randn(*shape, dtype=torch.float16)
            w = torch.randint(-127, 128, (n, shape[-1]), dtype=torch.int8)
            s = (torch.rand(n) / 100 + 1e-3).to(torch.float16)
            want = (F.linear(x.float(), w.float()).to(torch.float16).float() * s.float()).to(torch.float16)
            got = int8_mm.launch(x, w, s, **launch)
            assert got.shape == (*shape[:-1], n) and got.dtype == x.dtype, (got.shape, got.dtype)
            torch.testing.assert_close(got, want, atol=0.01, rtol=2e-3)
        # fp32 scales are rounded to the rows' dtype first, as the PyTorch form does
        x, w = torch.randn(4, 64, dtype=torch.float16), torch.randint(-127, 128, (48, 64), dtype=torch.int8)
        s = torch.rand(48) / 100 + 1e-3
        want = (F.linear(x.float(), w.float()).to(torch.float16).float() * s.to(torch.float16).float())
        torch.testing.assert_close(int8_mm.launch(x, w, s), want.to(torch.float16), atol=0.01, rtol=2e-3)
        print("ok", len(cases))
        """
    )
    _in_the_interpreter(script, "ok 5")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_int8_mm_kernel_reads_int8_weights_sixteen_bytes_at_a_time_on_hopper():
    """Compiled for sm_90 here (no GPU needed): the weight tiles load as 16-byte vectors of int8 values (the point is
    reading each weight's one byte once) and the products run on tensor cores (mma/wgmma)."""
    from llamaforge.kernels import int8_mm

    k = 2048
    args = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "y_ptr": "*bf16", "m": 16, "n": 16384, "k_len": k,
            "sx": k, "sw": k, "sy": 16384}  # fmt: skip
    block_m, block_n, block_k, warps, _ = int8_mm.settings_for(16, 16384)
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    ptx = _sm90_ptx(int8_mm._kernel(), args, constexprs, warps)
    # the tiles are staged through shared memory by asynchronous copies (the pipeline): every one 16 bytes
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]+\], \[[^]]+\], (\w+)", ptx)
    assert copies and set(copies) == {"0x10"}, copies
    assert not [ld for ld in _global_loads(ptx) if ld.endswith((".b8", ".u8", ".s8"))]
    assert re.search(r"\b(mma|wgmma)\.", ptx), "no tensor-core instruction"


def test_int8_weight_only_linear_takes_the_pytorch_form_off_cuda_and_when_compiling(monkeypatch):
    """The kernel is for eager CUDA calls: on the CPU (and under torch.compile on any device) the product is the
    PyTorch form, and `supported` keeps out shapes the kernel does not take."""
    from llamaforge.kernels import int8_mm
    from llamaforge.plugins.quantizers import int8_weight_only_linear

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    s = torch.rand(32, dtype=torch.bfloat16)
    assert not int8_mm.wanted(x)
    torch.testing.assert_close(int8_weight_only_linear(x, w, s, None), int8_mm.reference(x, w, s))
    assert int8_mm.supported(x, w, s)
    assert not int8_mm.supported(x.float(), w, s)  # fp32 rows: the PyTorch form
    assert not int8_mm.supported(torch.randn(65, 64, dtype=torch.bfloat16), w, s)  # past MAX_ROWS
    monkeypatch.setattr(int8_mm, "ENABLED", True)
    assert int8_mm.supported(torch.randn(65, 64, dtype=torch.bfloat16), w, s)  # forced on: any row count
    assert not int8_mm.supported(x, w.t().contiguous().t(), s)  # column-major weights


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(
    ("capability", "grad", "expected"),
    [((9, 0), False, True), ((8, 0), False, True), ((7, 5), False, False), ((9, 0), True, False)],
)
def test_int8_mm_is_wanted_on_tensor_core_gpus_for_calls_without_autograd(monkeypatch, capability, grad, expected):
    """Decided from the row's device, the GPU's compute capability (bf16/fp16 tensor cores: 8.0+) and whether
    autograd must reach the row; a stand-in with the attributes `wanted` reads plays a CUDA row here."""
    from llamaforge.kernels import int8_mm

    class CudaRow:
        device = torch.device("cuda", 0)
        requires_grad = grad

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    int8_mm._tensor_cores.cache_clear()
    try:
        assert int8_mm.wanted(CudaRow()) is expected
        monkeypatch.setattr(int8_mm, "ENABLED", False)
        assert int8_mm.wanted(CudaRow()) is False
    finally:
        int8_mm._tensor_cores.cache_clear()


@pytest.mark.gpu
@cuda
def test_int8_mm_on_cuda_matches_the_pytorch_form_at_llama_shapes():
    """bf16 rows times the 1B shape's int8 matrices (q, stacked gate/up, down, the head with one row), eagerly
    through int8_weight_only_linear, against the PyTorch form's arithmetic."""
    from llamaforge.kernels import int8_mm
    from llamaforge.plugins.quantizers import int8_weight_only_linear

    torch.manual_seed(0)
    for rows, n, k in [(16, 2048, 2048), (16, 16384, 2048), (9, 2048, 8192), (1, 128256, 2048), (64, 512, 2048)]:
        x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = (torch.rand(n, device="cuda") / 500 + 1e-4).to(torch.bfloat16)
        assert int8_mm.wanted(x) and int8_mm.supported(x, w, s)
        got = int8_weight_only_linear(x, w, s, None)
        want = int8_mm.reference(x, w, s)
        torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)


@pytest.mark.gpu
@cuda
def test_int8_prefill_through_int8_mm_matches_the_pytorch_form_and_generates():
    """A bf16 model quantized to int8 weight-only: its eager 16-token forward (what a prefill runs) gives the same
    logits through the kernel as through the PyTorch form, and graphed generation with the kernel in the prefill
    runs to the requested length."""
    import llamaforge
    from llamaforge.core.generation import GenerationConfig, clear_sessions, generate
    from llamaforge.core.loading import apply_transform
    from llamaforge.kernels import int8_mm

    spec = llamaforge.load_spec("tiny").with_updates(eos_token_id=None)
    model = apply_transform(
        llamaforge.build_model(spec, device="cuda", seed=0, dtype=torch.bfloat16).eval(), "quantizer",
        "int8_weight_only",
    )  # fmt: skip
    ids = torch.randint(0, spec.vocab_size, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits.float()
        int8_mm.ENABLED = False
        try:
            want = model(ids).logits.float()
        finally:
            int8_mm.ENABLED = None
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
    out = generate(model, [list(range(3, 14))], GenerationConfig(max_new_tokens=12, eos_token_ids=[]))
    clear_sessions(model)
    assert len(out[0]) == 12


@pytest.mark.gpu
@cuda
def test_lora_on_an_int8_base_gets_the_same_gradients_with_int8_mm_on():
    """Training adapters on an int8 weight-only base needs gradients through the frozen int8 products; the kernel
    has no backward, so those calls keep the PyTorch form (int8_mm.wanted) and the adapters' gradients match the
    ones taken with the kernel switched off."""
    import llamaforge
    from llamaforge.core import finetune as ft
    from llamaforge.core.loading import apply_transform
    from llamaforge.kernels import int8_mm

    spec = llamaforge.load_spec("tiny")
    model = apply_transform(
        llamaforge.build_model(spec, device="cuda", seed=0, dtype=torch.bfloat16), "quantizer", "int8_weight_only"
    )
    ft.add_adapter(model, "lora", rank=4, targets="q_proj,v_proj")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not zero, so every adapter's gradient depends on the products after it
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, spec.vocab_size, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = {}
    for on in (None, False):
        int8_mm.ENABLED = on
        try:
            model.zero_grad(set_to_none=True)
            model(ids, targets=ids).loss.backward()
        finally:
            int8_mm.ENABLED = None
        grads[on] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[None].keys() == grads[False].keys() and any("layers.0." in n for n in grads[None])
    for name, grad in grads[None].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name])
