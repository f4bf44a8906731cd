"""Whole fields: every white cell found and classified, border cells marked, counts of cells (not files),
absolute counts, box files scored, reviews kept in a database."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import bloodcell
from bloodcell.app.reviews import ReviewStore
from bloodcell.errors import BloodcellError
from bloodcell.evaluation.detection import Box, match, read_boxes
from bloodcell.images import decode, fields
from bloodcell.inference.differential import differential
from tests.cli import call_cli

RED = (205, 120, 130)
NUCLEUS = (95, 60, 150)


def synthetic_field(path, nuclei=((300, 200), (700, 420)), cut=(1190, 300), size=(1200, 800), seed=0, debris=0):
    """A pink field of red cells (rings), white-cell nuclei (purple discs), platelets, one nucleus
    half out of the image at `cut`, and `debris` small stained specks if asked."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (235, 215, 215))
    draw = ImageDraw.Draw(image)
    for _ in range(140):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        if min(np.hypot(x - nx, y - ny) for nx, ny in (*nuclei, cut)) > 90:
            draw.ellipse((x - 30, y - 30, x + 30, y + 30), fill=RED, outline=(180, 95, 110), width=4)
    for _ in range(25):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=NUCLEUS)
    for x, y in (*nuclei, cut):
        draw.ellipse((x - 60, y - 60, x + 60, y + 60), fill=(215, 190, 215))
        draw.ellipse((x - 38, y - 38, x + 38, y + 38), fill=NUCLEUS)
    for _ in range(debris):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        draw.ellipse((x - 14, y - 14, x + 14, y + 14), fill=NUCLEUS)
    image.save(path)
    return path


def packed_field(path, nuclei=(), pale=(), size=(1440, 900), seed=0):
    """Red cells packed so close that few are whole and round (the scale cannot be measured from
    them), with white-cell nuclei and pale bluish discs (a rim's colour fringe, not a nucleus)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (235, 215, 215))
    draw = ImageDraw.Draw(image)
    for _ in range(900):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        if min((np.hypot(x - nx, y - ny) for nx, ny in nuclei), default=np.inf) > 70:
            draw.ellipse((x - 30, y - 30, x + 30, y + 30), fill=RED, outline=(180, 95, 110), width=4)
    for x, y in nuclei:
        draw.ellipse((x - 38, y - 38, x + 38, y + 38), fill=NUCLEUS)
    for x, y in pale:
        draw.ellipse((x - 38, y - 38, x + 38, y + 38), fill=(235, 215, 250))
    image.save(path)
    return path


def test_two_cells_side_by_side_stay_two_where_the_red_cells_cannot_be_measured(tmp_path):
    """The scale comes from the field's nuclei, not from an assumed magnification that would merge them."""
    image = decode.open_image(packed_field(tmp_path / "f.png", nuclei=((500, 450), (605, 450), (1100, 300))))
    measured, guessed = fields.first_pass_scale(image)
    assert measured is None and 50 < guessed < 80  # nuclei 76 px across, a red cell 60 px
    scan = fields.find_white_cells(image)
    centres = sorted((c.centre_x, c.centre_y) for c in scan.cells)
    assert len(centres) == 3 and all(
        np.hypot(x - cx, y - cy) < 10 for (x, y), (cx, cy) in zip(centres, [(500, 450), (605, 450), (1100, 300)])
    )


def test_pale_bluish_discs_are_not_white_cells(tmp_path):
    image = decode.open_image(packed_field(tmp_path / "f.png", pale=((500, 450), (1000, 300))))
    assert fields.find_white_cells(image).cells == ()


def test_every_white_cell_in_a_field_is_found_and_the_cut_one_marked(tmp_path):
    scan = fields.find_white_cells(decode.open_image(synthetic_field(tmp_path / "f.png")))
    assert scan.is_field and len(scan.cells) == 3
    found = {(round(c.centre_x, -2), round(c.centre_y, -2)): c for c in scan.cells}
    assert found[(300, 200)].cut is False and found[(700, 400)].cut is False and found[(1200, 300)].cut is True
    assert [c.index for c in scan.cells] == [0, 1, 2] and all(c.candidates == 3 for c in scan.cells)
    assert 50 < scan.red_cell < 80  # the rings are 60 px across


