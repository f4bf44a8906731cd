"""The HTTP routes of the reviews the page keeps (see `reviews`), a printable report and exports.

GET  /reviews                       every review, newest first
POST /reviews                       {"title", "reviewer"} -> a new review
GET  /reviews/{id}                  its images, cells (thumbnails, the model's and the current class,
                                    the corrections), events and differential
POST /reviews/{id}/images           multipart `files`: classified and kept in the review
POST /reviews/{id}/corrections      {"cell", "class", "reviewer", "expected"}: an appended event;
                                    409 when the cell is no longer `expected` (another reviewer)
POST /reviews/{id}/events           {"kind": wbc_count | finished | reopened, "value", "reviewer"}
GET  /reviews/{id}/report           the review as a page that prints well
GET  /reviews/{id}/export.csv|json  every cell, and the differential with % and per-litre counts
"""

from __future__ import annotations

import csv
import html
import io
import json

from fastapi import Body, HTTPException, Request  # only imported by `serve.create_app`, after FastAPI is checked
from fastapi.responses import HTMLResponse, Response

from bloodcell import __version__
from bloodcell.app.reviews import Conflict, ReviewStore
from bloodcell.errors import BloodcellError
from bloodcell.files import spreadsheet_safe
from bloodcell.inference.classifier import Classifier, PredictOptions


def add_review_routes(app, store: ReviewStore, classifier: Classifier, options: PredictOptions, uploads_of, classify):
    model = f"{classifier.record.arch} (bloodcell {__version__})"

    def known(review: int) -> dict:
        try:
            return store.get_review(review)
        except KeyError:
            raise HTTPException(404, f"no review {review}") from None

    def full(review: int) -> dict:
        return {
            "review": known(review),
            "images": store.images(review),
            "cells": store.cells(review),
            "events": store.events(review),
            "summary": store.summary(review),
        }

    @app.get("/reviews")
    def list_reviews() -> list[dict]:
        return store.list()

    @app.post("/reviews")
    def create(title: str = Body("", embed=True), reviewer: str = Body("", embed=True)) -> dict:
        return {"id": store.create(title.strip(), reviewer.strip(), model, classifier.classes)}

    @app.get("/reviews/{review}")
    def show(review: int) -> dict:
        return full(review)

    @app.post("/reviews/{review}/images")
    async def add_images(review: int, request: Request) -> dict:
        known(review)
        uploads = await uploads_of(request)
        records = await classify(uploads, options)
        try:
            new = store.add(review, uploads, records)
        except KeyError:
            raise HTTPException(404, f"no review {review}") from None
        cells = {c["id"]: c for c in store.cells(review)}
        return {"cells": [cells[i] for i in new], "images": store.images(review), "summary": store.summary(review)}

    @app.post("/reviews/{review}/corrections")
    def correct(
        review: int,
        cell: int = Body(..., embed=True),
        new_class: str = Body(..., embed=True, alias="class"),
        reviewer: str = Body("", embed=True),
        expected: str | None = Body(None, embed=True),
    ) -> dict:
        known(review)
        try:
            changed = store.correct(review, cell, new_class, reviewer.strip(), expected)
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except KeyError:
            raise HTTPException(404, f"no cell {cell} in review {review}") from None
        except BloodcellError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"cell": changed, "summary": store.summary(review)}

    @app.post("/reviews/{review}/events")
    def event(
        review: int,
        kind: str = Body(..., embed=True),
        value: str | None = Body(None, embed=True),
        reviewer: str = Body("", embed=True),
    ) -> dict:
        known(review)
        if kind == "wbc_count" and value not in (None, ""):
            try:
                count = float(value)
            except ValueError:
                count = -1.0
            if not 0 < count < 1000:
                raise HTTPException(422, "a white-cell count is a number of x10^9/L, such as 7.2")
        try:
            store.event(review, kind, reviewer.strip(), value or None)
        except BloodcellError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"review": known(review), "summary": store.summary(review)}

    @app.get("/reviews/{review}/report")
    def report(review: int):
        return HTMLResponse(review_report(full(review)))

    @app.get("/reviews/{review}/export.json")
    def export_json(review: int):
        data = full(review)
        for cell in data["cells"]:
            cell.pop("thumbnail", None)
        for image in data["images"]:
            image.pop("thumbnail", None)
        return Response(json.dumps(data, indent=1), media_type="application/json")

    @app.get("/reviews/{review}/export.csv")
    def export_csv(review: int):
        return Response(review_csv(full(review)), media_type="text/csv")


