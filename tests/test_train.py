"""Training spec, schedule, gradient accumulation, exact resume, evaluation and the train/eval CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from llamaforge.cli import cli
from llamaforge.core.evaluate import evaluate
from llamaforge.core.loading import load_model
from llamaforge.core.model import build_model
from llamaforge.core.spec import load_spec
from llamaforge.core.train import Trainer, TrainSpec, lr_at, parse_overrides, read_metrics
from llamaforge.errors import LlamaforgeError, SpecError

SPEC = {
    "vocab_size": 64,
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "max_positions": 64,
    "rope_theta": 10000.0,
}


def tiny(**updates):
    return build_model(load_spec({**SPEC, **updates}), seed=0)


@pytest.fixture(scope="module")
def streams():
    g = torch.Generator().manual_seed(0)
    # a learnable stream: a noisy cycle, so losses move during a few steps
    base = torch.arange(6000) % 17
    noise = torch.randint(0, 64, (6000,), generator=g)
    keep = torch.rand(6000, generator=g) < 0.8
    tokens = torch.where(keep, base, noise)
    return tokens[:5000], tokens[5000:]


def spec_(**kw):
    base = dict(steps=8, batch_size=4, seq_len=16, warmup_steps=2, log_every=1, eval_every=4, eval_batches=2)
    base.update(kw)
    return TrainSpec(**base)


# ----- TrainSpec ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"stepz": 3}, "unknown field 'stepz'"),
        ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"grad_accum": -1}, "grad_accum"),
    ],
)
def test_train_spec_rejects_bad_fields(data, fragment):
    with pytest.raises(SpecError, match=fragment):
        TrainSpec.parse(data)


def test_train_spec_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 50, "lr": 0.01, "batch_size": 2}}))
    spec = TrainSpec.load(path, parse_overrides(["lr=1e-3", "steps=200", "compile=true", "tokens=null"]))
    assert (spec.steps, spec.lr, spec.batch_size, spec.compile, spec.tokens) == (200, 1e-3, 2, True, None)
    with pytest.raises(SpecError, match="name=value"):
        parse_overrides(["lr"])
    with pytest.raises(SpecError, match="does not exist"):
        TrainSpec.load(tmp_path / "missing.yaml")


def test_default_warmup_shrinks_for_short_runs_but_an_explicit_one_is_checked():
    assert TrainSpec(steps=20).warmup_steps == 2
    assert TrainSpec(steps=1000).warmup_steps == 50
    with pytest.raises(SpecError, match="warmup_steps"):
        TrainSpec.parse({"steps": 20, "warmup_steps": 30})


def test_token_budget_sets_steps():
    spec = TrainSpec(tokens=10_000, batch_size=4, seq_len=16, grad_accum=2, warmup_steps=5)
    assert spec.tokens_per_step == 128
    assert spec.total_steps == math.ceil(10_000 / 128)


# ----- schedule ----------------------------------------------------------------------------------------------------
def test_warmup_then_cosine_values():
    spec = TrainSpec(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [lr_at(spec, s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(spec, 10) == pytest.approx(1.0)
    assert lr_at(spec, 109) == pytest.approx(0.1)
    mid = 10 + (109 - 10) / 2
    assert lr_at(spec, int(mid)) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))


@given(st.integers(2, 300), st.integers(0, 50), st.floats(1e-5, 1.0), st.floats(0.0, 1.0))
def test_schedule_is_bounded_and_decays_after_warmup(steps, warmup, lr, frac):
    warmup = min(warmup, steps - 1)
    spec = TrainSpec(steps=steps, lr=lr, min_lr=lr * frac, warmup_steps=warmup)
    values = [lr_at(spec, s) for s in range(steps)]
    assert all(spec.min_lr - 1e-12 <= v <= lr + 1e-12 for v in values[warmup:])
    assert all(a >= b - 1e-12 for a, b in zip(values[warmup:], values[warmup + 1 :]))
    assert all(0 < v <= lr + 1e-12 for v in values[:warmup])


# ----- optimisation ------------------------------------------------------------------------------------------------
def test_grad_accumulation_matches_a_bigger_batch(streams, tmp_path):
    """accum 2 x batch 4 == batch 8: same logged losses and same gradients at every optimizer step."""
    train, _ = streams
    runs = {}
    for name, kw in {"accum": dict(batch_size=4, grad_accum=2), "big": dict(batch_size=8, grad_accum=1)}.items():
        trainer = Trainer(tiny(), spec_(steps=3, warmup_steps=1, **kw), train, None, tmp_path / name, progress=False)
        grads = []
        step = trainer.optimizer.step

        def recording_step(*a, _step=step, _grads=grads, _model=trainer.model, **k):
            _grads.append({n: p.grad.clone() for n, p in _model.named_parameters()})
            return _step(*a, **k)

        trainer.optimizer.step = recording_step
        runs[name] = (trainer.fit(), grads)
    (ra, ga), (rb, gb) = runs["accum"], runs["big"]
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], rel=1e-5)
    assert len(ga) == len(gb) == 3
    for step_a, step_b in zip(ga, gb):
        for n in step_a:
            torch.testing.assert_close(step_a[n], step_b[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow  # inductor compiles the model on CPU: ~30 s
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_training_follows_the_eager_losses(streams, tmp_path):
    """`compile: true` goes through the trainer's own torch.compile settings and trains the same model."""
    train, _ = streams
    losses = {}
    for compiled in (False, True):
        spec = spec_(steps=4, warmup_steps=1, compile=compiled)
        result = Trainer(tiny(), spec, train, None, tmp_path / str(compiled), progress=False).fit()
        losses[compiled] = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_cuda_graphs_need_compile():
    with pytest.raises(ValueError, match="cuda_graphs replays the compiled step"):
        spec_(cuda_graphs=True)
    assert spec_(cuda_graphs=True, compile=True).cuda_graphs  # on a CPU the option is accepted and does nothing
    assert spec_().cuda_graphs is None  # unset: decided by the trainer
    assert spec_(cuda_graphs="auto").cuda_graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        spec_(cuda_graphs="sometimes")