def test_a_field_gives_a_record_per_cell_and_the_differential_counts_cells(synthetic_run, tmp_path):
    field = synthetic_field(tmp_path / "field.png")
    records = bloodcell.load(synthetic_run).predict_files([field], crop="cell")
    assert len(records) == 3 and {r["image_kind"] for r in records} == {"field"}
    cut = [r for r in records if r["cell"]["cut"]]
    assert len(cut) == 1 and cut[0]["counted"] is False and "cut by the image border" in cut[0]["review_reason"]
    summary = differential(records, bloodcell.load(synthetic_run).classes)
    assert summary["images"] == 1 and summary["fields"] == 1 and summary["classified"] == 2
    assert summary["not_counted"] == 1
    counted = bloodcell.load(synthetic_run).predict_files([field], crop="cell", border_cells="count")
    assert differential(counted, bloodcell.load(synthetic_run).classes)["classified"] == 3
    one = bloodcell.load(synthetic_run).predict_files([field], crop="cell", cells="one")
    assert len(one) == 1 and one[0]["image_kind"] == "cell"  # the image's main cell, as before fields


def test_explain_on_a_field_draws_every_box_and_explains_every_cell(synthetic_run, tmp_path):
    field = synthetic_field(tmp_path / "field.png")
    result = call_cli("explain", synthetic_run, field, "--crop", "cell", "--out", tmp_path / "cams", "--json")
    figures = sorted(Path(p).name for p in json.loads(result.stdout)["figures"])
    assert figures == ["field_cell1_gradcam.png", "field_cell2_gradcam.png", "field_cell3_gradcam.png",
                       "field_cells.png"]  # fmt: skip
    with Image.open(tmp_path / "cams" / "field_cells.png") as drawn:
        assert drawn.width > 600  # the whole field at a readable size, not a thumbnail


def test_a_field_without_white_cells_says_so_and_counts_nothing(synthetic_run, tmp_path):
    empty = synthetic_field(tmp_path / "empty.png", nuclei=(), cut=(-500, -500))
    (record,) = bloodcell.load(synthetic_run).predict_files([empty], crop="cell")
    assert record["class"] is None and record["error"] is None and record["counted"] is False
    assert record["review_reason"] == "no white cell found in this field" and record["image_kind"] == "field"
    assert differential([record], bloodcell.load(synthetic_run).classes)["classified"] == 0


def test_a_field_of_debris_is_one_reason_not_hundreds_of_cells(synthetic_run, tmp_path):
    debris = synthetic_field(tmp_path / "debris.png", nuclei=(), cut=(-500, -500), debris=1000)
    (record,) = bloodcell.load(synthetic_run).predict_files([debris], crop="cell")
    assert record["error"] is not None and "debris or no smear" in record["error"]


def test_the_command_line_prints_each_cell_with_its_box_and_absolute_counts(synthetic_run, tmp_path):
    field = synthetic_field(tmp_path / "field.png")
    result = call_cli(
        "predict", synthetic_run, field, "--crop", "cell", "--wbc-count", "7.2", "--csv", tmp_path / "c.csv"
    )
    assert result.stdout.count("field.png cell ") == 3 and "(not counted)" in result.stdout
    assert "2 cells counted from 1 images (1 fields)" in result.stdout and "x10^9/L" in result.stdout
    data = json.loads(
        call_cli("predict", synthetic_run, field, "--crop", "cell", "--wbc-count", "7.2", "--json").stdout
    )
    white = data["summary"]["white_cell_differential"]
    assert sum(row["per_litre"] for row in white.values()) == pytest.approx(7.2 * (data["summary"]["white_cells"] > 0))
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0].startswith("path,class") and "cell_index" in rows[0] and len(rows) == 4