def review_csv(data: dict) -> str:
    """Every cell (the model's class and the reviewer's), then the differential with % and per litre."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "cell", "box", "model_class", "probability", "review", "review_reason", "reviewer_class",
                     "corrected", "corrected_by", "corrected_at", "counted", "error"])  # fmt: skip
    for cell in data["cells"]:
        record, last = cell["record"], (cell["corrections"] or [{}])[-1]
        box = (record.get("cell") or {}).get("box")
        writer.writerow([spreadsheet_safe(v) for v in (
            cell["name"], (record.get("cell") or {}).get("index", 0), " ".join(map(str, box)) if box else "",
            record["class"], record["probability"], record["review"], record["review_reason"], cell["class"],
            cell["corrected"], last.get("by", ""), last.get("time", ""), record.get("counted", True), record["error"],
        )])  # fmt: skip
    summary = data["summary"]
    writer.writerow([])
    writer.writerow(["class", "count", "percent", "percent_of_white_cells", "per_litre_x10^9"])
    for name, row in summary["per_class"].items():
        white = summary["white_cell_differential"].get(name, {})
        writer.writerow([name, row["count"], f"{row['percent']:.2f}",
                         f"{white['percent']:.2f}" if white else "",
                         f"{white['per_litre']:.3f}" if "per_litre" in white else ""])  # fmt: skip
    return out.getvalue()


PRINT_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; color: #111; max-width: 60em; margin: 1.5em auto; }
h1 { font-size: 1.4em; margin: 0 0 0.2em; } h2 { font-size: 1.1em; margin: 1.2em 0 0.4em; }
table { border-collapse: collapse; } td, th { border: 1px solid #999; padding: 0.15em 0.5em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.cells { display: flex; flex-wrap: wrap; gap: 0.5em; } figure { margin: 0; width: 8em; font-size: 0.85em; }
figure img { width: 8em; height: 8em; object-fit: cover; } .muted { color: #555; }
@media print { body { margin: 0; } figure { break-inside: avoid; } a { color: inherit; } }
"""


def review_report(data: dict) -> str:
    """The review as one self-contained page that prints well: counts, % and absolute, the flagged
    cells' thumbnails, the corrections, who and when."""
    review, summary, esc = data["review"], data["summary"], html.escape
    absolute = summary.get("wbc_count") is not None
    rows = []
    for name, row in summary["per_class"].items():
        white = summary["white_cell_differential"].get(name)
        cells = [esc(name), row["count"], f"{row['percent']:.1f}", f"{white['percent']:.1f}" if white else "–"]
        if absolute:
            cells.append(f"{white['per_litre']:.2f}" if white else "–")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = (
        "<tr><th>class</th><th>count</th><th>% of cells</th><th>% of white cells</th>"
        + ("<th>x10<sup>9</sup>/L</th>" if absolute else "")
        + "</tr>"
    )
    flagged = [c for c in data["cells"] if c["record"]["review"] or c["corrected"]]
    figures = "".join(
        f"<figure><img src='{c['thumbnail'] or ''}' alt=''><figcaption>{esc(c['name'])}<br>model "
        f"{esc(str(c['record']['class']))}"
        + (f" → <b>{esc(c['class'])}</b>" if c["corrected"] else "")
        + f"<br><span class='muted'>{esc(c['record']['review_reason'] or '')}</span></figcaption></figure>"
        for c in flagged
    )
    corrections = "".join(
        f"<tr><td>{esc(e['time'])}</td><td>{esc(e['by'])}</td><td>{e['cell']}</td><td>{esc(str(e['previous']))}</td>"
        f"<td>{esc(str(e['value']))}</td></tr>"
        for e in data["events"]
        if e["kind"] == "correction"
    )
    finished = review["finished"]
    state = f"finished by {esc(finished['by'])} at {esc(finished['time'])}" if finished else "not finished"
    wbc = f"white-cell count {summary['wbc_count']:g} x10<sup>9</sup>/L" if absolute else "no white-cell count given"
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(review['title'])}</title>"
        f"<style>{PRINT_STYLE}</style></head><body><h1>{esc(review['title'])}</h1>"
        f"<p class='muted'>review {review['id']}, started {esc(review['created'])} by {esc(review['created_by'])}; "
        f"{state}; model {esc(review['model'])}</p>"
        f"<h2>Differential</h2><p>{summary['classified']} cells counted from {summary['images']} images, "
        f"{summary['flagged_for_review']} flagged for review, {summary['not_counted']} not counted; {wbc}.</p>"
        f"<table data-testid='report-differential'>{header}{''.join(rows)}</table>"
        f"<h2>Flagged and corrected cells ({len(flagged)})</h2><div class='cells'>{figures}</div>"
        f"<h2>Corrections</h2><table><tr><th>when</th><th>who</th><th>cell</th><th>from</th><th>to</th></tr>"
        f"{corrections}</table><p class='muted'>Every count is for a person to confirm: bloodcell is not a "
        "medical device.</p></body></html>"
    )