def test_cuda_graphs_by_default_only_where_they_apply(streams, tmp_path):
    """Unset, the compiled step replays as CUDA graphs on a single CUDA process without activation checkpointing
    (host-bound steps otherwise); never on a CPU, never without compile; an explicit choice wins."""
    train, val = streams
    cuda = torch.device("cuda")

    def decided(device, world_size=1, **fields):
        trainer = Trainer.__new__(Trainer)  # only the decision: no model, no compilation
        trainer.device, trainer.world_size = device, world_size
        return trainer._cuda_graphs(spec_(**fields))

    assert decided(cuda, compile=True)
    assert not decided(cuda, compile=False)
    assert not decided(torch.device("cpu"), compile=True, cuda_graphs=True)
    assert not decided(torch.device("cpu"), compile=True)
    assert not decided(cuda, world_size=2, compile=True)  # FSDP: left out by default (explicit True is an error)
    assert not decided(cuda, compile=True, activation_checkpointing=True)
    assert decided(cuda, compile=True, activation_checkpointing=True, cuda_graphs=True)
    assert not decided(cuda, compile=True, cuda_graphs=False)
    trainer = Trainer(tiny(), spec_(steps=1, compile=True), train, val, tmp_path, progress=False)
    assert not trainer._graphed  # a CPU trainer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_cuda_graphs_train_like_the_compiled_step_with_accumulation_and_evals(streams, tmp_path):
    """Replaying the compiled forward and backward as CUDA graphs gives the losses of the plain compiled step, also
    with two micro-batches per step (the first one's gradients must survive the second replay) and evals between
    steps."""
    train, val = streams
    losses = {}
    for graphs in (False, None):  # None: the default, graphs on here
        spec = spec_(steps=6, warmup_steps=1, grad_accum=2, compile=True, cuda_graphs=graphs, eval_every=3,
                     device="cuda")  # fmt: skip
        trainer = Trainer(tiny(), spec, train, val, tmp_path / str(graphs), progress=False)
        assert trainer._graphed is (graphs is None)
        result = trainer.fit()
        graphs = graphs is None  # the key: whether the step was graphed
        losses[graphs] = [r["loss"] for r in result.history if "loss" in r]
        losses[graphs, "val"] = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert len(losses[True]) == 6 and len(losses[True, "val"]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert losses[True, "val"] == pytest.approx(losses[False, "val"], rel=1e-3)


@pytest.mark.parametrize("scale", [3.0, 0.01])  # gradients clipped / left alone (norm under the limit)
def test_fused_update_folds_clipping_into_the_step_with_the_same_result(scale):
    """With a fused AdamW the update hands the clipping scale to the optimizer's kernel (`grad_scale`) instead of
    rewriting the gradients first: the parameters follow `clip_grad_norm_` + step. CPU has the fused kernel too."""
    from llamaforge.core.train import make_update

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (8, 8)]
    ref = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]

    def adamw(params):
        groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1:2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, fused=True)

    opt_ref, opt = adamw(ref), adamw(ours)
    update = make_update(ours, opt, 1.0, compiled=False)
    for step in range(4):
        grads = [torch.randn(*s, generator=g) * scale for s in shapes]
        if step == 2:
            grads[2] = None  # a parameter without a gradient this step
        for p, q, gr in zip(ref, ours, grads, strict=True):
            p.grad = None if gr is None else gr.clone()
            q.grad = None if gr is None else gr.clone()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        update()
        assert opt.grad_scale is not None and all(q.grad is None for q in ours)  # folded, then zeroed
        assert (opt.grad_scale.item() > 1.0) == (scale > 1.0)
    for p, q in zip(ref, ours, strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    assert "grad_scale" not in str(opt.state_dict().keys())  # nothing of it in checkpoints


@pytest.mark.slow  # inductor compiles the clip + AdamW update on CPU, three times: ~40 s
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_update_follows_the_eager_losses_and_resumes_exactly(streams, tmp_path):
    """`compile_optimizer: true` trains like the eager update through a changing learning rate (no recompilation
    per step), and a stopped run resumes to the uninterrupted run's losses."""
    train, val = streams
    losses = {}
    for compiled in (False, True):
        spec = spec_(steps=6, warmup_steps=2, compile_optimizer=compiled, grad_clip=0.05)  # the clip is active
        result = Trainer(tiny(), spec, train, val, tmp_path / str(compiled), progress=False).fit()
        losses[compiled] = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses[True]) == 6 and losses[True] != losses[True][:1] * 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    spec = spec_(steps=6, warmup_steps=2, compile_optimizer=True, grad_clip=0.05)
    Trainer(tiny(), spec, train, val, tmp_path / "part", progress=False).fit(stop_at=3)
    resumed = Trainer(tiny(), spec, train, val, tmp_path / "part", progress=False).fit(resume=True)
    assert [r["loss"] for r in resumed.history if "loss" in r] == pytest.approx(losses[True], rel=1e-6)