def test_absolute_counts_follow_the_white_cell_share():
    records = [{"path": f"{i}", "class": c, "review": False, "error": None}
               for i, c in enumerate(["neutrophil"] * 6 + ["lymphocyte"] * 3 + ["monocyte", "platelet"])]  # fmt: skip
    summary = differential(records, ("lymphocyte", "monocyte", "neutrophil", "platelet"), wbc_count=5.0)
    assert summary["white_cell_differential"]["neutrophil"]["per_litre"] == pytest.approx(3.0)
    assert summary["white_cell_differential"]["monocyte"]["per_litre"] == pytest.approx(0.5)
    assert "per_litre" not in differential(records, ("neutrophil",))["white_cell_differential"]["neutrophil"]


def test_box_files_are_read_and_matched_one_to_one(tmp_path):
    voc = tmp_path / "a.xml"
    voc.write_text(
        "<annotation><object><name>WBC</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>50</ymax>"
        "</bndbox></object><object><name>RBC</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object><object><name>neutrophil</name><bndbox><xmin>60</xmin><ymin>60</ymin><xmax>90</xmax>"
        "<ymax>90</ymax></bndbox></object></annotation>"
    )
    boxes = read_boxes(voc, (100, 100))
    assert [(b.kind, b.label) for b in boxes] == [("white", None), ("red", None), ("white", "neutrophil")]
    yolo = tmp_path / "b.txt"
    yolo.write_text("2 0.5 0.5 0.2 0.2\n")
    (box,) = read_boxes(yolo, (200, 100), ("neutrophil", "eosinophil", "basophil"))
    assert box == Box(80, 40, 120, 60, "white", "basophil")
    # two found cells inside one box: only one matches it
    assert match([(30, 30), (32, 32), (75, 75)], boxes) == {0: 0, 2: 2} or match([(30, 30), (32, 32), (75, 75)], boxes)
    assert len(match([(30, 30), (32, 32)], boxes)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("<annotation><object>", "not a Pascal VOC box file"),
        ("0 0.5 0.5\n", "line 1 is not"),
        ("9 .5 .5 .1 .1", "beyond"),
    ],
)
def test_a_corrupt_box_file_is_one_line_in_evaluate(synthetic_run, tmp_path, content, message):
    field = synthetic_field(tmp_path / "f.png")
    field.with_suffix(".xml" if content.startswith("<") else ".txt").write_text(content)
    result = call_cli("evaluate", synthetic_run, "--fields", tmp_path, "--box-classes", "neutrophil,eosinophil",
                      check=False)  # fmt: skip
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1


def test_evaluate_scores_finding_in_fields_against_their_boxes(synthetic_run, tmp_path):
    field = synthetic_field(tmp_path / "f.png")
    field.with_suffix(".txt").write_text("0 0.25 0.25 0.12 0.18\n1 0.583 0.525 0.12 0.18\n")  # the two whole cells
    result = json.loads(call_cli("evaluate", synthetic_run, "--fields", tmp_path, "--box-classes",
                                 "neutrophil,eosinophil", "--crop", "cell", "--json").stdout)  # fmt: skip
    assert result["recall"] == 1.0 and result["found"] == 3 and result["white_cell_boxes"] == 2


def test_a_review_lasts_and_its_corrections_are_an_audit_trail(synthetic_run, tmp_path):
    classifier = bloodcell.load(synthetic_run)
    field = synthetic_field(tmp_path / "field.png")
    uploads = [("field.png", field.read_bytes()), ("broken.png", b"not an image")]
    records = classifier.predict_uploads(uploads, crop="cell")
    store = ReviewStore(tmp_path / "reviews")
    review = store.create("smear 1", "ana", "res-small", classifier.classes)
    cells = store.add(review, uploads, records)
    assert len(cells) == 4 and len(store.images(review)) == 2
    first = store.cells(review)[0]
    store.correct(review, first["id"], "monocyte", "ana", first["class"])
    store.correct(review, first["id"], "lymphocyte", "ben", "monocyte")
    with pytest.raises(BloodcellError, match="changed by another reviewer"):
        store.correct(review, first["id"], "basophil", "ana", "monocyte")  # ana still saw monocyte
    store.event(review, "wbc_count", "ana", "6.5")
    store.event(review, "finished", "ben")
    del store
    reopened = ReviewStore(tmp_path / "reviews")  # a restart: everything is there
    cell = reopened.cells(review)[0]
    assert cell["class"] == "lymphocyte" and [c["by"] for c in cell["corrections"]] == ["ana", "ben"]
    assert cell["corrections"][0]["from"] == first["class"] and cell["thumbnail"].startswith("data:image/jpeg")
    assert reopened.get_review(review)["wbc_count"] == 6.5 and reopened.get_review(review)["finished"]["by"] == "ben"
    summary = reopened.summary(review)
    assert summary["per_class"]["lymphocyte"]["count"] >= 1 and summary["wbc_count"] == 6.5
    assert reopened.integrity() == "ok" and reopened.list()[0]["corrected"] == 1


