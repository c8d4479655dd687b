"""The benchmark scripts run end to end on tiny settings (their figures are not checked here: speed targets live in
the benchmarks, not in timed tests), so a refactor cannot silently break the commands the README quotes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_quant_speed_cpu(tmp_path):
    res = _run("quant_speed.py", "--spec", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
               tmp_path=tmp_path)  # fmt: skip
    assert res["mode"] == "cpu" and set(res["results"]) == {"fp32", "int8_dynamic", "int8_weight_only"}
    for row in res["results"].values():
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0 and len(row["tokens"]) == 3


def test_quant_speed_times_captured_steps_in_turns(monkeypatch):
    """The GPU mode's decode figures come from windows of each variant's captured step timed in turns (A B A B),
    the best per variant; a variant without a captured step keeps its own figure. Fake windows and a fake clock
    stand in for graph replays here (this machine has no GPU): a bf16 window takes 1 s, an int8 one 0.5 s."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _timing
    import generate_throughput
    import quant_speed

    calls: list[str] = []
    windows = {"bf16": 100, "int8": 50, "eager": None}  # replays per window; None: no captured step

    def fake_window(model, steps):
        n = windows[model]
        return None if n is None else ((lambda: calls.append(model)), n, 1)

    now = [0.0]

    def fake_clock():
        now[0] += 0.5 if calls and calls[-1] == "int8" else 1.0
        return now[0]

    def interleaved(fns, device, repeats):
        return _timing.best_times_interleaved(fns, device, repeats, clock=fake_clock)

    monkeypatch.setattr(generate_throughput, "graph_window", fake_window)
    monkeypatch.setattr(quant_speed, "best_times_interleaved", interleaved)
    rows = {name: {"decode_ms_per_token": 9.0, "decode_tokens_per_s": 1.0} for name in windows}
    quant_speed.interleave_steps(rows, {n: n for n in windows}, steps=100, rounds=3, device=torch.device("cpu"))
    assert calls == ["bf16", "int8"] * 4  # a warm-up call each, then three rounds in turns
    assert rows["bf16"]["decode_ms_alone"] == 9.0 and rows["bf16"]["decode_ms_per_token"] == 10.0  # 1 s / 100
    assert rows["int8"]["decode_tokens_per_s"] == 50 / 0.5
    assert rows["eager"] == {"decode_ms_per_token": 9.0, "decode_tokens_per_s": 1.0}


@pytest.mark.slow  # three CPU compilations
def test_quant_speed_cpu_compiled(tmp_path):
    res = _run("quant_speed.py", "--compile", "--spec", "tiny", "--prompt-len", "8", "--new-tokens", "4",
               "--repeats", "1", "--methods", "int8_dynamic", tmp_path=tmp_path)  # fmt: skip
    assert res["decoding"].startswith("llamaforge.generate")
    assert res["results"]["int8_dynamic"]["decode_tokens_per_s"] > 0


def test_generate_throughput_cpu(tmp_path):
    res = _run("generate_throughput.py", "--spec", "tiny", "--new-tokens", "4", "--repeats", "1",
               "--compile", "off", "--prompt-len", "11", "--prefill-graph", "on", "--attention-kernel", "flash_decode",
               tmp_path=tmp_path)  # fmt: skip
    (row,) = res["rows"]
    assert row["same_tokens"] is True and row["llamaforge_tok_s"] > 0 and row["hf_tok_s"] > 0
    assert row["prefill_graph"] is True  # an 11-token prompt laid out as 16 gives transformers' tokens
    assert row["attention_kernel"] == "flash_decode"  # sdpa off CUDA


def test_train_throughput_cpu(tmp_path):
    res = _run("train_throughput.py", "--steps", "2", "--warmup", "1", "--rounds", "1", "--no-compile",
               "--profile", "1", tmp_path=tmp_path)  # fmt: skip
    assert set(res["results"]) == {"llamaforge", "transformers"} and not res["failed"]
    assert res["ratio_vs_transformers"] > 0
    table = res["profiles"]["llamaforge"]  # where a step's time goes (operators on CPU, kernels on CUDA)
    assert table["kernel_us_per_step"] > 0 and any("AdamW" in row["name"] for row in table["kernels"])


