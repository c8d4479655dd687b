"""`llamaforge ablate`: variant expansion, same data order across variants, the report, the seed-chapter file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from llamaforge.cli import cli
from llamaforge.core.loading import load_model
from llamaforge.core.train import (
    TrainSpec,
    apply_variant,
    expand_variants,
    fit_spec_to_tokenizer,
    parse_vary,
    read_run_file,
    variant_dirname,
)
from llamaforge.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
SEED_CHAPTER = ROOT / "examples" / "ablations" / "seed-chapter.yaml"
SMALL = {"preset": "tiny", "dim": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 1, "multiple_of": 16}


def test_parse_vary_types_values_and_rejects_garbage():
    axes = parse_vary(["norm=rmsnorm,layernorm", "n_kv_heads=1,2", "train.lr=1e-3,3e-3", "tie_embeddings=true"])
    assert axes[0] == ("norm", ["rmsnorm", "layernorm"])
    assert axes[1] == ("n_kv_heads", [1, 2])
    assert [float(v) for v in axes[2][1]] == [1e-3, 3e-3]
    assert axes[3] == ("tie_embeddings", [True])
    with pytest.raises(SpecError, match="PATH=A,B"):
        parse_vary(["norm"])
    with pytest.raises(SpecError, match="no values"):
        parse_vary(["norm="])
    assert parse_vary({"model": ["a", "b"]}) == [("model", ["a", "b"])]


def test_expand_variants_is_the_product_in_order():
    variants = expand_variants([("a", [1, 2]), ("b", ["x", "y", "z"])])
    assert len(variants) == 6
    assert variants[:3] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}]
    assert expand_variants([]) == [{}]
    assert variant_dirname({"model": "examples/x/my-spec.yaml", "norm": "layernorm"}) == "model-my-spec__norm-layernorm"


def test_apply_variant_paths():
    base = TrainSpec(steps=10, warmup_steps=1)
    spec, tspec = apply_variant("tiny", base, {"activation.name": "relu", "norm": "layernorm"}, {"dropout": 0.1})
    assert (spec.activation.name, spec.norm.name, spec.dropout) == ("relu", "layernorm", 0.1)
    assert tspec is base
    spec, tspec = apply_variant("tiny", base, {"model": "seed-feedforward", "train.lr": 1e-3}, {"dropout": 0.1})
    assert spec.n_layers == 0 and spec.head.name == "mlp" and spec.dropout == 0.1
    assert tspec.lr == 1e-3 and tspec.steps == 10
    with pytest.raises(SpecError):
        apply_variant("tiny", base, {"norm": "no-such-norm"})
    with pytest.raises(SpecError):
        apply_variant("tiny", base, {"train.lrr": 1})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from llamaforge.core.corpus import generate_corpus

    d = tmp_path_factory.mktemp("abl")
    (d / "stories.txt").write_text("\n".join(generate_corpus(150, seed=7)), encoding="utf-8")
    (d / "small.yaml").write_text(yaml.safe_dump(SMALL))
    return d


TRAIN_ARGS = [
    "--set", "steps=4", "--set", "batch_size=4", "--set", "seq_len=32", "--set", "warmup_steps=1",
    "--set", "eval_every=2", "--set", "eval_batches=2", "--set", "log_every=1",
]  # fmt: skip


def test_ablate_cli_writes_table_csv_png_with_one_data_order(corpus):
    out = corpus / "out"
    res = CliRunner().invoke(
        cli,
        ["ablate", "--spec", str(corpus / "small.yaml"), "--vary", "norm=rmsnorm,layernorm", "--vary",
         "activation.name=swiglu,relu", "--data", str(corpus / "stories.txt"), "--out", str(out),
         "--vocab-size", "300", *TRAIN_ARGS, "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["variant"] for r in rows] == [
        "norm=rmsnorm, activation.name=swiglu",
        "norm=rmsnorm, activation.name=relu",
        "norm=layernorm, activation.name=swiglu",
        "norm=layernorm, activation.name=relu",
    ]
    assert len({r["data_digest"] for r in rows}) == 1  # every variant saw exactly the same batches
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] == 4 * 4 * 32
    assert len({r["params"] for r in rows}) > 1  # layernorm has biases, relu has no gate
    summary = json.loads((out / "results.json").read_text())
    assert summary["same_data_order"] is True
    table = (out / "results.md").read_text()
    assert "| variant | params | train loss | val loss |" in table and "identical" in table
    with (out / "results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 4 and {"params", "train_loss", "val_loss", "tokens_per_s"} <= set(csv_rows[0])
    assert all(float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in csv_rows)
    assert (out / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(out / "norm-layernorm__activation.name-relu")
    assert (model.spec.norm.name, model.spec.activation.name, model.spec.dim) == ("layernorm", "relu", 32)


def test_ablate_from_a_run_file_with_model_variants(corpus):
    run_file = corpus / "ablation.yaml"
    small = corpus / "small.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "model": str(small),
                "data": "stories.txt",  # relative to the run file
                "vocab_size": 300,
                "vary": {"model": [str(small), "seed-feedforward"]},
                "model_updates": {"max_positions": 32},
                "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "warmup_steps": 1, "eval_every": 3,
                          "eval_batches": 1},
            }
        )
    )  # fmt: skip
    res = CliRunner().invoke(cli, ["ablate", "--spec", str(run_file), "--out", str(corpus / "out2")])
    assert res.exit_code == 0, res.output
    assert "vocab_size set to 300" in res.stderr
    rows = json.loads((corpus / "out2" / "results.json").read_text())["variants"]
    assert [r["variant"].split("=")[0] for r in rows] == ["model", "model"]
    assert rows[1]["params"] == 300 * 288 + 288 * 288 + 288 + 288 * 300 + 300  # the chapter's FF shape at vocab 300
    assert rows[0]["data_digest"] == rows[1]["data_digest"]


def test_ablate_without_axes_is_a_user_error(corpus):
    res = CliRunner().invoke(cli, ["ablate", "--spec", "tiny", "--data", str(corpus / "stories.txt"), "--out", "x"])
    assert res.exit_code == 2 and "nothing to vary" in res.output


def test_seed_chapter_file_resolves(shared_data):
    data = read_run_file(SEED_CHAPTER)
    assert data is not None and Path(data["data"]).exists() and Path(data["val_data"]).exists()
    tspec = TrainSpec.load(data["train"])
    assert tspec.steps == 1000 and tspec.seq_len <= 128
    axes = parse_vary(data["vary"])
    assert axes == [("model", ["seed-feedforward", "seed-llama"])]
    from llamaforge.core.tokenizer import load_tokenizer

    tok = load_tokenizer(data["tokenizer"])
    tok.add_pad_token(data["pad_token"])
    assert tok.vocab_size == 32001
    params = []
    for assignment in expand_variants(axes):
        spec, _ = apply_variant(data["model"], tspec, assignment, data.get("model_updates"))
        fitted, notes = fit_spec_to_tokenizer(spec, tok, tspec.seq_len)
        assert notes == [] and fitted.vocab_size == 32001 and fitted.pad_token_id == 32000
        from llamaforge.core.sizing import spec_summary

        params.append(spec_summary(fitted)["params"])
    assert params[0] == 18_547_809  # the chapter's printed count for its feed-forward model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_ablation_on_cuda_releases_each_variants_graphs(corpus):
    """Compiled variants on CUDA replay CUDA graphs (the trainer's default); their memory pools are dropped after
    each variant, so a long ablation does not hold every earlier variant's activations."""
    before = torch.cuda.memory_reserved()
    out = corpus / "out-cuda"
    res = CliRunner().invoke(
        cli,
        ["ablate", "--spec", str(corpus / "small.yaml"), "--vary", "norm=rmsnorm,layernorm", "--data",
         str(corpus / "stories.txt"), "--out", str(out), "--vocab-size", "300", *TRAIN_ARGS, "--set", "compile=true",
         "--set", "device=cuda", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 2 and all(math.isfinite(r["val_loss"]) for r in rows)
    assert torch.cuda.memory_reserved() - before < 64 * 2**20
