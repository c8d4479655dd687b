"""FSDP2 training on CPU with the gloo backend: 2 ranks match 1 rank for the same global batch, a run resumes on
another rank count and continues with the same losses, metrics are written once, checkpoints are single-process
files. All 2-rank work of a session runs in one spawned job (process start-up dominates on CPU)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamaforge.core.distributed import DistributedError, env_info, fqn_to_indexed, indexed_to_fqn, init_distributed

SPEC = {
    "vocab_size": 64,
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "max_positions": 64,
    "rope_theta": 10000.0,
    "tie_embeddings": True,  # the tied embedding/head must survive gather and re-shard
}
STEPS, STOP = 6, 3
GLOBAL_BATCH = 4


def _streams() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.arange(3000) % 17
    noise = torch.randint(0, 64, (3000,), generator=g)
    tokens = torch.where(torch.rand(3000, generator=g) < 0.8, base, noise)
    return tokens[:2600], tokens[2600:]


def _nf4_unavailable() -> str | None:
    try:
        from llamaforge.plugins.quantizers import _nf4_probe

        return _nf4_probe("cpu")
    except Exception as exc:  # bitsandbytes missing or broken
        return f"{type(exc).__name__}: {exc}"


def _qlora_model():
    """The tiny model with an NF4 base (bitsandbytes codes in uint8 tensors) and trainable LoRA on every linear."""
    from llamaforge.core.finetune import add_adapter, mark_only_adapter_trainable
    from llamaforge.core.loading import apply_transform
    from llamaforge.core.model import build_model
    from llamaforge.core.spec import load_spec

    model = apply_transform(build_model(load_spec(SPEC), seed=0, dtype="float32"), "quantizer", "nf4")
    model = add_adapter(model, "lora", rank=4, alpha=8, targets="all-linear", seed=1)
    mark_only_adapter_trainable(model, "default")
    return model


def _trainer(out: Path, rank: int, world_size: int, qlora: bool = False):
    from llamaforge.core.model import build_model
    from llamaforge.core.spec import load_spec
    from llamaforge.core.train import Trainer, TrainSpec

    spec = TrainSpec(
        steps=STEPS,
        batch_size=GLOBAL_BATCH // world_size,
        seq_len=16,
        lr=3e-3,
        warmup_steps=1,
        log_every=1,
        eval_every=STEPS,
        eval_batches=2,
        device="cpu",
    )
    train, val = _streams()
    model = _qlora_model() if qlora else build_model(load_spec(SPEC), seed=0, dtype="float32")
    return Trainer(model, spec, train, val, out, progress=False, rank=rank, world_size=world_size)


def _worker(rank: int, world_size: int, port: int, root: str, qlora: bool) -> None:
    """One rank of the spawned 2-rank job: a full run, a run stopped early, and a resume of a 1-rank run."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert info.backend == "gloo" and info.world_size == world_size
    root_path = Path(root)
    _trainer(root_path / "full2", rank, world_size).fit()
    _trainer(root_path / "stop2", rank, world_size).fit(stop_at=STOP)
    _trainer(root_path / "stop1", rank, world_size).fit(resume=True)
    if qlora:
        trainer = _trainer(root_path / "qlora2", rank, world_size, qlora=True)
        packed = trainer.model.model.layers[0].mlp.down_proj.weight  # the NF4 codes, now a sharded DTensor
        shard = {"local": packed.to_local().shape[0], "full": packed.shape[0], "dtype": str(packed.dtype)}
        (root_path / f"qlora_shard{rank}.json").write_text(json.dumps(shard))
        trainer.fit()
    from llamaforge.core.distributed import shutdown

    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    from llamaforge.core.train import read_metrics

    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    _trainer(root / "full1", 0, 1).fit()
    _trainer(root / "stop1", 0, 1).fit(stop_at=STOP)
    stop1_losses = _losses(root / "stop1")
    qlora = _nf4_unavailable() is None
    if qlora:
        _trainer(root / "qlora1", 0, 1, qlora=True).fit()
    started = time.perf_counter()
    mp.spawn(_worker, args=(2, _free_port(), str(root), qlora), nprocs=2, join=True)
    print(f"2-rank job: {time.perf_counter() - started:.1f} s")
    _trainer(root / "stop2", 0, 1).fit(resume=True)  # a 2-rank checkpoint resumed by one process
    return {"root": root, "stop1_before": stop1_losses}  # type: ignore[dict-item]