@pytest.mark.slow  # compiles the clip + AdamW update on CPU
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_train_throughput_variant_contender(tmp_path):
    res = _run("train_throughput.py", "--steps", "2", "--warmup", "2", "--rounds", "1", "--no-compile",
               "--variant", "compile_optimizer=1", tmp_path=tmp_path)  # fmt: skip
    results = res["results"]
    assert set(results) == {"llamaforge", "llamaforge[compile_optimizer=1]", "transformers"} and not res["failed"]
    assert results["llamaforge[compile_optimizer=1]"]["first_loss"] == results["llamaforge"]["first_loss"]
    assert results["llamaforge[compile_optimizer=1]"]["ratio_vs_reference"] > 0


def test_train_throughput_rejects_a_bad_variant():
    for bad, words in [("fast=1", "unknown setting 'fast'"), ("inductor.no_such_option=1", "no option")]:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--variant", bad],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--hf-cudagraphs"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--hf-cudagraphs needs CUDA and compile" in proc.stderr


def test_weight_byte_counts_cover_quantized_buffers_and_skip_an_untied_table(monkeypatch):
    import copy

    import llamaforge
    from llamaforge.core.loading import apply_transform

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _timing import stored_weight_bytes, streamed_weight_bytes

    spec = llamaforge.load_spec("tiny").with_updates(tie_embeddings=False)
    model = llamaforge.build_model(spec, seed=0, dtype="float32")
    params = sum(p.numel() * 4 for p in model.parameters())
    table = model.model.embed_tokens.weight.numel() * 4
    assert stored_weight_bytes(model) >= params
    assert streamed_weight_bytes(model) == stored_weight_bytes(model) - table
    quantized = apply_transform(copy.deepcopy(model), "quantizer", "int8_weight_only")
    # int8_weight_only stores every 2-D weight (embedding and lm_head too) at a byte per value instead of four,
    # plus per-row scales: about a quarter, which counting parameters alone would miss entirely
    ratio = stored_weight_bytes(quantized) / stored_weight_bytes(model)
    assert 0.25 < ratio < 0.3


