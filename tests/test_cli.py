from __future__ import annotations

import json

from click.testing import CliRunner

from llamaforge.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_plugins_json_lists_every_kind():
    result = run("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert all({"kind", "name", "source"} <= set(r) for r in rows)
    kinds = {r["kind"] for r in rows}
    assert {"norm", "attention", "attention_kernel", "activation", "head", "position_embedding"} <= kinds
    assert any(r["name"] == "rmsnorm" and r["source"] == "llamaforge" for r in rows)


def test_plugins_text():
    result = run("plugins", "--kind", "norm")
    assert result.exit_code == 0
    assert "rmsnorm" in result.output


def test_spec_show_json_counts():
    result = run("spec", "show", "llama3-8b", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == 8_030_261_248
    assert isinstance(data["params"], int)
    assert set(data["weight_bytes"]) == {"fp32", "bf16", "int8", "nf4"}


def test_spec_show_text_and_errors(tmp_path):
    result = run("spec", "show", "tiny")
    assert result.exit_code == 0
    assert "parameters: 2,361,024" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nn_kv_heads: 4\n")
    result = CliRunner().invoke(cli, ["spec", "show", str(bad)])
    assert result.exit_code == 2
    assert "n_kv_heads (4) must divide n_heads (6)" in result.output
