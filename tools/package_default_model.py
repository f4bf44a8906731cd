"""Build the model that ships inside the wheel (src/bloodcell/packaged/default/) from the default recipe.

    python tools/package_default_model.py --data-dir ../shared/data            # trains it: bloodcell train
    python tools/package_default_model.py --data-dir ../shared/data --run RUN  # packages a finished run

The packaged model must be what the recorded command produces, so a run is accepted only if its
training config is exactly the `default` preset with seed 42 (what `bloodcell train` with no options
trains). The run's files are copied unchanged except that the data file's local path is cut to its
name; a model card and PROVENANCE.json (the command, torch version, CPU) are written beside them.
`tests/test_packaged.py` checks that the packaged weights reproduce the recorded metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

import bloodcell
from bloodcell import runs
from bloodcell.files import write_json, write_text
from bloodcell.inference.export import model_card
from bloodcell.training.recipe import PRESETS

COMMAND = ["bloodcell", "train", "--seed", "42"]
COPIED = (runs.MODEL_WEIGHTS, runs.OOD_WEIGHTS, runs.METRICS, runs.HISTORY)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--run", help="a finished run of the default recipe (default: train one now)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "default"
        if not args.run:
            subprocess.run([*COMMAND, "--data-dir", args.data_dir, "--out", str(run)], check=True)
        record = runs.read_record(run)
        if record.train_config != json.loads(json.dumps(asdict(PRESETS["default"]))):
            sys.exit(f"{run}: not trained with the default recipe and seed 42 ({' '.join(COMMAND)})")
        out = runs.PACKAGED_RUN
        out.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            shutil.copyfile(run / name, out / name)
        data = record.data | {"file": Path(record.data.get("file", "bloodmnist.npz")).name}
        write_json(out / runs.MODEL_META, replace(record, data=data).to_json())
        card = model_card(bloodcell.load(out), run)
        credit = (
            "\n## Credit\n\nTrained on BloodMNIST (MedMNIST v2, Yang et al., Scientific Data 2023, CC BY 4.0), "
            "derived from the PBC dataset (Acevedo et al., Data in Brief 2020, CC BY 4.0).\n"
        )
        write_text(out / "MODEL_CARD.md", card + credit)
        provenance = {
            "command": " ".join(COMMAND),
            "bloodcell": bloodcell.__version__,
            "torch": torch.__version__,
            "cpu": f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}",
            "train_seconds": record.train_seconds,
            "metrics": record.metrics,
        }
        write_json(out / "PROVENANCE.json", provenance)
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