def test_compiled_update_keeps_a_tensor_learning_rate_across_a_checkpoint(streams, tmp_path):
    """The compiled update reads the learning rate as a tensor (a number would be baked into the graph); the
    checkpoint stores it as a number and loading makes it a tensor again."""
    from llamaforge.core.train import set_lr

    train, val = streams
    trainer = Trainer(tiny(), spec_(compile_optimizer=True), train, val, tmp_path / "r", progress=False)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert all(torch.is_tensor(lr) for lr in lrs)
    set_lr(trainer.optimizer, 0.25)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == lrs and float(lrs[0]) == 0.25
    trainer.save()
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert [g["lr"] for g in state["param_groups"]] == [0.25, 0.25]
    again = Trainer(tiny(), spec_(compile_optimizer=True), train, val, tmp_path / "r", progress=False)
    again.load_checkpoint()
    assert all(torch.is_tensor(g["lr"]) and float(g["lr"]) == 0.25 for g in again.optimizer.param_groups)
    eager = Trainer(tiny(), spec_(), train, val, tmp_path / "e", progress=False)
    assert all(isinstance(g["lr"], float) for g in eager.optimizer.param_groups)


def test_training_lowers_the_loss_and_writes_a_loadable_run(streams, tmp_path):
    train, val = streams
    spec = spec_(steps=30, warmup_steps=3, lr=1e-2, eval_every=10, log_every=5)
    model = tiny()
    result = Trainer(model, spec, train, val, tmp_path / "run", progress=False).fit()
    val_losses = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert len(val_losses) == 3 and val_losses[-1] < val_losses[0] - 0.5
    assert result.steps == 30 and result.tokens == 30 * 64
    run = tmp_path / "run"
    for name in ("spec.yaml", "model.safetensors", "train.yaml", "metrics.jsonl", "metrics.csv", "loss_curve.png"):
        assert (run / name).exists(), name
    assert (run / "checkpoint" / "optimizer.safetensors").exists()
    loaded = load_model(run)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert TrainSpec.load(run / "train.yaml") == spec
    csv_rows = (run / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,loss,val_loss") and len(csv_rows) == 1 + len(read_metrics(run))


@pytest.mark.parametrize("stop_at, log_every", [(4, 1), (3, 2)])
def test_resume_is_bitwise_identical_on_cpu(streams, tmp_path, stop_at, log_every):
    """N steps straight == stop part-way + resume: every logged loss equal, weights equal, same data."""
    train, val = streams
    spec = spec_(steps=8, log_every=log_every, eval_every=4)
    straight = Trainer(tiny(dropout=0.1), spec, train, val, tmp_path / "a", progress=False).fit()
    part = Trainer(tiny(dropout=0.1), spec, train, val, tmp_path / "b", progress=False).fit(stop_at=stop_at)
    assert part.steps == stop_at
    # a differently initialised model: everything must come from the checkpoint
    other = build_model(load_spec({**SPEC, "dropout": 0.1}), seed=123)
    resumed_trainer = Trainer(other, spec, train, val, tmp_path / "b", progress=False)
    resumed = resumed_trainer.fit(resume=True)

    def losses(h, key):
        return [(r["step"], r[key]) for r in h if key in r]

    assert losses(resumed.history, "loss") == losses(straight.history, "loss")
    assert losses(resumed.history, "val_loss") == losses(straight.history, "val_loss")
    assert resumed.data_digest == straight.data_digest
    a = load_model(tmp_path / "a").state_dict()
    b = load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert logged == [r["loss"] for r in straight.history if "loss" in r]


def test_resume_without_checkpoint_is_a_user_error(streams, tmp_path):
    train, val = streams
    with pytest.raises(LlamaforgeError, match="cannot resume"):
        Trainer(tiny(), spec_(), train, val, tmp_path / "none", progress=False).fit(resume=True)


# ----- evaluation --------------------------------------------------------------------------------------------------
def test_eval_loss_is_token_weighted_and_perplexity_is_exp(streams):
    _, val = streams
    model = tiny()
    metrics = evaluate(model, val, batch_size=3, seq_len=16)  # 1000 tokens: 62 blocks, a short last batch
    n_blocks = (val.numel() - 1) // 16
    idx = torch.arange(n_blocks)[:, None] * 16 + torch.arange(17)[None, :]
    blocks = val[idx]
    with torch.no_grad():
        logits = model(blocks[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 64).double(), blocks[:, 1:].reshape(-1))
    assert metrics["tokens"] == n_blocks * 16
    assert metrics["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)


# ----- CLI ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    from llamaforge.core.corpus import generate_corpus

    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n".join(generate_corpus(150, seed=3)), encoding="utf-8")
    return path


def test_cli_train_eval_resume_json(story_file, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--spec",
        "tiny",
        "--data",
        str(story_file),
        "--out",
        str(run_dir),
        "--vocab-size",
        "320",
        "--set",
        "steps=6",
        "--set",
        "batch_size=4",
        "--set",
        "seq_len=32",
        "--set",
        "warmup_steps=1",
        "--set",
        "eval_every=3",
        "--set",
        "eval_batches=2",
        "--set",
        "log_every=1",
    ]
    runner = CliRunner()
    first = runner.invoke(cli, [*args, "--stop-after", "3", "--json"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["steps"] == 3
    assert "vocab_size set to 320" in first.stderr
    second = runner.invoke(
        cli,
        ["train", "--spec", "tiny", "--data", str(story_file), "--out", str(run_dir), "--resume", "--json"],
        catch_exceptions=False,
    )
    assert second.exit_code == 0, second.output
    summary = json.loads(second.stdout)
    assert summary["steps"] == 6 and summary["params"] > 0
    assert load_model(run_dir).spec.vocab_size == 320

    eval_args = ["eval", str(run_dir), "--data", str(story_file), "--seq-len", "32", "--max-batches"]
    ev = runner.invoke(cli, [*eval_args, "4", "--json"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.stdout)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert 0 < metrics["loss"] < math.log(320) + 1
    human = runner.invoke(cli, [*eval_args, "2"])
    assert "perplexity" in human.output

    # MODEL may be anything load_model reads: the same weights as a Hugging Face directory score the same
    hf_dir = tmp_path / "hf"
    exported = runner.invoke(cli, ["export", str(run_dir), "--format", "hf", "--out", str(hf_dir)])
    assert exported.exit_code == 0, exported.output
    ev_hf = runner.invoke(cli, ["eval", str(hf_dir), "--data", str(story_file), "--seq-len", "32", "--max-batches",
                                "4", "--json"])  # fmt: skip
    assert ev_hf.exit_code == 0, ev_hf.output
    assert json.loads(ev_hf.stdout)["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_cli_train_errors_are_one_line(story_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        cli, ["train", "--spec", "tiny", "--data", str(story_file), "--out", str(tmp_path / "r"), "--set", "lrr=1"]
    )
    assert res.exit_code == 2 and "unknown field 'lrr'" in res.output
    res = runner.invoke(
        cli, ["train", "--spec", "tiny", "--data", str(story_file), "--out", str(tmp_path / "r2"), "--resume"]
    )
    assert res.exit_code == 2 and "error:" in res.output
