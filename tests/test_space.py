"""`llamaforge space`: the folder is a complete Gradio Space whose app loads on CPU and answers a prompt."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
import yaml
from click.testing import CliRunner

from llamaforge import build_model, load_spec, save_model
from llamaforge.cli import cli
from llamaforge.core.generation import GenerationConfig, generate_text
from llamaforge.core.llama2c import Llama2cConfig, Llama2cTokenizer, write_checkpoint
from llamaforge.core.tokenizer import train_tokenizer

CUDA_ONLY = ("bitsandbytes", "flash-attn", "flash_attn", "triton", "nvidia-", "xformers", "auto-gptq", "vllm")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def import_app(folder):
    """Import the Space's app.py as a module without running its server."""
    name = f"space_app_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = build_model(load_spec("tiny").with_updates(n_layers=1, vocab_size=300, max_positions=64), seed=0)
    save_model(model.to(torch.bfloat16), d)  # a bf16 checkpoint: the Space must still run in float32
    train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=300).save(d)
    return d


@pytest.fixture(scope="module")
def space(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("space")
    r = run("space", run_dir, "--out", out, "--title", "Tiny story teller", "--license", "apache-2.0", "--json")
    assert r.exit_code == 0, r.output
    return out


def test_space_folder_is_complete(space):
    names = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "requirements.txt", "README.md", "space.json", "model/spec.yaml", "model/model.safetensors",
            "model/tokenizer.json", "llamaforge/__init__.py", "llamaforge/core/generation.py"} <= names  # fmt: skip
    front = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py" and front["license"] == "apache-2.0"
    assert front["title"] == "Tiny story teller" and front["suggested_hardware"] == "cpu-basic"
    from safetensors import safe_open

    with safe_open(str(space / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_requirements_install_on_a_cpu_space(space):
    from packaging.requirements import Requirement

    lines = [ln.strip() for ln in (space / "requirements.txt").read_text().splitlines()]
    options = [ln for ln in lines if ln.startswith("--")]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith(("#", "--"))]
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    names = {r.name.lower() for r in reqs}
    assert {"torch", "transformers", "safetensors", "pydantic", "pluggy"} <= names
    assert not any(n.startswith(CUDA_ONLY) for n in names)
    assert "gradio" not in names  # the Space's SDK image provides the version README.md pins


def test_app_generates_what_llamaforge_generates(space, run_dir):
    from llamaforge import load_model
    from llamaforge.core.tokenizer import load_tokenizer

    app = import_app(space)
    got = app.generate("the cat", max_new_tokens=12, temperature=0)
    model = load_model(run_dir, dtype="float32")
    want = generate_text(model, load_tokenizer(run_dir), "the cat", GenerationConfig.from_options(max_new_tokens=12))
    assert isinstance(got, str) and got == want
    model_loaded, _ = app.load()
    assert model_loaded.dtype == torch.float32 and model_loaded.device.type == "cpu"
    sampled = app.generate("a dog", max_new_tokens=5, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert sampled == app.generate("a dog", max_new_tokens=5, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    too_long = app.generate("the cat " * 200, max_new_tokens=5, temperature=0)
    assert "context" in too_long


def test_python_app_py_answers_a_prompt(space, run_dir):
    """The real entry point in a fresh interpreter, using the vendored llamaforge beside app.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPACE_ID")}
    proc = subprocess.run(
        [sys.executable, "app.py", "--prompt", "the cat", "--max-new-tokens", "12"],
        cwd=space,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    app = import_app(space)
    assert proc.stdout.rstrip("\n") == app.generate("the cat", max_new_tokens=12, temperature=0)


def test_gradio_blocks_build_without_launch(space):
    gr = pytest.importorskip("gradio", reason="gradio is not installed; the Space's SDK image provides it")
    demo = import_app(space).build_demo()
    assert isinstance(demo, gr.Blocks)


def test_model_repo_reference_and_llama2c_model(tmp_path):
    """A Space can reference a Hub model repo instead of bundling weights, and bundles llama2.c models too."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [b" ", b"t", b"h", b"e", b" t", b"he", b" the", b"c", b"a", b" c", b"at", b" cat"]
    tok = Llama2cTokenizer(pieces + extra, [0.0] * len(pieces) + [-float(i) for i in range(len(extra))])
    cfg = Llama2cConfig(dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=tok.vocab_size,
                        seq_len=32)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*s, generator=g) for n, s in cfg.weight_shapes()}
    path = write_checkpoint(tmp_path / "stories.bin", cfg, weights)
    tok.save_bin(tmp_path / "tokenizer.bin")
    r = run("space", path, "--out", tmp_path / "bundled", "--json")
    assert r.exit_code == 0, r.output
    app = import_app(tmp_path / "bundled")
    from llamaforge import load_model

    want = generate_text(load_model(path), tok, "the cat", GenerationConfig.from_options(max_new_tokens=6))
    assert app.generate("the cat", max_new_tokens=6, temperature=0) == want
    r = run("space", path, "--out", tmp_path / "ref", "--model-repo", "me/stories", "--llamaforge-requirement",
            "llamaforge==0.1.0")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "ref" / "model").exists() and not (tmp_path / "ref" / "llamaforge").exists()
    assert json.loads((tmp_path / "ref" / "space.json").read_text())["model_repo"] == "me/stories"
    reqs = (tmp_path / "ref" / "requirements.txt").read_text()
    assert "llamaforge==0.1.0" in reqs and "huggingface_hub" in reqs
    assert yaml.safe_load((tmp_path / "ref" / "README.md").read_text().split("---\n")[1])["models"] == ["me/stories"]
