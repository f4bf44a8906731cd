"""The differential count a lab reads off a set of classified cells.

It counts cells, not files: a field photograph gives a record per white cell in it. Records that
are not counted (`counted` false: a cell cut by the image's border, a field without white cells)
are listed but left out of every count and percentage. Given the analyser's white-cell count
(x10^9/L), each white-cell class also gets its absolute count: its share of the white cells
times that count.
"""

from __future__ import annotations

import math

LEUKOCYTES = ("basophil", "eosinophil", "immature granulocyte", "lymphocyte", "monocyte", "neutrophil")


def differential(records: list[dict], classes: list[str] | tuple[str, ...], wbc_count: float | None = None) -> dict:
    """Per class, white cells, erythroblasts per 100 white cells, platelets apart; with
    `wbc_count` (x10^9/L), every white-cell class per litre too.

    Records with an `error` (unreadable files) are counted as failed, never as cells.
    """
    if wbc_count is not None and not (isinstance(wbc_count, (int, float)) and math.isfinite(wbc_count)):
        raise ValueError(f"wbc_count must be a finite number, got {wbc_count!r}")
    cells = [r for r in records if r.get("error") is None and r.get("class") is not None and r.get("counted", True)]
    counts = {name: sum(r["class"] == name for r in cells) for name in classes}
    total = len(cells)
    wbc = sum(counts[name] for name in LEUKOCYTES if name in counts)
    firsts = [r for r in records if r.get("image_kind") != "field" or (r.get("cell") or {}).get("index", 0) == 0]
    summary = {
        "images": len(firsts),  # one record of each image: its only one, or a field's first
        "fields": sum(r.get("image_kind") == "field" for r in firsts),
        "classified": total,
        "failed": sum(r.get("error") is not None for r in records),
        "not_counted": sum(r.get("error") is None and not r.get("counted", True) for r in records),
        "flagged_for_review": sum(bool(r["review"]) for r in cells),
        "per_class": {name: {"count": n, "percent": 100 * n / total if total else 0.0} for name, n in counts.items()},
        "white_cells": wbc,
        "white_cell_differential": {
            name: {"count": counts[name], "percent": 100 * counts[name] / wbc if wbc else 0.0}
            for name in LEUKOCYTES
            if name in counts
        },
        "erythroblasts_per_100_wbc": 100 * counts.get("erythroblast", 0) / wbc if wbc else None,
        "platelets": counts.get("platelet", 0),
        "wbc_count": wbc_count,
    }
    if wbc_count is not None:
        for row in summary["white_cell_differential"].values():
            row["per_litre"] = row["percent"] / 100 * wbc_count  # x10^9/L
    return summary


def format_differential(summary: dict) -> str:
    """The summary `bloodcell predict` prints under the per-cell lines."""
    if summary.get("fields"):
        head = (
            f"{summary['classified']} cells counted from {summary['images']} images ({summary['fields']} fields), "
            f"{summary['not_counted']} listed but not counted, {summary['flagged_for_review']} flagged for review, "
            f"{summary['failed']} failed"
        )
    else:
        head = (
            f"{summary['classified']} of {summary['images']} images classified, "
            f"{summary['flagged_for_review']} flagged for review, {summary['failed']} failed"
        )
    lines = [head, f"{'class':<22}{'count':>7}{'%':>8}"]
    lines += [f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}" for name, row in summary["per_class"].items()]
    if summary["white_cells"]:
        absolute = summary.get("wbc_count") is not None
        lines += ["", f"white-cell differential ({summary['white_cells']} white cells)"]
        if absolute:
            lines.append(f"{'':<22}{'count':>7}{'%':>8}{'x10^9/L':>10}   (white-cell count {summary['wbc_count']:g})")
        lines += [
            f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}" + (f"{row['per_litre']:>10.2f}" if absolute else "")
            for name, row in summary["white_cell_differential"].items()
        ]
        lines.append(f"erythroblasts per 100 white cells: {summary['erythroblasts_per_100_wbc']:.1f}")
    lines.append(f"platelets (counted apart): {summary['platelets']}")
    return "\n".join(lines)