def test_a_reviews_database_from_a_newer_bloodcell_is_refused(tmp_path):
    ReviewStore(tmp_path)
    with sqlite3.connect(tmp_path / "reviews.sqlite") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(BloodcellError, match="newer bloodcell .*schema 99"):
        ReviewStore(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "reviews.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(BloodcellError, match="not a usable reviews database"):
        ReviewStore(tmp_path / "junk")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and util-linux setpriv")
def test_a_reviews_folder_that_cannot_be_written_is_one_line_at_start(synthetic_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-m", "bloodcell", "serve",
         str(synthetic_run), "--port", "1", "--reviews", str(locked)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_the_review_routes_keep_corrections_and_refuse_stale_ones(synthetic_run, tmp_path):
    from fastapi.testclient import TestClient

    from bloodcell.app.serve import create_app
    from bloodcell.inference.classifier import Classifier, PredictOptions

    store = ReviewStore(tmp_path / "reviews")
    app = create_app(Classifier.from_run(synthetic_run), PredictOptions(crop="cell"), reviews=store)
    client = TestClient(app)
    review = client.post("/reviews", json={"title": "smear 7", "reviewer": "ana"}).json()["id"]
    field = synthetic_field(tmp_path / "field.png")
    added = client.post(f"/reviews/{review}/images", files={"files": ("field.png", field.read_bytes(), "image/png")})
    cells = added.json()["cells"]
    assert added.status_code == 200 and len(cells) == 3 and added.json()["summary"]["classified"] == 2
    cell = cells[0]
    ok = client.post(
        f"/reviews/{review}/corrections",
        json={"cell": cell["id"], "class": "monocyte", "reviewer": "ana", "expected": cell["class"]},
    )
    stale = client.post(
        f"/reviews/{review}/corrections",
        json={"cell": cell["id"], "class": "basophil", "reviewer": "ben", "expected": cell["class"]},
    )
    assert ok.status_code == 200 and ok.json()["cell"]["class"] == "monocyte"
    assert stale.status_code == 409 and "another reviewer" in stale.json()["detail"]  # fmt: skip
    assert client.post(f"/reviews/{review}/events", json={"kind": "wbc_count", "value": "abc"}).status_code == 422
    client.post(f"/reviews/{review}/events", json={"kind": "wbc_count", "value": "7.5", "reviewer": "ana"})
    client.post(f"/reviews/{review}/events", json={"kind": "finished", "reviewer": "ana"})
    shown = client.get(f"/reviews/{review}").json()
    assert shown["review"]["finished"]["by"] == "ana" and shown["summary"]["wbc_count"] == 7.5
    assert [e["kind"] for e in shown["events"]] == ["correction", "wbc_count", "finished"]
    report = client.get(f"/reviews/{review}/report").text
    assert (
        "smear 7" in report
        and "finished by ana" in report
        and "x10<sup>9</sup>/L" in report
        and "@media print" in report
    )
    csv_text = client.get(f"/reviews/{review}/export.csv").text
    assert csv_text.splitlines()[0].startswith("image,cell,box,model_class") and ",monocyte," in csv_text
    assert "per_litre_x10^9" in csv_text
    assert client.get("/reviews/999").status_code == 404
    assert client.get("/reviews").json()[0]["corrected"] == 1
