"""Resumable training state: everything needed to continue a run bit-for-bit after an interruption.

checkpoint/state-<epoch>.safetensors   tensors: model, optimiser moments, EMA, best weights, RNG states
checkpoint/state.json                  the rest: epoch, scheduler, history, early-stopping record, config

The JSON is written last and names its tensors file, so a checkpoint is complete exactly when
state.json exists. Loading never unpickles anything, and a checkpoint that does not fit the run
(edited, foreign or half-deleted) is refused with one line, never silently restarted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bloodcell.errors import BloodcellError
from bloodcell.files import load_tensors, read_json, save_tensors, write_json

STATE = "state.json"
FIELDS = {"epoch", "tensors", "optimizer", "scheduler", "history", "best", "config"}
TENSORS_NAME = re.compile(r"state-\d+\.safetensors")


@dataclass
class TrainingState:
    """A snapshot after `epoch` finished epochs. State dicts are plain tensors and JSON-able values."""

    epoch: int
    config: dict
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    generator: torch.Tensor  # the augmentation/shuffling generator's state
    torch_rng: torch.Tensor  # torch's global RNG (dropout, mixup weights)
    history: list[dict]
    best: dict  # early stopping: best epoch, its val loss, epochs since
    ema: dict[str, torch.Tensor] | None = None
    best_weights: dict[str, torch.Tensor] | None = None


def save(folder: Path, state: TrainingState) -> None:
    """Write tensors, then state.json (atomically), then drop older tensor files."""
    folder = Path(folder)
    optimizer_tensors, optimizer_meta = _split_optimizer(state.optimizer)
    tensors = {
        **_prefixed("model", state.model),
        **optimizer_tensors,
        "rng.generator": state.generator,
        "rng.torch": state.torch_rng,
    }
    if state.ema is not None:
        tensors |= _prefixed("ema", state.ema)
    if state.best_weights is not None:
        tensors |= _prefixed("best", state.best_weights)
    name = f"state-{state.epoch}.safetensors"
    save_tensors(folder / name, tensors)
    write_json(
        folder / STATE,
        {
            "epoch": state.epoch,
            "tensors": name,
            "optimizer": optimizer_meta,
            "scheduler": state.scheduler,
            "history": state.history,
            "best": state.best,
            "config": state.config,
        },
    )
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load(folder: Path, epochs: int) -> TrainingState:
    """Read and check a checkpoint of a run planned for `epochs` epochs."""
    folder = Path(folder)
    path = folder / STATE
    if not path.is_file():
        leftovers = list(folder.glob("state-*.safetensors")) if folder.is_dir() else []
        hint = "; it is incomplete: delete the folder to start over" if leftovers else ""
        raise BloodcellError(f"{path}: file not found{hint}")
    meta = read_json(path)
    if not isinstance(meta, dict) or not FIELDS <= set(meta):
        raise BloodcellError(f"{path}: not a bloodcell checkpoint (missing fields)")
    name, epoch = meta["tensors"], meta["epoch"]
    if not isinstance(name, str) or not TENSORS_NAME.fullmatch(name):
        raise BloodcellError(f"{path}: tensors file {name!r} is not a checkpoint file in this folder")
    _check_json_parts(path, meta)
    if not isinstance(epoch, int) or not 1 <= epoch <= epochs or len(meta["history"]) != epoch:
        raise BloodcellError(f"{path}: epoch {epoch!r} does not fit a run of {epochs} epochs")
    tensors = load_tensors(folder / name)
    missing = [k for k in ("rng.generator", "rng.torch") if k not in tensors]
    if missing or not any(k.startswith("model.") for k in tensors):
        raise BloodcellError(f"{folder / name}: not a bloodcell checkpoint (no model or RNG state)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BloodcellError(f"{folder / name}: {bad[0]} has NaN or infinite values; the checkpoint cannot be resumed")
    return TrainingState(
        epoch=epoch,
        config=meta["config"],
        model=_strip("model", tensors),
        optimizer=_join_optimizer(tensors, meta["optimizer"]),
        scheduler=meta["scheduler"],
        generator=tensors["rng.generator"],
        torch_rng=tensors["rng.torch"],
        history=meta["history"],
        best=meta["best"],
        ema=_strip("ema", tensors) or None,
        best_weights=_strip("best", tensors) or None,
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_json_parts(path: Path, meta: dict) -> None:
    """The JSON half of a checkpoint, checked before any work: an edited history, early-stopping
    record or scheduler must fail here, not after an epoch of training."""
    history, best, config = meta["history"], meta["best"], meta["config"]
    if not isinstance(history, list):
        raise BloodcellError(f"{path}: the history is not a list of epoch records")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or row.get("epoch") != i + 1:
            raise BloodcellError(f"{path}: history row {i + 1} is not a record of epoch {i + 1}")
        if not all(_number(v) or v is None for v in row.values()):
            raise BloodcellError(f"{path}: history row {i + 1} holds a value that is not a number")
    if not (
        isinstance(best, dict)
        and set(best) == {"epoch", "val_loss", "bad_epochs"}
        and isinstance(best["epoch"], int)
        and isinstance(best["bad_epochs"], int)
        and (best["val_loss"] is None or _number(best["val_loss"]))
    ):
        raise BloodcellError(f"{path}: the early-stopping record is malformed")
    if not isinstance(config, dict) or not isinstance(meta["scheduler"], dict):
        raise BloodcellError(f"{path}: the recipe or the scheduler state is malformed")


def same_structure(saved, fresh) -> bool:
    """Whether a saved state (from JSON) has the shape of a freshly built object's state: the same
    keys, numbers where it has numbers, lists of the same length."""
    if isinstance(fresh, dict):
        return (
            isinstance(saved, dict)
            and set(saved) == set(fresh)
            and all(same_structure(saved[k], v) for k, v in fresh.items())
        )
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(fresh) and all(map(same_structure, saved, fresh))
    if _number(fresh):
        return _number(saved)
    return type(saved) is type(fresh)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict -> its tensors (for safetensors) and the rest (for JSON)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        meta["state"][str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                meta["state"][str(index)][name] = value
    return tensors, meta


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    try:
        state = {int(i): dict(values) for i, values in meta["state"].items()}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        return {"state": state, "param_groups": meta["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BloodcellError(f"checkpoint optimiser state is malformed ({exc})") from None


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
