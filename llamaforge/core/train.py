"""Training: a validated training spec and a Trainer with exact (bitwise on CPU) resume.

A run directory is a loadable model directory (spec.yaml + model.safetensors + tokenizer files) plus
`train.yaml`, metrics (JSONL, CSV, PNG) and `checkpoint/` (optimizer state, RNG, data position), so every command
that takes MODEL accepts it, and `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamaforge.core.data import BlockLoader
from llamaforge.core.evaluate import autocast, evaluate
from llamaforge.core.io import atomic_write_json, atomic_write_text, load_safetensors, save_safetensors
from llamaforge.core.loading import save_model
from llamaforge.errors import LlamaforgeError, SpecError

TRAIN_SPEC_FILE = "train.yaml"
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


class TrainingInterrupted(LlamaforgeError):
    """Ctrl-C during training: the message says where the last checkpoint is."""


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
    compile_optimizer: bool = Field(
        default=False, description="compile gradient clipping and the AdamW update as one graph (off until measured)"
    )
    cuda_graphs: bool | None = Field(
        default=None,
        description="with compile on CUDA, replay the compiled forward and backward as CUDA graphs (single process); "
        "null: on wherever that holds, except with activation checkpointing",
    )
    device: str = "auto"
    activation_checkpointing: bool = False

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _auto_graphs(cls, value: Any) -> Any:
        # "auto", like device and precision: the trainer decides (YAML's null means the same)
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs replays the compiled step: it needs compile: true")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            if "warmup_steps" not in self.model_fields_set:  # the default is for long runs: scale it to short ones
                self.warmup_steps = self.total_steps // 10
            else:
                raise ValueError(
                    f"warmup_steps ({self.warmup_steps}) must be below the step count ({self.total_steps})"
                )
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


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float | None
    tokens: int
    tokens_per_s: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    data_digest: str = ""  # chained hash of every training batch: equal digests mean the same data order


def compile_for_training(model: torch.nn.Module, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """torch.compile as the trainer uses it. On CUDA, inductor tunes each generated kernel's launch configuration
    by coordinate descent: on an H200 (125M Llama-3 shape, batch 16 x 1024, bf16) that made a step 4% faster for
    about a minute more compilation, once; pointwise and reduction kernels are a third of a step there. `options`
    adds inductor options (benchmarks A/B them)."""
    device = next(model.parameters()).device
    merged = {"coordinate_descent_tuning": True} if device.type == "cuda" else {}
    merged.update(options or {})
    return torch.compile(model, options=merged or None)


def build_optimizer(
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device,
    compiled: bool = False,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only. Eagerly it is the fused CUDA kernel where there is one. For a
    compiled update inductor generates the kernels, and the learning rate is a tensor, so the schedule's new value
    every step is data rather than a constant that would recompile the graph (on CUDA it lives on the device and
    the update is capturable: nothing in the step waits for the host)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if compiled:
        cuda = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=_lr_tensor(lr, device), betas=betas, eps=eps, capturable=cuda)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


def _lr_tensor(lr: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(lr, dtype=torch.float32, device=device if device.type == "cuda" else "cpu")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate in place (a tensor learning rate keeps its tensor)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_update(
    params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None, *, compiled: bool
) -> Callable[[], None]:
    """Clip, step and zero the gradients. Compiled, inductor can fold the clipping scale into the update's
    single pass over parameters, gradients and moments instead of rewriting every gradient first.

    Eagerly with the fused AdamW kernel (CUDA) the scale is folded too: only the global norm is computed, and the
    kernel divides each gradient by max(1, norm / grad_clip) as it reads it (its `grad_scale` input, which AMP's
    GradScaler uses for loss scaling), the same update as `clip_grad_norm_` followed by the step. Why: clipping
    first is a separate read-and-write pass over every gradient (0.28 ms of a 31 ms step for a 125M model on an
    H200)."""
    fold = (
        grad_clip is not None
        and not compiled
        and bool(optimizer.defaults.get("fused"))
        and all(type(p.data) is torch.Tensor for p in params)  # plain tensors (not FSDP's sharded DTensors)
    )

    def clip_and_step() -> None:
        if fold:
            grads = [p.grad for p in params if p.grad is not None]
            optimizer.grad_scale = None
            if grads:  # clip_grad_norm_'s coefficient is grad_clip / (norm + 1e-6), capped at 1: this is its inverse
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
                optimizer.grad_scale = torch.clamp((norm + 1e-6) / grad_clip, min=1.0)
        elif grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True if compiled else None)
        optimizer.step()

    step = torch.compile(clip_and_step) if compiled else clip_and_step

    def update() -> None:
        step()
        optimizer.zero_grad(set_to_none=True)

    return update


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
        if world_size > 1:  # FSDP2 (llamaforge.core.distributed): shard before the optimizer sees the parameters
            from llamaforge.core.distributed import shard_model

            self.model = shard_model(self.model, param_dtype=self.autocast_dtype)
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
        self.optimizer = build_optimizer(
            params,
            lr=spec.lr,
            betas=(spec.beta1, spec.beta2),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            device=self.device,
            compiled=spec.compile_optimizer,
        )
        self._update = make_update(params, self.optimizer, spec.grad_clip, compiled=spec.compile_optimizer)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.data_digest = ""
        self.train_seconds = 0.0  # time in training steps only (evals and checkpoints excluded)
        self._window_sum = 0.0  # loss sum and step count since the last log line, kept across a resume
        self._window_steps = 0
        self.extra_metadata = extra_metadata or {}
        self._forward: Callable[..., Any] = self.model
        self._graphed = self._cuda_graphs(spec)
        if self._graphed and self.world_size > 1:
            raise LlamaforgeError("cuda_graphs is for single-process training: FSDP's collectives are not captured")
        if spec.compile:
            self._forward = compile_for_training(self.model, {"triton.cudagraphs": True} if self._graphed else None)

    def _cuda_graphs(self, spec: TrainSpec) -> bool:
        """Whether the compiled step is replayed as CUDA graphs. By default wherever it can be: a step that is
        launched kernel by kernel is bound by the host on a fast GPU (H200, 125M Llama-3 shape, batch 16 x 1024: the
        host took 28.4 and 32.6 ms to issue a 29.8 / 32.6 ms step on two machines; with graphs 25.0-25.7 ms of host
        for a 28.8-29.6 ms step, 1.246-1.268x transformers+compile in four runs against 1.118-1.249x without). Left
        out by default under FSDP (collectives are not captured) and with activation checkpointing (not measured with
        graphs)."""
        if spec.cuda_graphs is not None:
            return spec.cuda_graphs and spec.compile and self.device.type == "cuda"
        single = self.world_size == 1 and not spec.activation_checkpointing
        return spec.compile and self.device.type == "cuda" and single

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> None:
        weights, opt_state = None, None
        if self.world_size > 1:  # gathering a sharded model is collective: every rank takes part, rank 0 writes
            from llamaforge.core.distributed import gather_full_state

            weights, opt_state = gather_full_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        save_model(self.model, self.out, metadata={"step": str(self.step)}, state=weights)
        if self.tokenizer is not None:
            self.tokenizer.save(self.out)
        atomic_write_text(self.out / TRAIN_SPEC_FILE, yaml.safe_dump(self.spec.model_dump(), sort_keys=False))
        ckpt = self.out / CHECKPOINT_DIR
        ckpt.mkdir(parents=True, exist_ok=True)
        opt_state = self.optimizer.state_dict() if opt_state is None else opt_state
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
                "param_groups": [  # a compiled update's tensor learning rate is stored as its number
                    {k: v.item() if torch.is_tensor(v) else v for k, v in group.items()}
                    for group in opt_state["param_groups"]
                ],
                "loader": self.loader.state_dict(),
                "history": self.history,
                "data_digest": self.data_digest,
                "train_seconds": self.train_seconds,
                "window": [self._window_sum, self._window_steps],
                **self.extra_metadata,
            },
        )

    def load_checkpoint(self) -> None:
        """Restore weights, optimizer, RNG and data position from the run directory."""
        ckpt = self.out / CHECKPOINT_DIR
        if not (ckpt / "state.json").exists():
            raise LlamaforgeError(f"cannot resume: {ckpt / 'state.json'} not found (was the run ever checkpointed?)")
        from llamaforge.core.loading import WEIGHTS_FILE, load_state_into

        sharded = self.world_size > 1  # full tensors stay on the CPU; each rank keeps its shard of them
        weights = load_safetensors(self.out / WEIGHTS_FILE, device="cpu" if sharded else self.device)
        if not sharded:
            load_state_into(self.model, weights, source=str(self.out / WEIGHTS_FILE))
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_safetensors(ckpt / "optimizer.safetensors")
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                on_device = name != "step" and not sharded
                opt_state["state"].setdefault(int(idx), {})[name] = value.to(self.device) if on_device else value
        if sharded:
            from llamaforge.core.distributed import load_full_state

            load_full_state(self.model, weights, self.optimizer, opt_state)
        else:
            self.optimizer.load_state_dict(opt_state)
        if self.spec.compile_optimizer:  # loaded groups hold numbers; the compiled update reads a tensor
            for group in self.optimizer.param_groups:
                group["lr"] = _lr_tensor(float(group["lr"]), self.device)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.data_digest = str(state.get("data_digest", ""))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._window_sum, self._window_steps = state.get("window", [0.0, 0])

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

    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to the spec's step count; with `stop_at`, stop (checkpointed) after that many steps.

        A run stopped by `stop_at` and continued with `resume=True` logs exactly the losses of an uninterrupted
        run on CPU: weights, optimizer moments, RNG, loader position and the partial logging window are restored.
        """
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
        end = total if stop_at is None else max(self.step, min(total, stop_at))
        batches = iter(self.loader)
        self.model.train()
        bar = tqdm(
            total=total, initial=self.step, disable=not self.progress or self.rank != 0, unit="step", dynamic_ncols=True
        )
        tokens_per_step = spec.tokens_per_step * self.world_size
        first_step = self.step
        last_loss = next((r["loss"] for r in reversed(self.history) if "loss" in r), float("nan"))
        val_loss = next((r["val_loss"] for r in reversed(self.history) if "val_loss" in r), None)
        window = torch.tensor(self._window_sum, dtype=torch.float32, device=self.device)
        window_steps = int(self._window_steps)
        session_seconds = 0.0
        saved_at = -1
        mark = time.perf_counter()

        def lap() -> None:  # add the time since the last mark to the training clock
            nonlocal mark, session_seconds
            now = time.perf_counter()
            session_seconds += now - mark
            self.train_seconds += now - mark
            mark = now

        def checkpoint() -> None:
            nonlocal saved_at, mark
            lap()
            self._window_sum, self._window_steps = float(window), window_steps
            self.save()
            saved_at = self.step
            mark = time.perf_counter()

        try:
            while self.step < end:
                lr = lr_at(spec, self.step)
                set_lr(self.optimizer, lr)
                step_loss = torch.zeros((), device=self.device)
                if self._graphed:  # a new iteration: the graphs' outputs from the last one are no longer needed
                    torch.compiler.cudagraph_mark_step_begin()
                for _ in range(spec.grad_accum):
                    inputs, targets = next(batches)
                    self.data_digest = hashlib.blake2b(
                        self.data_digest.encode() + inputs.numpy().tobytes(), digest_size=16
                    ).hexdigest()
                    inputs = inputs.to(self.device, non_blocking=True)
                    targets = targets.to(self.device, non_blocking=True)
                    with autocast(self.device, self.autocast_dtype):
                        loss = self._forward(inputs, targets, return_logits=False).loss / spec.grad_accum
                    loss.backward()
                    step_loss += loss.detach()
                if self.world_size > 1:
                    import torch.distributed as dist

                    dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
                self._update()
                self.step += 1
                window += step_loss
                window_steps += 1
                bar.update(1)
                is_last = self.step == total
                if self.step % spec.log_every == 0 or is_last:
                    last_loss = float(window / window_steps)  # the only host sync, once per log interval
                    window.zero_()
                    window_steps = 0
                    lap()
                    tps = (self.step - first_step) * tokens_per_step / max(session_seconds, 1e-9)
                    self._log(
                        {
                            "step": self.step,
                            "loss": last_loss,
                            "lr": lr,
                            "tokens_per_s": tps,
                            "tokens": self.step * tokens_per_step,
                        }
                    )
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
                if self.step % spec.eval_every == 0 or is_last:
                    lap()
                    metrics = self.run_eval()
                    if metrics is not None:
                        val_loss = metrics["loss"]
                        self._log({"step": self.step, "val_loss": val_loss, "val_perplexity": metrics["perplexity"]})
                        bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{val_loss:.3f}")
                    mark = time.perf_counter()
                    if spec.save_every is None:
                        checkpoint()
                if spec.save_every is not None and (self.step % spec.save_every == 0 or is_last):
                    checkpoint()
        except KeyboardInterrupt:
            bar.close()
            last = self._checkpoint_step()
            where = f"the last checkpoint (step {last}) continues with --resume" if last else "nothing was checkpointed"
            raise TrainingInterrupted(f"training interrupted at step {self.step} of {total}; {where}") from None
        bar.close()
        if saved_at != self.step:
            checkpoint()
        lap()
        if self.rank == 0:
            write_metrics_csv(self.out)
            plot_losses(self.out)
        tokens = (self.step - first_step) * tokens_per_step
        return TrainResult(
            steps=self.step,
            train_loss=last_loss,
            val_loss=val_loss,
            tokens=tokens,
            tokens_per_s=tokens / max(session_seconds, 1e-9),
            seconds=session_seconds,
            history=list(self.history),
            data_digest=self.data_digest,
        )

    def _checkpoint_step(self) -> int | None:
        path = self.out / CHECKPOINT_DIR / "state.json"
        if not path.exists():
            return None
        return int(json.loads(path.read_text()).get("step", 0))


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
    """loss_curve.png: training and validation loss against steps (skipped without matplotlib)."""
    from llamaforge.core.plots import plot_loss_curve

    rows = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return plot_loss_curve(train, val, Path(path) if path else Path(run) / "loss_curve.png", title=Path(run).name)