def test_interleaved_timing_alternates_the_contenders_and_keeps_each_ones_best(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _timing import best_times_interleaved

    calls: list[str] = []
    now = [0.0]
    cost = {"a": [5.0, 2.0, 3.0, 4.0], "b": [1.0, 7.0, 6.0, 9.0]}  # warm-up first: never counted

    def contender(name):
        def run():
            calls.append(name)
            now[0] += cost[name].pop(0)

        return run

    best = best_times_interleaved([contender("a"), contender("b")], torch.device("cpu"), 3, clock=lambda: now[0])
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert best == [2.0, 6.0]


def test_decode_variants_cpu_applies_each_variants_settings_in_its_own_process(tmp_path):
    res = _run("decode_variants.py", "--new-tokens", "4", "--repeats", "1", "--phases", "base",
               "greedy_step=0,quant=int8_weight_only", "buffer_row=0,inductor.coordinate_descent_tuning=false",
               tmp_path=tmp_path)  # fmt: skip
    base, quant, unbuffered = res["rows"]
    assert "error" not in base and base["settings"] == {} and base["e2e_tok_s"] > 0
    assert quant["settings"] == {"greedy_step": False, "quant": "int8_weight_only"} and "error" not in quant
    assert unbuffered["settings"] == {"buffer_row": False, "inductor.coordinate_descent_tuning": False}
    assert "error" not in unbuffered
    assert base["step_compile_options"]["coordinate_descent_tuning"] is True  # the decode step's own setting...
    assert unbuffered["step_compile_options"]["coordinate_descent_tuning"] is False  # ...a variant's option wins
    assert base["tokens_digest"] == unbuffered["tokens_digest"]  # the switches change speed, never tokens
    # --phases times generate() of 1, 2 and --new-tokens tokens; no ordering between them is asserted (a timing:
    # on a loaded 2-core machine a CI run once saw 207 ms for one token against 10 ms for four)
    assert all(isinstance(base[f"ms_generate_{n}"], float) and base[f"ms_generate_{n}"] > 0 for n in (1, 2, 4))


def test_decode_variants_rejects_bad_settings_before_starting_anything():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _variants import inductor_options
        from decode_variants import VariantError, parse_variant
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert parse_variant("base") == {}
    assert parse_variant("quant=int8_weight_only,gemv_int8=1,gemv_float=0,gemv_block_k=2048") == {
        "quant": "int8_weight_only", "gemv_int8": True, "gemv_float": False, "gemv_block_k": 2048}  # fmt: skip
    assert parse_variant("gemv_float=auto,gemv_int8=on") == {"gemv_float": None, "gemv_int8": True}
    route = "1/2048/8192/4/1024/4/4+1/3072/2048/4/1024/4/1"
    assert parse_variant(f"quant=int8_weight_only,gemv_route={route}")["gemv_route"] == route
    for bad in ("1/2048/8192/4/1024/4", "3/2048/8192/4/1024/4/1", "1/2048/8192/4/1024/4/x"):
        with pytest.raises(VariantError, match="BYTES/ROWS/K"):
            parse_variant(f"gemv_route={bad}")
    assert parse_variant("splits=auto,block=64,inductor.triton.enable_pdl=1,attn=flash_decode") == {
        "splits": None, "block": 64, "inductor.triton.enable_pdl": 1, "attn": "flash_decode"}  # fmt: skip
    # torch.compile rejects an int for a boolean option: the 1 must reach it as True
    assert inductor_options(parse_variant("inductor.triton.enable_pdl=1,buffer_row=0")) == {"triton.enable_pdl": True}
    with pytest.raises(VariantError, match="expected a boolean"):
        inductor_options(parse_variant("inductor.triton.enable_pdl=2"))
    with pytest.raises(VariantError, match="no option 'no_such_option'"):
        inductor_options(parse_variant("inductor.no_such_option=1"))
    for bad, words in [("bufer_row=1", "unknown setting 'bufer_row'"), ("buffer_row=maybe", "buffer_row='maybe'"),
                       ("splits=two", "splits='two'"), ("buffer_row", "expected NAME=VALUE"),
                       ("gemv_float=sometimes", "expected bool or auto")]:  # fmt: skip
        with pytest.raises(VariantError, match=words):
            parse_variant(bad)
    for bad, words in [("buffer_row=2", "buffer_row='2': expected bool"),
                       ("base inductor.no_such_option=1", "no option 'no_such_option'")]:  # fmt: skip
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_variants.py"), *bad.split()],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr and "{" not in proc.stdout  # nothing ran


def test_gpu_runs_script_decode_stage_runs_on_the_cpu(tmp_path):
    """The staged GPU script, with its model overridden to the tiny spec on the CPU: a broken stage must not cost a
    GPU call to find."""
    import os

    env = {**os.environ, "DEVICE": "cpu", "SPEC": "tiny", "DTYPE": "float32", "PYTHON": sys.executable, "FRESH": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_runs.sh"), "int8", str(tmp_path), "quant=int8_weight_only",
         "--new-tokens", "4", "--repeats", "1", "--compile", "on", "--call-profile", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "int8.json").read_text())["rows"]
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["settings"] == {"quant": "int8_weight_only"}
    assert rows[0]["cache_hits"] == 0 and rows[0]["rewrites"] > 0  # FRESH=1: compiled into an empty cache
    for n in (1, 2):  # whole generate() calls profiled
        assert rows[0][f"call_profile_{n}"]["kernels"] and rows[0][f"call_profile_{n}"]["profiled_ms_per_call"] > 0
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_runs.sh"), "nope", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


def test_gpu_runs_script_route_stage_alternates_the_routed_and_default_steps(tmp_path):
    """The route stage on the CPU with its route given (the sweep needs a GPU): fresh processes of the int8 step
    with and without the products routed, alternating (ROUNDS=2 pairs here; three on the GPU); without a route and
    without a GPU it stops at once with a clear message."""
    import os

    route = "1/16384/2048/4/2048/8/1+1/128256/2048/8/1024/8/1"
    env = {**os.environ, "DEVICE": "cpu", "SPEC": "tiny", "DTYPE": "float32", "PYTHON": sys.executable,
           "QUANT": "int8_weight_only", "ROUTE": route, "ROUNDS": "2"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_runs.sh"), "route", str(tmp_path), "--new-tokens", "4", "--repeats",
         "1", "--compile", "off"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "route.json").read_text())["rows"]
    plain, routed = {"quant": "int8_weight_only"}, {"quant": "int8_weight_only", "gemv_route": route}
    assert [r["settings"] for r in rows] == [plain, routed] * 2
    assert all("error" not in r and r["cache_hits"] == 0 for r in rows)
    env = {k: v for k, v in env.items() if k != "ROUTE"}
    no_gpu = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_runs.sh"), "route", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=300, env={**env, "QUANT": ""})  # fmt: skip
    assert no_gpu.returncode == 1 and "needs a CUDA GPU; give ROUTE=" in no_gpu.stderr


