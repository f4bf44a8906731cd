"""How the cell finder frames PBC images compared with MedMNIST's crop (not part of the test suite).

    python experiments/cell_framing.py --data-dir ../shared/data [--show frames.png]

On the 400 full-size images of `pbc_sample/`, MedMNIST's frame is known exactly: the central
200 x 200 px. Prints, per class, how far the found frame's centre is from it (in frame widths),
the ratio of the sides, how the scale was measured, and the side the tight-crop rule would give
(`cells.FRAME_IN_CELL_EXTENTS` times the stained cell's extent, the rule for crops without whole
red cells) as a ratio of the true side: the rule is right on the median cell but not per class,
so on tight crops it takes away cell size as a cue. `--show` writes a contact sheet of the worst
frames.

The answer is documented in docs/real-images.md#framing---crop.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageDraw

from bloodcell.datasets import bloodmnist
from bloodcell.evaluation.provenance import stamp_line
from bloodcell.images import cells, crops, decode


def main() -> None:
    print(stamp_line(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--show", help="write the 24 worst frames to this PNG")
    args = parser.parse_args()
    root = bloodmnist.resolve_data_dir(args.data_dir) / "pbc_sample"
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    by_class = defaultdict(list)
    results = []
    for row in rows:
        image = decode.open_image(root / row["file"])
        frame = cells.locate(image)
        offset = np.hypot(frame.centre_x - image.width / 2, frame.centre_y - image.height / 2) / 200
        true_side = min(image.size) * 200 / 360
        ratio = frame.side / true_side
        extent_ratio = cells.FRAME_IN_CELL_EXTENTS * frame.extent / true_side
        result = {"file": row["file"], "class": row["class"], "frame": frame}
        result |= {"offset": offset, "ratio": ratio, "extent_ratio": extent_ratio}
        by_class[row["class"]].append(result)
        results.append(result)
    header = f"{'class':<22}{'offset p50':>11}{'p90':>7}{'side ratio p10':>15}{'p50':>6}{'p90':>6}"
    print(header + f"{'tight-crop rule p10':>20}{'p50':>6}{'p90':>6}  scale from")
    for name, items in sorted(by_class.items()) + [("all", results)]:
        offsets = np.array([r["offset"] for r in items])
        ratios = np.array([r["ratio"] for r in items])
        extents = np.array([r["extent_ratio"] for r in items if r["frame"].found])
        sources = Counter(r["frame"].scale_from for r in items)
        print(
            f"{name:<22}{np.median(offsets):>11.3f}{np.percentile(offsets, 90):>7.3f}"
            f"{np.percentile(ratios, 10):>15.2f}{np.median(ratios):>6.2f}{np.percentile(ratios, 90):>6.2f}"
            f"{np.percentile(extents, 10):>20.2f}{np.median(extents):>6.2f}{np.percentile(extents, 90):>6.2f}  "
            + ", ".join(f"{k} {v}" for k, v in sources.items())
        )
    if args.show:
        worst = sorted(results, key=lambda r: -(r["offset"] + abs(np.log(r["ratio"]))))[:24]
        side = 180
        sheet = Image.new("RGB", (6 * side, 4 * side), "white")
        for i, r in enumerate(worst):
            image = decode.open_image(root / r["file"])
            draw = ImageDraw.Draw(image)
            draw.rectangle(r["frame"].box(), outline=(0, 255, 0), width=3)
            centre = crops.centre_crop(image, 1.0)
            sheet.paste(centre.resize((side, side)), ((i % 6) * side, (i // 6) * side))
        sheet.save(args.show)
        print(f"wrote {args.show}")


if __name__ == "__main__":
    main()
