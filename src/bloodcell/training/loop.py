"""The one training loop, for every model and command (train, reproduce, tune, benchmarks).

The training split stays one uint8 tensor; each step indexes a batch out of it, converts it to
float and augments the whole batch at once. `fit` reads top to bottom: set up, restore a
checkpoint if resuming, run the epochs (train, validate, save), hand back the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from bloodcell import models
from bloodcell.datasets.bloodmnist import Split
from bloodcell.errors import BloodcellError
from bloodcell.images import colour
from bloodcell.inference import network
from bloodcell.training import checkpoint, distributed, pretrained, sampling
from bloodcell.training.augment import augment_batch, channel_stats
from bloodcell.training.checkpoint import TrainingState
from bloodcell.training.recipe import STUDY_NORMALIZATION, TrainConfig, differences


@dataclass
class FitResult:
    """What `fit` hands back: the model to use (EMA copy if enabled) and the per-epoch history."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    mean: list[float]
    std: list[float]
    colour_target: list[float] | None
    seconds: float
    finished: bool  # False when stopped by `stop_after_epochs` (an interruption): resume later


def normalization(config: TrainConfig, train: Split) -> tuple[list[float], list[float], list[float] | None]:
    """Channel mean and std, and the colour reference (None without colour normalisation)."""
    target = colour.reference(train.images) if config.colour == "lab" else None
    if config.normalize == "study":
        return (*STUDY_NORMALIZATION, target)
    if config.normalize != "dataset":
        raise BloodcellError(f"unknown normalisation {config.normalize!r}; use 'dataset' or 'study'")
    if target is None:
        return (*channel_stats(train.images), target)
    normalised = torch.cat(
        [
            (colour.normalize_colours(train.images[i : i + 4096].float() / 255, target) * 255).round().to(torch.uint8)
            for i in range(0, len(train), 4096)
        ]
    )
    return (*channel_stats(normalised), target)


def batch_shares(config: TrainConfig, sources: torch.Tensor | None) -> tuple[float, ...]:
    """Each training source's share of a batch (BloodMNIST, then each lab folder)."""
    n_sources = int(sources.max()) + 1 if sources is not None and len(sources) else 1
    if n_sources == 1:
        return (1.0,)
    return sampling.shares(n_sources - int(config.bloodmnist), config.lab_share, config.bloodmnist)


def build_model(config: TrainConfig, image_size: int) -> nn.Module:
    """The configured architecture, initialised from the config's seed (so runs are repeatable)."""
    torch.manual_seed(config.seed)
    model = models.create(config.model, image_size=image_size)
    if config.pretrained:
        pretrained.load_imagenet_weights(model, config.model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and norms: no weight decay
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    raise BloodcellError(f"unknown optimizer {config.optimizer!r}; use adamw or adam")


WARMUP_FRACTION = 0.25  # of the one-cycle schedule's steps


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    # torch's OneCycleLR ends its warm-up at step fraction * steps - 1 and divides by zero when that
    # is 0 (a run of exactly 4 steps); such a run trains at a constant rate instead
    cannot_cycle = WARMUP_FRACTION * total_steps == 1
    if config.schedule == "constant" or (config.schedule == "onecycle" and cannot_cycle):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=total_steps,
            pct_start=WARMUP_FRACTION,
            div_factor=10,
            final_div_factor=100,
        )
    raise BloodcellError(f"unknown schedule {config.schedule!r}; use onecycle or constant")


def make_ema(model: nn.Module, config: TrainConfig) -> AveragedModel | None:
    if not config.ema_decay:
        return None
    # use_buffers: BatchNorm statistics must follow the averaged weights
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


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


MIXSTYLE_ALPHA = 0.1  # Beta(0.1, 0.1) mixing weights, as in Zhou et al.


def mix_feature_styles(x: torch.Tensor) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): give each image's feature maps the channel means and
    standard deviations of a blend of itself and a random partner in the batch. Early-layer
    statistics carry much of an image's "style" (stain, camera, exposure), so the network learns
    to classify under styles that no single lab shows. Randomness comes from torch's global RNG,
    which checkpoints save, so resumed training stays exact."""
    mean = x.mean(dim=(2, 3), keepdim=True).detach()
    std = (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()
    weight = torch.distributions.Beta(MIXSTYLE_ALPHA, MIXSTYLE_ALPHA).sample((len(x), 1, 1, 1)).to(x)
    partner = torch.randperm(len(x), device=x.device)
    mixed_mean = weight * mean + (1 - weight) * mean[partner]
    mixed_std = weight * std + (1 - weight) * std[partner]
    return (x - mean) / std * mixed_std + mixed_mean


def stage_ends(model: nn.Module) -> list[nn.Module]:
    """The last residual block of each stage, in order: where a stage's output leaves it."""
    layers = list(getattr(model, "features", []))
    return [
        layer
        for layer, after in zip(layers, [*layers[1:], None])
        if isinstance(layer, models.ResidualBlock) and not isinstance(after, models.ResidualBlock)
    ]


