"""The one training loop (every model, every command), batched inference, checkpoints and resume.

The training split stays one uint8 tensor; each step indexes a batch out of it, converts it to
float and augments the whole batch at once. A checkpoint after every epoch holds everything
needed to continue bit-for-bit: weights, optimiser, scheduler, EMA, RNG states and history.
Tensors go to safetensors and everything else to JSON, so loading never unpickles anything.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from bloodcell import models, runs
from bloodcell.augment import AugmentConfig, augment_batch, channel_stats, dihedral, to_float
from bloodcell.data import Split
from bloodcell.errors import BloodcellError

STUDY_NORMALIZATION = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; the defaults are bloodcell's recommended settings for 28 px BloodMNIST."""

    model: str = "res-small"
    model_args: dict = field(default_factory=dict)
    epochs: int = 45
    batch_size: int = 256
    lr: float = 6e-3
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.05
    schedule: str = "onecycle"  # onecycle | constant
    label_smoothing: float = 0.0  # 0.1 cost val AUC: it flattens the runner-up logits that rank ambiguous cells
    mixup: float = 0.0  # Beta(a, a) parameter for mixing each batch with a shuffled copy; 0 disables
    augment: AugmentConfig = AugmentConfig(sharpness=1.0)
    ema_decay: float = 0.0  # 0 disables the weight EMA
    normalize: str = "dataset"  # dataset: train-split channel stats; study: mean 0.5 / std 0.5
    patience: int | None = None  # early stopping on validation loss (restores the best epoch)
    channels_last: bool = True
    seed: int = 42

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        values["augment"] = AugmentConfig(**values.get("augment", {}))
        return cls(**values)


PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "fast": TrainConfig(model="res-small", epochs=15, label_smoothing=0.1, augment=AugmentConfig()),
    "study": TrainConfig(
        model="seed-cnn",
        epochs=5,
        batch_size=128,
        lr=1e-3,
        optimizer="adam",
        weight_decay=0.0,
        schedule="constant",
        label_smoothing=0.0,
        augment=AugmentConfig(flip=False, rot90=False, translate=0),
        normalize="study",
        channels_last=False,
    ),
}


@dataclass
class FitResult:
    """What `fit` hands back: the model to use (EMA copy if enabled) and the per-epoch history."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    mean: list[float]
    std: list[float]
    seconds: float
    finished: bool  # False when stopped by `stop_after_epochs` (an interruption): resume later


def normalization(config: TrainConfig, train: Split) -> tuple[list[float], list[float]]:
    if config.normalize == "study":
        return STUDY_NORMALIZATION
    if config.normalize == "dataset":
        return channel_stats(train.images)
    raise BloodcellError(f"unknown normalisation {config.normalize!r}; use 'dataset' or 'study'")


def build_model(config: TrainConfig, image_size: int) -> nn.Module:
    """The configured architecture, initialised from the config's seed (so runs are repeatable)."""
    torch.manual_seed(config.seed)
    model = models.create(config.model, image_size=image_size, **config.model_args)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    raise BloodcellError(f"unknown optimizer {config.optimizer!r}; use adamw, adam or sgd")


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.25, div_factor=10, final_div_factor=100
        )
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise BloodcellError(f"unknown schedule {config.schedule!r}; use onecycle or constant")


def mixup_batch(
    x: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Blend the batch with a shuffled copy of itself (mixup): returns the images, the partner
    indices (None when off) and the weight of the original labels, drawn from Beta(alpha, alpha).
    Off by default: on the validation split it helped neither accuracy nor AUC (README).
    The weight comes from torch's global RNG, which checkpoints save, so resume stays exact."""
    if alpha <= 0:
        return x, None, 1.0
    weight = torch.distributions.Beta(alpha, alpha).sample().item()
    partner = torch.randperm(len(x), generator=generator)
    return weight * x + (1 - weight) * x[partner], partner, weight


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1024,
    tta: bool = False,
) -> torch.Tensor:
    """Float32 logits for uint8 images (N,3,H,W); with `tta`, averaged over the 8 flips/rotations.

    Inputs follow the model's weights: their dtype (bfloat16 models get bfloat16 inputs) and, for
    channels-last convolution weights, channels-last memory (which oneDNN runs fastest on CPU).
    """
    model.eval()
    first = next(model.parameters())
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and any(
        p.ndim == 4 for p in model.parameters()
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = range(8) if tta else range(1)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size], mean, std).to(first.dtype)
        logits = [model(dihedral(x, k).contiguous(memory_format=memory_format)).float() for k in views]
        out.append(torch.stack(logits).mean(dim=0))
    return torch.cat(out) if out else torch.empty(0, models.NUM_CLASSES)


def evaluate_loss_accuracy(
    model: nn.Module, split: Split, mean: Sequence[float], std: Sequence[float]
) -> tuple[float, float]:
    logits = predict_logits(model, split.images, mean, std)
    loss = F.cross_entropy(logits, split.labels).item()
    return loss, (logits.argmax(1) == split.labels).float().mean().item()


