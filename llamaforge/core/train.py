"""Training: a validated training spec and a Trainer with exact (bitwise on CPU) resume.

A run directory is a loadable model directory (spec.yaml + model.safetensors + tokenizer files) plus
`train.yaml`, metrics (JSONL, CSV, PNG) and `checkpoint/` (optimizer state, RNG, data position), so every command
that takes MODEL accepts it, and `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llamaforge.core.data import BlockLoader, eval_batches
from llamaforge.core.io import atomic_write_json, atomic_write_text, load_safetensors, save_safetensors
from llamaforge.core.loading import save_model
from llamaforge.errors import LlamaforgeError, SpecError

TRAIN_SPEC_FILE = "train.yaml"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


class TrainSpec(BaseModel):
    """Optimisation settings; every field can be overridden from the CLI with --set name=value."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=1000, ge=1, description="optimizer steps (see also `tokens`)")
    tokens: int | None = Field(default=None, ge=1, description="token budget; overrides `steps` when set")
    batch_size: int = Field(default=16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(default=1, ge=1)
    seq_len: int = Field(default=256, ge=2)
    lr: float = Field(default=3e-3, gt=0)
    min_lr: float = Field(default=3e-4, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    eval_every: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=20, ge=1)
    log_every: int = Field(default=10, ge=1)
    save_every: int | None = Field(default=None, ge=1, description="checkpoint interval (default: at evals)")
    seed: int = 0
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: str = "auto"
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below the step count ({self.total_steps})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step))
        return self.steps

    @classmethod
    def parse(cls, data: dict[str, Any], origin: str = "training spec") -> TrainSpec:
        from llamaforge.core.spec import _short_errors

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(f"invalid {origin}: {_short_errors(exc)}") from None

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> TrainSpec:
        data: dict[str, Any] = {}
        if isinstance(source, dict):
            data = dict(source)
        elif source is not None:
            path = Path(source)
            if not path.exists():
                raise SpecError(f"training spec {path} does not exist")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise SpecError(f"cannot parse training spec {path}: {exc}") from None
            if not isinstance(loaded, dict):
                raise SpecError(f"{path}: a training spec is a mapping of fields")
            data = loaded.get("train", loaded) if "train" in loaded else loaded
        data.update(overrides or {})
        return cls.parse(data)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`name=value` strings -> dict, values parsed as YAML scalars (so 1e-3, true, null work)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SpecError(f"--set expects name=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def lr_at(spec: TrainSpec, step: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at the last step."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    total = spec.total_steps
    span = max(1, total - spec.warmup_steps - 1)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: Any,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over non-overlapping blocks."""
    seq_len = seq_len or min(model.spec.max_positions, 256)
    device = model.device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for inputs, targets in eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches):
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = model(inputs, targets, return_logits=False).loss
            n = int((targets != -100).sum())
            total_loss += float(loss) * n
            total_tokens += n
    finally:
        model.train(was_training)
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": total_tokens}


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float | None
    tokens: int
    tokens_per_s: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs a TrainSpec on a model and a token stream, writing a resumable run directory."""

    def __init__(
        self,
        model: Any,
        spec: TrainSpec,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor | None,
        out: str | Path,
        *,
        tokenizer: Any = None,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        extra_metadata: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.out = Path(out)
        self.tokenizer = tokenizer
        self.progress = progress
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(spec.device)
        self.model = model.to(self.device)
        if spec.activation_checkpointing:
            self.model.gradient_checkpointing = True
        self.autocast_dtype = None
        if spec.precision == "bf16" or (spec.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        self.loader = BlockLoader(
            train_tokens,
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            seed=spec.seed,
            rank=rank,
            world_size=world_size,
        )
        self.val_tokens = val_tokens
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, fused=fused
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.extra_metadata = extra_metadata or {}
        self._forward: Callable[..., Any] = self.model
        if spec.compile:
            self._forward = torch.compile(self.model)

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        save_model(self.model, self.out, metadata={"step": str(self.step)})
        if self.tokenizer is not None:
            self.tokenizer.save(self.out)
        atomic_write_text(self.out / TRAIN_SPEC_FILE, yaml.safe_dump(self.spec.model_dump(), sort_keys=False))
        ckpt = self.out / CHECKPOINT_DIR
        ckpt.mkdir(parents=True, exist_ok=True)
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, st in opt_state["state"].items():
            for name, value in st.items():
                tensors[f"state.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_safetensors(ckpt / "optimizer.safetensors", tensors)
        atomic_write_json(
            ckpt / "state.json",
            {
                "step": self.step,
                "param_groups": opt_state["param_groups"],
                "loader": self.loader.state_dict(),
                "history": self.history,
                **self.extra_metadata,
            },
        )

    def load_checkpoint(self) -> None:
        """Restore weights, optimizer, RNG and data position from the run directory."""
        ckpt = self.out / CHECKPOINT_DIR
        if not (ckpt / "state.json").exists():
            raise LlamaforgeError(f"cannot resume: {ckpt / 'state.json'} not found (was the run ever checkpointed?)")
        from llamaforge.core.loading import WEIGHTS_FILE, load_state_into

        weights = load_safetensors(self.out / WEIGHTS_FILE, device=self.device)
        load_state_into(self.model, weights, source=str(self.out / WEIGHTS_FILE))
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_safetensors(ckpt / "optimizer.safetensors")
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[name] = value.to(self.device) if name != "step" else value
        self.optimizer.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))

    # ----- the loop -------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / METRICS_FILE).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def run_eval(self) -> dict[str, float] | None:
        if self.val_tokens is None or self.val_tokens.numel() <= self.spec.seq_len:
            return None
        return evaluate(
            self.model,
            self.val_tokens,
            batch_size=self.spec.batch_size,
            seq_len=self.spec.seq_len,
            max_batches=self.spec.eval_batches,
            autocast_dtype=self.autocast_dtype,
        )

    def fit(self, *, resume: bool = False) -> TrainResult:
        from tqdm.auto import tqdm

        spec = self.spec
        if resume:
            self.load_checkpoint()
            if self.rank == 0 and (self.out / METRICS_FILE).exists():
                # rewrite metrics to what the checkpoint knew, dropping lines logged after it
                atomic_write_text(self.out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.history))
        else:
            torch.manual_seed(spec.seed)
            if self.rank == 0:
                (self.out / METRICS_FILE).unlink(missing_ok=True)
        total = spec.total_steps
        batches = iter(self.loader)
        self.model.train()
        bar = tqdm(
            total=total, initial=self.step, disable=not self.progress or self.rank != 0, unit="step", dynamic_ncols=True
        )
        start = time.perf_counter()
        tokens_done = 0
        last_loss = float("nan")
        val_loss = None
        window_loss = torch.zeros((), device=self.device)
        window_steps = 0
        while self.step < total:
            lr = lr_at(spec, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=self.device)
            for _ in range(spec.grad_accum):
                inputs, targets = next(batches)
                inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                with torch.autocast(
                    self.device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ):
                    loss = self._forward(inputs, targets, return_logits=False).loss / spec.grad_accum
                loss.backward()
                step_loss += loss.detach()
            if self.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_done += spec.tokens_per_step * self.world_size
            window_loss += step_loss
            window_steps += 1
            bar.update(1)
            is_last = self.step == total
            if self.step % spec.log_every == 0 or is_last:
                last_loss = float(window_loss / window_steps)  # the only host sync, once per log interval
                window_loss.zero_()
                window_steps = 0
                elapsed = time.perf_counter() - start
                tps = tokens_done / max(elapsed, 1e-9)
                self._log(
                    {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": lr,
                        "tokens_per_s": tps,
                        "tokens": self.step * spec.tokens_per_step * self.world_size,
                    }
                )
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
            if self.step % spec.eval_every == 0 or is_last:
                metrics = self.run_eval()
                if metrics is not None:
                    val_loss = metrics["loss"]
                    self._log({"step": self.step, "val_loss": val_loss, "val_perplexity": metrics["perplexity"]})
                    bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{val_loss:.3f}")
                if spec.save_every is None:
                    self.save()
            if spec.save_every is not None and (self.step % spec.save_every == 0 or is_last):
                self.save()
        bar.close()
        elapsed = time.perf_counter() - start
        self.save()
        if self.rank == 0:
            write_metrics_csv(self.out)
            plot_losses(self.out)
        return TrainResult(
            steps=self.step,
            train_loss=last_loss,
            val_loss=val_loss,
            tokens=tokens_done,
            tokens_per_s=tokens_done / max(elapsed, 1e-9),
            seconds=elapsed,
            history=list(self.history),
        )


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics_csv(run: str | Path) -> None:
    import csv
    import io

    rows = read_metrics(run)
    keys = ["step", "loss", "val_loss", "val_perplexity", "lr", "tokens", "tokens_per_s"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(run) / "metrics.csv", buf.getvalue())


def plot_losses(run: str | Path, path: str | Path | None = None) -> Path | None:
    """loss_curve.png: training loss and validation loss against steps."""
    rows = read_metrics(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.4)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", ms=3, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run).name)
    fig.tight_layout()
    out = Path(path) if path else Path(run) / "loss_curve.png"
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
