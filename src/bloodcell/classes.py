"""The eight BloodMNIST classes and the folder names labs use for them."""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
# The five mature white-cell classes most labs' labelled sets hold (no blasts, erythroblasts or platelets).
WHITE_CELLS: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
# Folder names labs use for the classes (matched case-insensitively, '_' '-' and spaces alike,
# a trailing plural 's' dropped): the class names themselves plus these.
CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "basophil": ("baso",),
    "eosinophil": ("eos", "eosino"),
    "erythroblast": ("nrbc", "normoblast"),
    "immature granulocyte": ("ig", "igs", "immaturegranulocyte"),
    "lymphocyte": ("lympho", "lymph"),
    "monocyte": ("mono",),
    "neutrophil": ("neut", "neutro", "segmented neutrophil"),
    "platelet": ("plt", "thrombocyte"),
}


def _folded(name: str) -> str:
    folded = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    return folded[:-1] if folded.endswith("s") and len(folded) > 3 else folded


_FOLDED_NAMES = {_folded(alias): name for name, aliases in CLASS_ALIASES.items() for alias in (name, *aliases)}


def class_named(name: str) -> str | None:
    """The class a folder name means ('NEUTROPHIL', 'ig', 'basophils' ...), or None."""
    return _FOLDED_NAMES.get(_folded(name))
