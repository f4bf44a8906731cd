"""Are two runs the same model? Bit-for-bit weights and equal headline metrics.

    python tools/compare_runs.py RUN_A RUN_B

Used to check that a refactor changes nothing a user sees: train the same preset and seed with the
old and the new code (e.g. `git worktree add /tmp/old REV`, then `PYTHONPATH=/tmp/old/src python -m
bloodcell train --preset fast --epochs 2 --seed 3 --out /tmp/a` and the same with the checkout),
then compare. Reads only safetensors and JSON. Exit code 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HEADLINE = ("accuracy", "auc_macro_ovr")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    a, b = (load_file(run / "model.safetensors") for run in (args.run_a, args.run_b))
    same_weights = a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    print(f"weights: {'bit-identical' if same_weights else 'DIFFERENT'} ({len(a)} vs {len(b)} tensors)")
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (args.run_a, args.run_b)]
    same_metrics = True
    for split in ("val", "test"):
        for key in HEADLINE:
            values = [m.get(split, {}).get(key) for m in metrics]
            same_metrics &= values[0] == values[1]
            print(f"{split} {key}: {values[0]} vs {values[1]}")
    return 0 if same_weights and same_metrics else 1


if __name__ == "__main__":
    sys.exit(main())
