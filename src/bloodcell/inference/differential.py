"""The differential count a lab reads off a set of classified cells."""

from __future__ import annotations

LEUKOCYTES = ("basophil", "eosinophil", "immature granulocyte", "lymphocyte", "monocyte", "neutrophil")


def differential(records: list[dict], classes: list[str] | tuple[str, ...]) -> dict:
    """Per class, white cells, erythroblasts per 100 white cells, platelets apart.

    Records with an `error` (unreadable files) are counted as failed, never as cells.
    """
    classified = [r for r in records if r.get("error") is None]
    counts = {name: sum(r["class"] == name for r in classified) for name in classes}
    total = len(classified)
    wbc = sum(counts[name] for name in LEUKOCYTES if name in counts)
    return {
        "images": len(records),
        "classified": total,
        "failed": len(records) - total,
        "flagged_for_review": sum(bool(r["review"]) for r in classified),
        "per_class": {name: {"count": n, "percent": 100 * n / total if total else 0.0} for name, n in counts.items()},
        "white_cells": wbc,
        "white_cell_differential": {
            name: {"count": counts[name], "percent": 100 * counts[name] / wbc if wbc else 0.0}
            for name in LEUKOCYTES
            if name in counts
        },
        "erythroblasts_per_100_wbc": 100 * counts.get("erythroblast", 0) / wbc if wbc else None,
        "platelets": counts.get("platelet", 0),
    }


def format_differential(summary: dict) -> str:
    """The summary `bloodcell predict` prints under the per-image lines."""
    lines = [
        f"{summary['classified']} of {summary['images']} images classified, "
        f"{summary['flagged_for_review']} flagged for review, {summary['failed']} failed",
        f"{'class':<22}{'count':>7}{'%':>8}",
    ]
    lines += [f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}" for name, row in summary["per_class"].items()]
    if summary["white_cells"]:
        lines += ["", f"white-cell differential ({summary['white_cells']} white cells)"]
        lines += [
            f"{name:<22}{row['count']:>7}{row['percent']:>8.1f}"
            for name, row in summary["white_cell_differential"].items()
        ]
        lines.append(f"erythroblasts per 100 white cells: {summary['erythroblasts_per_100_wbc']:.1f}")
    lines.append(f"platelets (counted apart): {summary['platelets']}")
    return "\n".join(lines)