def test_gpu_runs_script_fused_stage_runs_on_the_cpu(tmp_path):
    """The fused-kernel stage on the CPU (its GPU tests skip; the route runs the op's reference): the variants run
    and decode the tokens of the plain step."""
    import os

    env = {**os.environ, "DEVICE": "cpu", "SPEC": "tiny", "DTYPE": "float32", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_runs.sh"), "fused", str(tmp_path), "base", "qkv_rope=1",
         "qkv_rope=1,qkv_norm=0", "qkv_rope=1,gate_up=1", "--new-tokens", "4", "--repeats", "1", "--compile",
         "off"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "skipped" in (tmp_path / "fused_tests.log").read_text()  # no GPU here
    rows = json.loads((tmp_path / "fused.json").read_text())["rows"]
    assert [r["settings"] for r in rows] == [{}, {"qkv_rope": True}, {"qkv_rope": True, "qkv_norm": False},
                                             {"qkv_rope": True, "gate_up": True}]  # fmt: skip
    assert all("error" not in r for r in rows) and len({r["tokens_digest"] for r in rows}) == 1


def test_gemv_micro_cpu_times_each_contender_and_rejects_bad_shapes(tmp_path):
    """The standalone product benchmark on the CPU (the Triton contender needs a GPU): both weight kinds, stacked
    siblings, figures per contender; bad shapes and settings stop it before anything is timed."""
    res = _run("gemv_micro.py", "--device", "cpu", "--shapes", "96+32:64", "--int8", "--calls", "2", "--repeats",
               "1", "--copies", "2", tmp_path=tmp_path)  # fmt: skip
    dense, int8 = res["rows"]
    assert dense["rows"] == [96, 32] and dense["k"] == 64 and dense["weights"] == "float32"
    assert dense["weight_bytes"] == 128 * 64 * 4 and int8["weight_bytes"] == 128 * 64
    assert set(dense["us"]) == {"F.linear per matrix", "inductor reduction"}
    assert set(int8["us"]) == {"inductor reduction"}  # the row GEMV kernel's settings are timed on a GPU only
    assert all(isinstance(v, float) and v > 0 for row in (dense, int8) for v in row["us"].values())
    bad_args = [(["--shapes", "9:1"], "K >= 2"), (["--shapes", "1+2+3+4:8"], "one to three"),
                (["--sweep", "3:1024:8"], "power of two"), (["--shapes", "a:b"], "integers"),
                (["--sweep", "4:1024:4:0"], "SPLIT_K must be"), (["--sweep", "4:1024"], "BLOCK_K:WARPS")]  # fmt: skip
    for bad, words in bad_args:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gemv_micro.py"), "--device", "cpu", *bad],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def dec_tag() -> str:
    from llamaforge.kernels import decode_attention

    return decode_attention.launch_tag()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_micro_checks_and_times_the_kernels_in_the_interpreter_and_rejects_bad_settings(tmp_path, monkeypatch):
    """The fused-kernel sweep on the CPU with Triton's interpreter: all three kernels, their values checked against
    the compiled reference before timing, the best setting named; bad settings stop it before anything is timed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = _run("fused_micro.py", "--device", "cpu", "--shape", "4", "2", "16", "64", "128", "8", "--no-int8",
               "--qkv", "2:64:4", "4:32:4:1", "--gate-up", "4:64:4", "--attn", "1:32:4:0", "2:16:4:0",
               "--attn-cases", "40:9", "--calls", "1", "--repeats", "1", "--copies", "2", "--kernels", "qkv",
               "gate_up", "residual", "attn", "qkv_attn", "--qkv-attn", "16:4", "--qkv-attn-cases", "24:7",
               "--residual", "4:64:4", "8:32:4", tmp_path=tmp_path)  # fmt: skip
    qkv, gate_up, res_o, res_down, attn, qkv_attn = res["rows"]
    assert [res_o["kernel"], res_down["kernel"]] == ["residual o_proj", "residual down_proj"]
    assert res_o["weight_bytes"] == 64 * 64 * 4 and res_down["weight_bytes"] == 64 * 128 * 4
    for row in (res_o, res_down):
        assert set(row["us"]) == {"inductor (compiled reference)", "residual_gemv 4:64:4", "residual_gemv 8:32:4"}
        assert row["best"].startswith("residual_gemv")
    assert set(qkv_attn["us"]) == {"inductor (compiled reference)", "qkv_rope_attention 16:4"}
    assert qkv_attn["kernel"] == "qkv_rope_attention cache 24, 7 in use"
    assert qkv["weight_bytes"] == (4 + 2 * 2) * 16 * 64 * 4 and gate_up["weight_bytes"] == 2 * 128 * 64 * 4
    assert attn["weight_bytes"] == 2 * 2 * 9 * 16 * 4  # the keys and values in use only
    assert set(qkv["us"]) == {"inductor (compiled reference)", "qkv_rope 2:64:4", "qkv_rope 4:32:4:1"}
    assert set(gate_up["us"]) == {"inductor (compiled reference)", "gate_up 4:64:4"}
    assert set(attn["us"]) - {"inductor (compiled reference)", "decode_attention 1:32:4:0",
                              "decode_attention 2:16:4:0"} == {f"decode_attention defaults {dec_tag()}"}  # fmt: skip
    assert all(isinstance(v, float) and v > 0 for row in res["rows"] for v in row["us"].values()), res
    assert qkv["best"].startswith("qkv_rope") and gate_up["best"] == "gate_up 4:64:4"
    assert attn["best"].startswith("decode_attention")
    monkeypatch.delenv("TRITON_INTERPRET")
    bad_args = [
        (["--qkv", "3:64:4"], "powers of two"),
        (["--qkv", "4:64:4:2"], "0 or 1"),
        (["--gate-up", "4:64:4:1"], "3 integers"),
        (["--residual", "3:64:4"], "powers of two"),
        (["--attn", "3:64:4:1"], "powers of two"),
        (["--attn", "1:64:4"], "4 integers"),
        (["--attn-cases", "64:65"], "between 1 and the cache length"),
        (["--attn-cases", "64"], "CACHE_LENGTH:POSITIONS"),
        (["--qkv-attn", "24:4"], "powers of two"),
        (["--qkv-attn", "32"], "2 integers"),
        (["--qkv-attn-cases", "8:9"], "between 1 and the cache length"),
        (["--shape", "4", "3", "16", "64", "128", "8"], "multiple"),
    ]
    for bad, words in bad_args:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fused_micro.py"), "--device", "cpu", *bad],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def test_decode_variants_compiles_kernel_launch_setting_variants_into_an_empty_cache(monkeypatch, tmp_path):
    """Inductor's on-disk cache does not key on settings read inside the fused kernels' Triton ops, so such variants
    (and every variant under --fresh-cache) get cache directories of their own; others share the user's cache."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_variants
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen[cmd[cmd.index("--child") + 1]] = env.get("TORCHINDUCTOR_CACHE_DIR")
        return subprocess.CompletedProcess(cmd, 0, stdout='{"e2e_tok_s": 1.0}\n', stderr=env.get("TORCH_LOGS", ""))

    monkeypatch.setattr(decode_variants.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    for fresh in (False, True):
        args = argparse.Namespace(passthrough=[], timeout=5, fresh_cache=fresh)
        for text in ("base", "qkv_rope=1", "qkv_rope=1,qkv_block_k=2048", "gate_up_warps=8"):
            assert decode_variants.run_variant(args, text)["e2e_tok_s"] == 1.0
        assert (seen["base"] is None) is (not fresh) and (seen["qkv_rope=1"] is None) is (not fresh)
        assert seen["qkv_rope=1,qkv_block_k=2048"] and seen["gate_up_warps=8"]
    # --output-code: the child logs inductor's generated code, kept per variant under a file-safe name
    args = argparse.Namespace(passthrough=[], timeout=5, fresh_cache=False, output_code=str(tmp_path / "code"))
    decode_variants.run_variant(args, "quant=int8_weight_only,qkv_rope=1")
    assert (tmp_path / "code" / "quant=int8_weight_only_qkv_rope=1.log").read_text() == "output_code"


def test_decode_variants_summary_gives_a_repeated_variants_mean_and_spread():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from decode_variants import summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [{"variant": "base", "e2e_tok_s": 950.0, "graph_step_ms": 1.0}, {"variant": "x", "error": "boom"},
            {"variant": "x", "e2e_tok_s": 990.0, "graph_step_ms": 0.97},
            {"variant": "base", "e2e_tok_s": 1010.0, "graph_step_ms": 0.96}]  # fmt: skip
    text = summary(rows)
    assert "ERROR boom" in text
    repeated = text.split("variant (repeated)")[1].splitlines()[1:]
    assert len(repeated) == 1 and repeated[0].split() == ["base", "2", "980.0", "950-1010", "0.9800"]


def test_int8_mm_micro_needs_a_gpu_and_says_so():
    """The eager int8 product benchmark times a CUDA kernel: without a GPU it stops at once with a clear message
    (its GPU figures: benchmarks/results/int8_mm_h200.json)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_mm_micro.py")], capture_output=True,
                          text=True, cwd=ROOT / "benchmarks", timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
