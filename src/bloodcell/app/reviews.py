"""Reviews that last: every review the page holds, kept in a SQLite database.

A review is a set of images (their SHA-256, size, and whether each is a field), the model's answer
for every cell found in them, and the reviewer's corrections. A correction is an appended event
(who, when, from which class to which), never an overwrite: a cell's class is its latest
correction, or the model's, and the events are the audit trail. Closing the browser or restarting
the server loses nothing. The database runs in WAL mode with full synchronisation, and every
change is one transaction, so a server killed at any moment loses at most the change in flight and
never leaves the file corrupt. A correction says which class the reviewer saw; if another
reviewer changed the cell meanwhile, it is refused (409) instead of silently undoing theirs.

Thumbnails (the field scaled down, each cell's framed square) are stored beside the answers, so
a review reopens without the original files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from bloodcell import __version__
from bloodcell.errors import BloodcellError
from bloodcell.files import check_writable, printable
from bloodcell.images import cells, decode
from bloodcell.inference.differential import differential

SCHEMA = 1
DATABASE = "reviews.sqlite"
FIELD_THUMBNAIL = 640  # pixels, the longer side
CELL_THUMBNAIL = 128
TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL, created TEXT NOT NULL, created_by TEXT NOT NULL,
    model TEXT NOT NULL, classes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, review INTEGER NOT NULL REFERENCES reviews(id), name TEXT NOT NULL,
    sha256 TEXT NOT NULL, width INTEGER, height INTEGER, kind TEXT, error TEXT, thumbnail BLOB,
    added TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY, review INTEGER NOT NULL REFERENCES reviews(id),
    image INTEGER NOT NULL REFERENCES images(id), position INTEGER NOT NULL, record TEXT NOT NULL,
    thumbnail BLOB);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, review INTEGER NOT NULL REFERENCES reviews(id),
    cell INTEGER REFERENCES cells(id), time TEXT NOT NULL, reviewer TEXT NOT NULL, kind TEXT NOT NULL,
    value TEXT, previous TEXT);
CREATE INDEX IF NOT EXISTS cells_by_review ON cells(review);
CREATE INDEX IF NOT EXISTS events_by_review ON events(review);
"""
EVENT_KINDS = ("correction", "wbc_count", "finished", "reopened")


