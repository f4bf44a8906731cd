"""Recipe exploration, scored on the validation split only (the test split is never read here).

    python benchmarks/recipes.py --data-dir ../shared/data VARIANT [VARIANT ...] [--seeds 42 0 1]

Prints one JSON line per variant: training seconds, val accuracy without and with 8-view TTA,
macro AUC with TTA, and the val accuracy after every epoch. The variants are the rows of the README's table.
With several seeds, each seed trains every variant before the next seed starts, so a comparison
interrupted halfway still has matched pairs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from bloodcell.datasets import bloodmnist
from bloodcell.evaluation import metrics
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.inference import network
from bloodcell.training.augment import AugmentConfig
from bloodcell.training.loop import build_model, fit
from bloodcell.training.recipe import TrainConfig

# Every row is spelled out from a pinned base, so that changing TrainConfig's defaults never
# changes what an old row name trains. `sharp1` = blur/sharpen augmentation of strength 1.
MEDIUM = TrainConfig(model="res-medium", epochs=30, label_smoothing=0.1, augment=AugmentConfig(sharpness=1.0))
SMALL = replace(MEDIUM, model="res-small")
PLAIN = AugmentConfig()  # flips, rotations, translations only
VARIANTS: dict[str, TrainConfig] = {
    "small-8": replace(SMALL, epochs=8, augment=PLAIN),
    "small-8-sharp1": replace(SMALL, epochs=8),
    "small-8-sharp2": replace(SMALL, epochs=8, augment=AugmentConfig(sharpness=2.0)),
    "small-8-ema": replace(SMALL, epochs=8, augment=PLAIN, ema_decay=0.99),
    "small-15": replace(SMALL, epochs=15, augment=PLAIN),
    "small-15-ls0": replace(SMALL, epochs=15, augment=PLAIN, label_smoothing=0.0),
    "small-45-sharp1-ls0": replace(SMALL, epochs=45, label_smoothing=0.0),
    "small-30-sharp1-ls0": replace(SMALL, epochs=30, label_smoothing=0.0),
    "small-relu-30-sharp1-ls0": replace(SMALL, model="res-small-relu", epochs=30, label_smoothing=0.0),
    "small-relu-45-sharp1-ls0": replace(SMALL, model="res-small-relu", epochs=45, label_smoothing=0.0),
    "tiny-45-sharp1-ls0": replace(SMALL, model="res-tiny", epochs=45, label_smoothing=0.0),
    "medium-16-bs128": replace(MEDIUM, epochs=16, batch_size=128, lr=4e-3, augment=PLAIN),
    "medium-16": replace(MEDIUM, epochs=16, augment=PLAIN),
    "medium-16-sharp1": replace(MEDIUM, epochs=16),
    "medium-16-colour": replace(MEDIUM, epochs=16, augment=AugmentConfig(colour=0.1)),
    "medium-30-sharp1": MEDIUM,
    "medium-30-sharp1-ema": replace(MEDIUM, ema_decay=0.995),
    "medium-30-sharp1-mixup0.2": replace(MEDIUM, mixup=0.2),
    "medium-30-sharp1-ls0": replace(MEDIUM, label_smoothing=0.0),
    "medium-30-sharp1-mixup0.2-ls0": replace(MEDIUM, mixup=0.2, label_smoothing=0.0),
    "medium-45-sharp1": replace(MEDIUM, epochs=45),
    "medium-45-sharp1-ls0": replace(MEDIUM, epochs=45, label_smoothing=0.0),
}


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds to train each variant with")
    parser.add_argument("variants", nargs="+", choices=list(VARIANTS))
    args = parser.parse_args()
    dataset = bloodmnist.load(args.data_dir)
    for seed, name in ((seed, name) for seed in args.seeds for name in args.variants):
        config = replace(VARIANTS[name], seed=seed)
        start = time.perf_counter()
        result = fit(build_model(config, 28), dataset.train, dataset.val, config, progress=False)
        seconds = time.perf_counter() - start
        scores = {}
        for tta in (False, True):
            logits = network.logits(
                result.model, dataset.val.images, result.mean, result.std, tta=tta, colour_target=result.colour_target
            )
            scores[tta] = (logits.argmax(1) == dataset.val.labels).float().mean().item()
        auc = metrics.classification_metrics(dataset.val.labels.numpy(), logits.softmax(1).numpy())["auc_macro_ovr"]
        curve = [round(row["val_acc"], 4) for row in result.history]
        print(
            json.dumps(
                {
                    "variant": name,
                    "seed": seed,
                    "seconds": round(seconds, 1),
                    "val": round(scores[False], 4),
                    "val_tta": round(scores[True], 4),
                    "val_auc_tta": round(auc, 5),
                    "curve": curve,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