@contextlib.contextmanager
def style_mixing(model: nn.Module, probability: float):
    """While training inside this block, each batch leaving the residual stages before the last
    gets `mix_feature_styles` with this probability; the model is untouched afterwards."""
    if not probability:
        yield
        return
    blocks = stage_ends(model)[:-1]
    if not blocks:
        raise BloodcellError(f"mixstyle needs a residual model with at least two stages, not {type(model).__name__}")

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        if module.training and torch.rand(()) < probability:
            return mix_feature_styles(output)
        return None

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: KL(teacher || student) at `temperature`, scaled by T^2."""
    targets = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), targets, reduction="batchmean") * temperature**2


def evaluate_loss_accuracy(model: nn.Module, split: Split, mean, std, colour_target=None) -> tuple[float, float]:
    logits = network.logits(model, split.images, mean, std, colour_target=colour_target)
    loss = F.cross_entropy(logits, split.labels).item()
    return loss, (logits.argmax(1) == split.labels).float().mean().item()


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
    normalisation: tuple | None = None,
    teacher_logits: torch.Tensor | None = None,
    sources: torch.Tensor | None = None,
    device: str = "cpu",
) -> FitResult:
    """Train `model` on `train` per `config`; validate on `val` after each epoch.

    With `checkpoint_dir`, a checkpoint is written after each epoch and `resume=True` continues
    from it. `stop_after_epochs` ends the call early (as an interruption would), for tests.
    `normalisation` (mean, std, colour target) keeps a trained model's input normalisation
    (fine-tuning) instead of measuring it on `train`. `teacher_logits` (one row per training
    image) are distilled with weight `config.distill`. `sources` (one entry per training image: 0 for
    the first source, 1, 2 ... for the lab folders) makes every batch take fixed shares of them
    (`sampling`). On a `device` other than the CPU the data
    moves there once, and on CUDA the forward pass runs in bfloat16 autocast under torch.compile.
    """
    if config.distill and (teacher_logits is None or len(teacher_logits) != len(train)):
        raise BloodcellError("distillation needs the teacher's logits for every training image (train --teacher)")
    # set up
    mean, std, colour_target = normalisation or normalization(config, train)
    target = network.resolve_device(device)
    distributed.setup(target)  # nothing unless started by torchrun with several processes
    multi = distributed.world_size() > 1
    if multi:
        distributed.check_batch(config.batch_size)
    model.to(target)
    train = Split(train.images.to(target), train.labels.to(target))
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(target)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    source_shares = batch_shares(config, sources)
    steps_per_epoch = sampling.steps_per_epoch(len(train), config.batch_size, sources, source_shares)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    ema = make_ema(model, config)
    eval_model = ema.module if ema is not None else model
    forward = TrainingForward(distributed.wrap(model) if multi else model, target)  # how training steps call it
    history: list[dict] = []
    best = {"epoch": 0, "val_loss": math.inf, "bad_epochs": 0}
    best_weights: dict[str, torch.Tensor] | None = None
    start_epoch = 0

    # restore
    if resume:
        if checkpoint_dir is None:
            raise BloodcellError("resuming needs a checkpoint folder")
        state = checkpoint.load(checkpoint_dir, config.epochs)
        saved = TrainConfig.from_dict(state.config) if isinstance(state.config, dict) else None
        if saved != config:
            changed = differences(state.config, config.to_dict()) if saved else ["(unreadable)"]
            raise BloodcellError(
                f"{checkpoint_dir}: checkpoint was made with a different recipe ({'; '.join(changed[:4])}); "
                "resume with the recipe it was started with, or train afresh with --overwrite"
            )
        _restore(state, model, optimizer, scheduler, ema, generator, checkpoint_dir)
        history, best, best_weights, start_epoch = state.history, state.best, state.best_weights, state.epoch
        steps_done = start_epoch * steps_per_epoch
        counts = {int(v["step"]) for v in optimizer.state.values() if "step" in v}
        if scheduler.last_epoch != steps_done or counts - {steps_done}:
            raise BloodcellError(
                f"{checkpoint_dir}: the checkpoint's step counts do not match its {start_epoch} epochs "
                f"({steps_done} steps); it was edited or belongs to another run"
            )
        if best["val_loss"] is None:  # JSON has no infinity: an unset record reads back as null
            best = best | {"val_loss": math.inf}

    # epochs: train, validate, save
    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=description,
        unit="step",
        disable=not progress or not distributed.is_main(),  # one bar, not one per process
    )
    started = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, last_epoch):
        epoch_start = time.perf_counter()
        row = {"epoch": epoch + 1}
        with style_mixing(model, config.mixstyle):  # a no-op unless the recipe asks for MixStyle
            row |= train_epoch(
                model,
                forward,
                train,
                config,
                (mean, std, colour_target),
                optimizer,
                scheduler,
                ema,
                generator,
                bar,
                epoch,
                teacher_logits,
                (sources, source_shares),
            )
        if val is not None:
            row["val_loss"], row["val_acc"] = evaluate_loss_accuracy(eval_model, val, mean, std, colour_target)
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
        if checkpoint_dir is not None and distributed.is_main():
            checkpoint.save(
                checkpoint_dir,
                TrainingState(
                    epoch=epoch + 1,
                    config=config.to_dict(),
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    generator=generator.get_state(),
                    torch_rng=torch.get_rng_state(),
                    history=history,
                    best=best,
                    ema=ema.state_dict() if ema is not None else None,
                    best_weights=best_weights,
                ),
            )
        if stopped_early:
            break
    bar.close()

    if config.patience is not None and best_weights is not None:
        eval_model.load_state_dict(best_weights)
    best_epoch = best["epoch"] if config.patience is not None else len(history)
    finished = stopped_early or len(history) == config.epochs
    seconds = time.perf_counter() - started
    return FitResult(eval_model, history, best_epoch, mean, std, colour_target, seconds, finished)


def train_epoch(
    model: nn.Module,
    forward: TrainingForward,
    train: Split,
    config: TrainConfig,
    normalisation: tuple,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ema: AveragedModel | None,
    generator: torch.Generator,
    bar: tqdm,
    epoch: int,
    teacher_logits: torch.Tensor | None = None,
    sources: tuple[torch.Tensor | None, tuple[float, ...]] = (None, (1.0,)),
) -> dict:
    """One epoch of batches from `sampling`; returns the epoch's loss, accuracy and last lr.

    With several processes each takes its share of every global batch (see `distributed`).
    """
    model.train()
    if config.freeze_norm:  # BatchNorm keeps normalising with the statistics it started with
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    multi = distributed.world_size() > 1
    order_generator, generator = distributed.epoch_generators(config.seed, epoch) if multi else (generator, generator)
    batches = sampling.epoch_batches(len(train), config.batch_size, order_generator, *sources)
    loss_sum, correct, seen = 0.0, 0, 0
    for index in batches:
        if multi:
            if len(index) < distributed.world_size():
                break  # a last global batch too small to give every process an image
            index = distributed.share(index)
        x = augment_batch(train.images[index], *normalisation[:2], config.augment, generator, normalisation[2])
        x, partner, weight = mixup_batch(x, config.mixup, generator)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = train.labels[index]
        logits = forward(x)
        loss = weight * F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        if partner is not None:
            loss = loss + (1 - weight) * F.cross_entropy(logits, y[partner], label_smoothing=config.label_smoothing)
        if config.distill:
            loss = (1 - config.distill) * loss + config.distill * distillation_loss(
                logits, teacher_logits[index], config.distill_temperature
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.update()
        bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}", refresh=False)
    if multi:  # the epoch's figures over every process's share
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals.tolist()
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": scheduler.get_last_lr()[0]}


class TrainingForward:
    """The model as training calls it: plain on the CPU; compiled, in bfloat16 autocast, on CUDA."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.cuda = device.type == "cuda"
        self.forward = torch.compile(model) if self.cuda else model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            return self.forward(x).float()


def _restore(state: TrainingState, model, optimizer, scheduler, ema, generator, folder: Path) -> None:
    """Put a checkpoint's state into the freshly built training objects; refuse what does not fit."""
    if not checkpoint.same_structure(state.scheduler, scheduler.state_dict()):
        raise BloodcellError(f"{folder}: the checkpoint's scheduler state does not fit this recipe's schedule")
    if not checkpoint.same_structure(state.optimizer["param_groups"], optimizer.state_dict()["param_groups"]):
        raise BloodcellError(f"{folder}: the checkpoint's optimiser settings do not fit this recipe")
    try:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if ema is not None:
            if state.ema is None:
                raise ValueError("no EMA weights saved")
            ema.load_state_dict(state.ema)
        generator.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BloodcellError(f"{folder}: checkpoint does not fit this model ({first})") from None