# ----- run files and ablations --------------------------------------------------------------------------------------
RUN_FILE_KEYS = {"model", "train", "data", "val_data", "tokenizer", "vocab_size", "pad_token", "vary", "model_updates"}


def read_run_file(path: str | Path) -> dict[str, Any] | None:
    """A run file bundles a model (`model:` preset/file/mapping), a `train:` spec and optionally data, tokenizer
    and ablation axes (`vary:`); returns None for a plain model spec file (no `model`/`train` key).

    Relative paths inside resolve against the working directory first, then against the file's own folder.
    """
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in {".yaml", ".yml", ".json"}:
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict) or not ({"model", "train"} & set(data)) or "dim" in data:
        return None
    unknown = sorted(set(data) - RUN_FILE_KEYS)
    if unknown:
        raise SpecError(f"{path}: unknown run-file keys {unknown}; allowed: {sorted(RUN_FILE_KEYS)}")
    for key in ("data", "val_data", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).exists() and (path.parent / value).exists():
            data[key] = str(path.parent / value)
    model = data.get("model")
    if isinstance(model, str) and not Path(model).exists() and (path.parent / model).exists():
        data["model"] = str(path.parent / model)
    return data


def parse_vary(items: list[str] | dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """`PATH=A,B[,C]` strings (or a mapping PATH -> list) -> [(path, [values])], values parsed as YAML scalars."""
    if isinstance(items, dict):
        pairs = [(str(k), v if isinstance(v, list) else [v]) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise SpecError(f"--vary expects PATH=A,B[,C], got {item!r} (e.g. norm=rmsnorm,layernorm)")
            path, values = item.split("=", 1)
            pairs.append((path.strip(), [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]))
    for path, values in pairs:
        if not path:
            raise SpecError("--vary needs a spec path before '=' (e.g. activation.name=swiglu,relu2)")
        if len(values) < 1:
            raise SpecError(f"--vary {path}= lists no values")
    return pairs


def expand_variants(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, in the order given (first axis slowest)."""
    import itertools

    if not axes:
        return [{}]
    paths = [p for p, _ in axes]
    return [dict(zip(paths, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def variant_name(assignment: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in assignment.items()) or "base"


def variant_dirname(assignment: dict[str, Any]) -> str:
    import re

    text = "__".join(f"{k}-{Path(str(v)).stem if '/' in str(v) else v}" for k, v in assignment.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def apply_variant(
    base_model: Any, base_train: TrainSpec, assignment: dict[str, Any], common: dict[str, Any] | None = None
) -> tuple[Any, TrainSpec]:
    """The model spec and training spec of one variant.

    `model=X` replaces the whole model spec (a preset or a spec file), `train.FIELD=V` changes the training spec,
    and every other path is a dotted model-spec path (`norm`, `activation.name`, `n_kv_heads`, ...). `common`
    model-spec updates apply to every variant (after a `model=` replacement, before the variant's own paths)."""
    from llamaforge.core.spec import load_spec

    spec = load_spec(assignment["model"]) if "model" in assignment else load_spec(base_model)
    model_updates = dict(common or {})
    model_updates.update({k: v for k, v in assignment.items() if k != "model" and not k.startswith("train.")})
    train_updates = {k.removeprefix("train."): v for k, v in assignment.items() if k.startswith("train.")}
    if model_updates:
        spec = spec.with_updates(**model_updates)
    tspec = TrainSpec.parse({**base_train.model_dump(), **train_updates}) if train_updates else base_train
    return spec, tspec


def fit_spec_to_tokenizer(spec: Any, tokenizer: Any, seq_len: int) -> tuple[Any, list[str]]:
    """Make a model spec agree with the tokenizer (vocab size, BOS/EOS/pad ids) and the sequence length.

    Returns the updated spec and human-readable notes on what changed, so front ends can say so."""
    updates: dict[str, Any] = {}
    notes: list[str] = []
    if spec.vocab_size != tokenizer.vocab_size:
        updates["vocab_size"] = tokenizer.vocab_size
        notes.append(f"vocab_size set to {tokenizer.vocab_size:,} from the tokenizer (spec said {spec.vocab_size:,})")
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
        if value is not None and getattr(spec, key) != value:
            updates[key] = value
    pad = tokenizer.pad_id
    if pad is not None and pad < tokenizer.vocab_size and spec.pad_token_id != pad:
        updates["pad_token_id"] = pad
    if spec.max_positions < seq_len:
        updates["max_positions"] = seq_len
        notes.append(f"max_positions raised from {spec.max_positions} to seq_len {seq_len}")
    return (spec.with_updates(**updates) if updates else spec), notes


def run_ablation(
    base_model: Any,
    base_train: TrainSpec,
    axes: list[tuple[str, list[Any]]],
    *,
    tokenizer: Any,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    out: str | Path,
    progress: bool = True,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    model_updates: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant on the same token streams with the same seed and budget; write the report.

    Each variant is a full run directory under `out`; `results.md`, `results.csv`, `results.json` and
    `val_curves.png` compare them. Variants with different token budgets (a varied train.batch_size, say) are
    allowed but flagged in the table."""
    from llamaforge.core.model import build_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    variants = expand_variants(axes)
    # validate every variant before spending time on the first
    resolved = []
    for assignment in variants:
        spec, tspec = apply_variant(base_model, base_train, assignment, model_updates)
        spec, notes = fit_spec_to_tokenizer(spec, tokenizer, tspec.seq_len)
        resolved.append((assignment, spec, tspec, notes))
    for i, (assignment, spec, tspec, notes) in enumerate(resolved, 1):
        name = variant_name(assignment)
        run_dir = out / variant_dirname(assignment)
        if echo:
            echo(f"[{i}/{len(resolved)}] {name} -> {run_dir}" + "".join(f"\n  note: {n}" for n in notes))
        model = build_model(spec, seed=tspec.seed, dtype="float32")
        trainer = Trainer(
            model,
            tspec,
            train_tokens,
            val_tokens,
            run_dir,
            tokenizer=tokenizer,
            progress=progress,
            extra_metadata={"variant": assignment},
        )
        can_resume = resume and (run_dir / CHECKPOINT_DIR / "state.json").exists()
        result = trainer.fit(resume=can_resume)
        train_logs = [r for r in result.history if "loss" in r]
        rows.append(
            {
                "variant": name,
                "run": str(run_dir),
                "params": trainer.model.num_parameters(),
                "steps": result.steps,
                "tokens": result.steps * tspec.tokens_per_step,
                "train_loss": train_logs[-1]["loss"] if train_logs else result.train_loss,
                "val_loss": result.val_loss,
                "best_val_loss": min((r["val_loss"] for r in result.history if "val_loss" in r), default=None),
                "tokens_per_s": train_logs[-1]["tokens_per_s"] if train_logs else result.tokens_per_s,
                "seconds": trainer.train_seconds,
                "data_digest": result.data_digest,
                "curve": [(r["step"], r["val_loss"]) for r in result.history if "val_loss" in r],
            }
        )
        graphed = trainer._graphed
        del trainer, model
        if graphed:  # each variant's CUDA graphs hold a memory pool until inductor's graph trees are dropped
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    write_ablation_report(rows, out, axes=axes, base_train=base_train)
    return rows


def write_ablation_report(
    rows: list[dict[str, Any]], out: str | Path, *, axes: list[tuple[str, list[Any]]], base_train: TrainSpec
) -> None:
    import csv
    import io

    from llamaforge.core.plots import plot_curves

    out = Path(out)
    same_data = len({r["data_digest"] for r in rows}) == 1
    same_budget = len({r["tokens"] for r in rows}) == 1

    def fmt(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"Ablation over {', '.join(p for p, _ in axes) or 'nothing'}: {rows[0]['steps'] if rows else 0} steps, "
        f"seed {base_train.seed}, batch {base_train.batch_size}x{base_train.grad_accum}, seq_len "
        f"{base_train.seq_len}; data order {'identical' if same_data else 'DIFFERENT'} across variants"
        f"{'' if same_budget else '; token budgets DIFFER'}.",
        "",
        "| variant | params | train loss | val loss | best val loss | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {fmt(r['train_loss'])} | {fmt(r['val_loss'])} | "
            f"{fmt(r['best_val_loss'])} | {r['tokens_per_s']:,.0f} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    keys = [
        "variant",
        "params",
        "steps",
        "tokens",
        "train_loss",
        "val_loss",
        "best_val_loss",
        "tokens_per_s",
        "seconds",
        "data_digest",
        "run",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_json(out / "results.json", {"same_data_order": same_data, "variants": rows})
    plot_curves(
        {r["variant"]: r["curve"] for r in rows},
        out / "val_curves.png",
        title="validation loss",
        ylabel="validation cross-entropy",
    )