def test_two_ranks_match_one_rank_for_the_same_global_batch(runs):
    one, two = _losses(runs["root"] / "full1"), _losses(runs["root"] / "full2")
    assert len(one) == len(two) == STEPS
    assert one[0] != one[-1]  # the model learns, so a wrong gradient would show
    for a, b in zip(one, two):
        assert math.isclose(a, b, rel_tol=2e-4), (one, two)


def test_final_weights_match_and_load_as_a_plain_model(runs):
    import llamaforge as lf
    from llamaforge.core.io import load_safetensors

    one = load_safetensors(runs["root"] / "full1" / "model.safetensors")
    two = load_safetensors(runs["root"] / "full2" / "model.safetensors")
    assert set(one) == set(two)  # same keys: the tied head is stored once, as a single process stores it
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=2e-5)
    model = lf.load_model(runs["root"] / "full2")
    assert type(model).__name__ == "LlamaForgeModel"


def test_optimizer_state_has_the_single_process_layout(runs):
    from llamaforge.core.io import load_safetensors

    one = load_safetensors(runs["root"] / "full1" / "checkpoint" / "optimizer.safetensors")
    two = load_safetensors(runs["root"] / "full2" / "checkpoint" / "optimizer.safetensors")
    assert set(one) == set(two)
    for name in one:
        if name.startswith("state."):
            torch.testing.assert_close(two[name], one[name], rtol=2e-3, atol=1e-6)
    s1 = json.loads((runs["root"] / "full1" / "checkpoint" / "state.json").read_text())
    s2 = json.loads((runs["root"] / "full2" / "checkpoint" / "state.json").read_text())
    assert s1["param_groups"] == s2["param_groups"]
    assert s2["loader"]["world_size"] == 2 and s2["loader"]["blocks_consumed"] == s1["loader"]["blocks_consumed"]


def test_metrics_are_written_once(runs):
    rows = [json.loads(line) for line in (runs["root"] / "full2" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert sum("val_loss" in r for r in rows) == 1
    assert rows[0]["tokens"] == GLOBAL_BATCH * 16  # tokens counted over all ranks


@pytest.mark.parametrize("run, before", [("stop2", "two ranks, resumed on one"), ("stop1", "one rank, on two")])
def test_resume_on_another_rank_count_continues_the_same_run(runs, run, before):
    reference = _losses(runs["root"] / "full1")
    resumed = _losses(runs["root"] / run)
    assert len(resumed) == STEPS, before
    for a, b in zip(reference, resumed):
        assert math.isclose(a, b, rel_tol=5e-4), (before, reference, resumed)


def test_indexed_and_fqn_optimizer_layouts_round_trip():
    order = ["a.weight", "b.weight", "c.bias"]
    state = {
        "state": {0: {"step": torch.tensor(3.0)}, 2: {"step": torch.tensor(1.0)}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}],
    }
    named = indexed_to_fqn(state, order)
    assert named["param_groups"][1]["params"] == ["c.bias"] and set(named["state"]) == {"a.weight", "c.bias"}
    back = fqn_to_indexed(named, order)
    assert back["param_groups"] == state["param_groups"] and set(back["state"]) == {0, 2}
    with pytest.raises(DistributedError, match="same model"):
        indexed_to_fqn(state, order[:2])


def test_env_info_reads_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_info() is None
    assert init_distributed("cpu").world_size == 1  # a plain process stays single
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = env_info()
    assert info is not None and (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="outside"):
        env_info()


def test_loader_regroups_across_world_sizes():
    """The global block order does not depend on how a global batch is split over ranks."""
    from llamaforge.core.data import BlockLoader, DataError

    tokens = torch.arange(16 * 23 + 1)  # 23 blocks: not divisible by 2, so truncation differs per rank count
    single = BlockLoader(tokens, batch_size=4, seq_len=16, seed=3)
    ranks = [BlockLoader(tokens, batch_size=2, seq_len=16, seed=3, rank=r, world_size=2) for r in range(2)]
    it1, its = iter(single), [iter(r) for r in ranks]
    for _ in range(7):  # across an epoch boundary (5 global batches per epoch)
        a = next(it1)[0]
        b = torch.cat([next(i)[0] for i in its])
        assert sorted(a[:, 0].tolist()) == sorted(b[:, 0].tolist())
    state = ranks[0].state_dict()
    fresh = BlockLoader(tokens, batch_size=4, seq_len=16, seed=3)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.position) == (single.epoch, single.position)
    odd = BlockLoader(tokens, batch_size=3, seq_len=16, seed=3)
    with pytest.raises(DataError, match="global batch"):
        odd.load_state_dict(state)