class Conflict(BloodcellError):
    """Another reviewer changed the cell since this one looked at it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _jpeg(image: Image.Image, side: int) -> bytes:
    shown = image.copy()
    shown.thumbnail((side, side))
    buffer = io.BytesIO()
    shown.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def data_url(content: bytes | None) -> str | None:
    return None if content is None else "data:image/jpeg;base64," + base64.b64encode(content).decode()


class ReviewStore:
    """The reviews database in `folder`; one connection, used by one thread at a time."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.path = folder / DATABASE
        if folder.exists() and not folder.is_dir():
            raise BloodcellError(f"{printable(folder)}: --reviews must be a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BloodcellError(f"{printable(folder)}: cannot create the reviews folder ({exc.strerror})") from None
        check_writable(self.path)  # a read-only folder is one line at start, not a failure mid-review
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            version = self._schema()
            if version is None:
                self.db.executescript(TABLES)  # IF NOT EXISTS throughout: safe to repeat after a crash here
                with self.transaction():
                    self.db.execute(
                        "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('created_by', ?)", (str(SCHEMA), __version__)
                    )
        except sqlite3.DatabaseError as exc:
            raise BloodcellError(f"{printable(self.path)}: not a usable reviews database ({exc})") from None
        if version is not None and version > SCHEMA:
            raise BloodcellError(
                f"{printable(self.path)}: written by a newer bloodcell (reviews schema {version}, this one reads "
                f"{SCHEMA}); upgrade bloodcell, or give another --reviews folder"
            )
        self.lock = threading.RLock()

    def _schema(self) -> int | None:
        exists = self.db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not exists:
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        return int(row[0]) if row else None

    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK): each change is all or nothing."""
        db = self.db

        class Transaction:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, traceback):
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return Transaction()

    # ------------------------------------------------------------ writing

    def create(self, title: str, reviewer: str, model: str, classes: tuple[str, ...]) -> int:
        with self.lock, self.transaction():
            cursor = self.db.execute(
                "INSERT INTO reviews (title, created, created_by, model, classes) VALUES (?, ?, ?, ?, ?)",
                (title[:200] or "untitled", _now(), reviewer[:100], model, json.dumps(list(classes))),
            )
            return int(cursor.lastrowid)

    def add(self, review: int, uploads: list[tuple[str, bytes]], records: list[dict]) -> list[int]:
        """Store the uploaded images and the records `predict` gave for them (one or more per image,
        in order); returns the new cells' ids."""
        self.get_review(review)
        by_name: dict[int, list[dict]] = {}
        cursor = 0
        for i, (name, _) in enumerate(uploads):  # records come image by image, a field's cells together
            while cursor < len(records) and records[cursor]["path"] == name:
                by_name.setdefault(i, []).append(records[cursor])
                cursor += 1
        new_cells = []
        thumbnails = [self._thumbnails(content, by_name.get(i, [])) for i, (_, content) in enumerate(uploads)]
        with self.lock, self.transaction():
            for i, (name, content) in enumerate(uploads):
                own = by_name.get(i, [])
                field, cell_images, size = thumbnails[i]
                error = next((r["error"] for r in own if r["error"]), None)
                kind = own[0].get("image_kind") if own else None
                image_id = self.db.execute(
                    "INSERT INTO images (review, name, sha256, width, height, kind, error, thumbnail, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (review, name, hashlib.sha256(content).hexdigest(), *size, kind, error, field, _now()),
                ).lastrowid
                for position, (record, thumbnail) in enumerate(zip(own, cell_images)):
                    cell_id = self.db.execute(
                        "INSERT INTO cells (review, image, position, record, thumbnail) VALUES (?, ?, ?, ?, ?)",
                        (review, image_id, position, json.dumps(record), thumbnail),
                    ).lastrowid
                    new_cells.append(int(cell_id))
        return new_cells

    def _thumbnails(self, content: bytes, records: list[dict]) -> tuple[bytes | None, list[bytes | None], tuple]:
        try:
            image = decode.open_image(content)
        except decode.ImageError:
            return None, [None] * len(records), (None, None)
        crops = []
        for record in records:
            box = (record.get("cell") or {}).get("box")
            if box:
                left, top, right, bottom = box
                frame = cells.CellFrame((left + right) / 2, (top + bottom) / 2, right - left, True, 1, "box")
                crops.append(_jpeg(cells.crop(image, frame), CELL_THUMBNAIL))
            else:
                crops.append(_jpeg(image, CELL_THUMBNAIL))
        return _jpeg(image, FIELD_THUMBNAIL), crops, image.size

    def correct(self, review: int, cell: int, new_class: str, reviewer: str, expected: str | None) -> dict:
        """Append a correction; refused when the cell's class is no longer the one the reviewer saw."""
        with self.lock, self.transaction():
            classes = self._classes(review)
            if new_class not in classes:
                raise BloodcellError(f"unknown class {new_class!r}")
            current = self._current(review, cell)
            if expected is not None and expected != current:
                raise Conflict(f"cell {cell} is now {current!r} (changed by another reviewer); reload it")
            self.db.execute(
                "INSERT INTO events (review, cell, time, reviewer, kind, value, previous) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (review, cell, _now(), reviewer[:100] or "anonymous", "correction", new_class, current),
            )
        return self.cell(review, cell)

    def event(self, review: int, kind: str, reviewer: str, value: str | None = None) -> None:
        """A review-wide event: the analyser's white-cell count, finished, reopened."""
        if kind not in EVENT_KINDS or kind == "correction":
            raise BloodcellError(f"unknown event {kind!r}")
        with self.lock, self.transaction():
            self._classes(review)
            self.db.execute(
                "INSERT INTO events (review, time, reviewer, kind, value) VALUES (?, ?, ?, ?, ?)",
                (review, _now(), reviewer[:100] or "anonymous", kind, value),
            )

    # ------------------------------------------------------------ reading

    def _classes(self, review: int) -> tuple[str, ...]:
        row = self.db.execute("SELECT classes FROM reviews WHERE id = ?", (review,)).fetchone()
        if row is None:
            raise KeyError(review)
        return tuple(json.loads(row[0]))

    def _current(self, review: int, cell: int) -> str | None:
        row = self.db.execute("SELECT record FROM cells WHERE id = ? AND review = ?", (cell, review)).fetchone()
        if row is None:
            raise KeyError(cell)
        last = self.db.execute(
            "SELECT value FROM events WHERE cell = ? AND kind = 'correction' ORDER BY id DESC LIMIT 1", (cell,)
        ).fetchone()
        return last[0] if last else json.loads(row[0])["class"]

    def list(self) -> list[dict]:
        with self.lock:
            return self._list()

    def _list(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT r.id, r.title, r.created, r.created_by, "
            "(SELECT COUNT(*) FROM images i WHERE i.review = r.id), "
            "(SELECT COUNT(*) FROM cells c WHERE c.review = r.id), "
            "(SELECT COUNT(DISTINCT cell) FROM events e WHERE e.review = r.id AND e.kind = 'correction') "
            "FROM reviews r ORDER BY r.id DESC"
        ).fetchall()
        return [
            {"id": r[0], "title": r[1], "created": r[2], "created_by": r[3], "images": r[4], "cells": r[5],
             "corrected": r[6], "finished": self._finished(r[0])}
            for r in rows
        ]  # fmt: skip

    def _finished(self, review: int) -> dict | None:
        last = self.db.execute(
            "SELECT kind, time, reviewer FROM events WHERE review = ? AND kind IN ('finished', 'reopened') "
            "ORDER BY id DESC LIMIT 1",
            (review,),
        ).fetchone()
        return {"time": last[1], "by": last[2]} if last and last[0] == "finished" else None

    def get_review(self, review: int) -> dict:
        with self.lock:
            return self._review(review)

    def _review(self, review: int) -> dict:
        row = self.db.execute(
            "SELECT id, title, created, created_by, model, classes FROM reviews WHERE id = ?", (review,)
        ).fetchone()
        if row is None:
            raise KeyError(review)
        wbc = self.db.execute(
            "SELECT value FROM events WHERE review = ? AND kind = 'wbc_count' ORDER BY id DESC LIMIT 1", (review,)
        ).fetchone()
        return {
            "id": row[0], "title": row[1], "created": row[2], "created_by": row[3], "model": row[4],
            "classes": json.loads(row[5]), "wbc_count": float(wbc[0]) if wbc and wbc[0] else None,
            "finished": self._finished(review),
        }  # fmt: skip

    def cell(self, review: int, cell: int) -> dict:
        return next(c for c in self.cells(review, with_thumbnails=False) if c["id"] == cell)

    def cells(self, review: int, with_thumbnails: bool = True) -> list[dict]:
        """Every cell with the model's answer, its current class and how it got there."""
        with self.lock:
            return self._cells(review, with_thumbnails)

    def _cells(self, review: int, with_thumbnails: bool) -> list[dict]:
        corrections: dict[int, list[dict]] = {}
        for cell, time, reviewer, value, previous in self.db.execute(
            "SELECT cell, time, reviewer, value, previous FROM events WHERE review = ? AND kind = 'correction' "
            "ORDER BY id",
            (review,),
        ):
            corrections.setdefault(cell, []).append({"time": time, "by": reviewer, "to": value, "from": previous})
        out = []
        for cell_id, image, name, kind, record, thumbnail in self.db.execute(
            "SELECT c.id, c.image, i.name, i.kind, c.record, "
            + ("c.thumbnail" if with_thumbnails else "NULL")
            + " FROM cells c JOIN images i ON i.id = c.image WHERE c.review = ? ORDER BY c.id",
            (review,),
        ):
            record = json.loads(record)
            history = corrections.get(cell_id, [])
            current = history[-1]["to"] if history else record["class"]
            out.append({
                "id": cell_id, "image": image, "name": name, "image_kind": kind, "record": record,
                "class": current, "corrected": current != record["class"], "corrections": history,
                "thumbnail": data_url(thumbnail),
            })  # fmt: skip
        return out

    def images(self, review: int) -> list[dict]:
        with self.lock:
            return self._images(review)

    def _images(self, review: int) -> list[dict]:
        return [
            {"id": i, "name": n, "sha256": d, "width": w, "height": h, "kind": k, "error": e, "thumbnail": data_url(t)}
            for i, n, d, w, h, k, e, t in self.db.execute(
                "SELECT id, name, sha256, width, height, kind, error, thumbnail FROM images WHERE review = ? "
                "ORDER BY id",
                (review,),
            )
        ]

    def events(self, review: int) -> list[dict]:
        with self.lock:
            return self._events(review)

    def _events(self, review: int) -> list[dict]:
        return [
            {"id": i, "cell": c, "time": t, "by": r, "kind": k, "value": v, "previous": p}
            for i, c, t, r, k, v, p in self.db.execute(
                "SELECT id, cell, time, reviewer, kind, value, previous FROM events WHERE review = ? ORDER BY id",
                (review,),
            )
        ]

    def summary(self, review: int) -> dict:
        """The differential of the reviewed classes (with per-litre counts when the white-cell count is set)."""
        info = self.get_review(review)
        final = [c["record"] | {"class": c["class"]} for c in self.cells(review, with_thumbnails=False)]
        return differential(final, info["classes"], info["wbc_count"])

    def integrity(self) -> str:
        with self.lock:
            return self.db.execute("PRAGMA integrity_check").fetchone()[0]