# ---------------------------------------------------------------- checkpoints


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta["state"][str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                meta["state"][str(index)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(i): dict(values) for i, values in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write tensors then JSON; the JSON (written last, atomically) marks the checkpoint complete."""
    folder.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = _flatten_optimizer(state["optimizer"].state_dict())
    tensors = {
        **_prefixed("model", state["model"].state_dict()),
        **optim_tensors,
        "rng.generator": state["generator"].get_state(),
        "rng.torch": torch.get_rng_state(),
    }
    if state["ema"] is not None:
        tensors |= _prefixed("ema", state["ema"].state_dict())
    if state["best_weights"] is not None:
        tensors |= _prefixed("best", state["best_weights"])
    epoch = state["epoch"]
    runs.save_tensors(folder / f"state-{epoch}.safetensors", tensors)
    runs.write_json(
        folder / "state.json",
        {
            "epoch": epoch,
            "tensors": f"state-{epoch}.safetensors",
            "optimizer": optim_meta,
            "scheduler": state["scheduler"].state_dict(),
            "history": state["history"],
            "best": state["best"],
            "config": state["config"].to_dict(),
        },
    )
    for old in folder.glob("state-*.safetensors"):
        if old.name != f"state-{epoch}.safetensors":
            old.unlink()


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = runs.read_json(folder / "state.json")
    return meta, runs.load_tensors(folder / meta["tensors"])


# ---------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
    stop_after_epochs: int | None = None,
) -> FitResult:
    """Train `model` on `train` per `config`; validate on `val` after each epoch.

    With `checkpoint_dir`, a checkpoint is written after each epoch and `resume=True` continues
    from it. `stop_after_epochs` ends the call early (as an interruption would), for tests.
    """
    mean, std = normalization(config, train)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = _scheduler(optimizer, config, config.epochs * steps_per_epoch)
    ema = (  # use_buffers: BatchNorm statistics must follow the averaged weights
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema_decay
        else None
    )
    history: list[dict] = []
    best = {"epoch": 0, "val_loss": math.inf, "bad_epochs": 0}
    best_weights: dict[str, torch.Tensor] | None = None
    start_epoch = 0

    if resume and checkpoint_dir is not None and (checkpoint_dir / "state.json").exists():
        meta, tensors = load_checkpoint(checkpoint_dir)
        saved = TrainConfig.from_dict(meta["config"])
        if saved != config:
            raise BloodcellError(f"{checkpoint_dir}: checkpoint was made with a different training config")
        model.load_state_dict(_strip("model", tensors))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        if ema is not None:
            ema.load_state_dict(_strip("ema", tensors))
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        history, best = meta["history"], meta["best"]
        best_weights = _strip("best", tensors) or None
        start_epoch = meta["epoch"]

    eval_model = ema.module if ema is not None else model
    total = config.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=description, unit="step", disable=not progress)
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if stopped_early or (stop_after_epochs is not None and epoch >= start_epoch + stop_after_epochs):
            break
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train), generator=generator)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = augment_batch(to_float(train.images[index], mean, std), config.augment, generator)
            x, partner, weight = mixup_batch(x, config.mixup, generator)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = train.labels[index]
            logits = model(x)
            loss = weight * F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            if partner is not None:
                loss = loss + (1 - weight) * F.cross_entropy(logits, y[partner], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.update()
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}", refresh=False)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / len(train),
            "train_acc": correct / len(train),
            "lr": scheduler.get_last_lr()[0],
        }
        if val is not None:
            row["val_loss"], row["val_acc"] = evaluate_loss_accuracy(eval_model, val, mean, std)
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} val_acc {row['val_acc']:.4f}")
            if config.patience is not None:
                if row["val_loss"] < best["val_loss"]:
                    best = {"epoch": epoch + 1, "val_loss": row["val_loss"], "bad_epochs": 0}
                    best_weights = copy.deepcopy(eval_model.state_dict())
                else:
                    best["bad_epochs"] += 1
                    stopped_early = best["bad_epochs"] >= config.patience
        row["seconds"] = time.perf_counter() - epoch_start
        history.append(row)
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir,
                {
                    "epoch": epoch + 1,
                    "model": model,
                    "optimizer": optimizer,
                    "scheduler": scheduler,
                    "ema": ema,
                    "generator": generator,
                    "history": history,
                    "best": best,
                    "best_weights": best_weights,
                    "config": config,
                },
            )
    bar.close()
    if config.patience is not None and best_weights is not None:
        eval_model.load_state_dict(best_weights)
    best_epoch = best["epoch"] if config.patience is not None else len(history)
    finished = stopped_early or len(history) == config.epochs
    return FitResult(eval_model, history, best_epoch, mean, std, time.perf_counter() - started, finished)


def with_overrides(config: TrainConfig, **overrides) -> TrainConfig:
    """`config` with the given fields replaced; None values are ignored (unset CLI options)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