@pytest.mark.slow
def test_torchrun_cli_trains_and_resumes_on_one_process(tmp_path):
    """The documented command: torchrun --nproc-per-node 2 -m llamaforge train ...; then --resume without it."""
    text = "\n".join(f"Story {i}: the cat sat on the mat and the dog ran to the park." for i in range(400))
    (tmp_path / "data.txt").write_text(text)
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({**SPEC, "vocab_size": 300}))
    common = ["--spec", str(spec), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run")]
    sets = ["--set", "steps=4", "--set", "batch_size=2", "--set", "seq_len=16", "--set", "warmup_steps=1"]
    sets += ["--set", "log_every=1", "--set", "eval_every=2", "--set", "device=cpu", "--vocab-size", "300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    cmd = [*launch, str(_free_port()), "-m", "llamaforge", "train", *common, *sets, "--stop-after", "2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"steps"') == 1, done.stdout  # one summary, from rank 0
    summary = json.loads(done.stdout)
    assert summary["steps"] == 2 and summary["world_size"] == 2
    resumed = subprocess.run(
        [sys.executable, "-m", "llamaforge", "train", *common, "--resume", *sets[:2], "--set", "batch_size=4",
         *sets[4:], "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_fsdp_qlora_shards_the_nf4_base_and_matches_one_rank(runs):
    reason = _nf4_unavailable()
    if reason is not None:
        pytest.skip(f"bitsandbytes NF4 does not run on this CPU: {reason}")
    import llamaforge as lf
    from llamaforge.core.io import load_safetensors

    shards = [json.loads((runs["root"] / f"qlora_shard{r}.json").read_text()) for r in range(2)]
    assert all(s["dtype"] == "torch.uint8" for s in shards)
    assert sum(s["local"] for s in shards) == shards[0]["full"] and shards[0]["local"] < shards[0]["full"]
    one, two = _losses(runs["root"] / "qlora1"), _losses(runs["root"] / "qlora2")
    assert len(one) == len(two) == STEPS and one[0] != one[-1]
    for a, b in zip(one, two):
        assert math.isclose(a, b, rel_tol=2e-4), (one, two)
    w1 = load_safetensors(runs["root"] / "qlora1" / "model.safetensors")
    w2 = load_safetensors(runs["root"] / "qlora2" / "model.safetensors")
    assert set(w1) == set(w2)
    for name in w1:
        if "lora_" in name or w1[name].dtype == torch.uint8:  # trained adapters close, frozen codes identical
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=2e-5)
    reloaded = lf.load_model(runs["root"] / "qlora2")  # transforms.json rebuilds nf4 + lora, then loads
    assert "lora_A" in str(reloaded.model.layers[0].mlp.down_proj)
