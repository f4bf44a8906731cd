"""The review page in a real browser: headless Chromium (Debian's) driven by Playwright against a
real `bloodcell serve`, with real images. The page's classes and counts must equal `bloodcell
predict --json`; a correction must change the count and the export; a review must survive a
server restart; two reviewers must not undo each other's work."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli import run_cli
from tests.test_serve import server, start_server  # noqa: F401  (the real server fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def field_samples(real_data_dir) -> list[Path]:
    """The BCCD and Chula field samples of the shared data."""
    return sorted((real_data_dir / "fields").glob("*/*.jpg"))


@contextmanager
def chromium():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url, reviewer):
    page = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True).new_page()
    page.goto(url)
    page.wait_for_function("window.bloodcell.state.classes.length === 8")
    page.fill("#reviewer", reviewer)
    page.dispatch_event("#reviewer", "change")
    return page


def add_images(page, paths, cells):
    page.set_input_files("#files", [str(p) for p in paths])
    page.wait_for_function(f"document.querySelectorAll('[data-testid=cell]').length === {cells}", timeout=180_000)
    page.wait_for_function("document.getElementById('progress').hidden")


def test_the_page_classifies_reviews_and_exports(server, real_run, pbc_sample, tmp_path):  # noqa: F811
    url, _ = server
    paths = [r["path"] for r in pbc_sample]
    with chromium() as browser:
        page = open_page(browser, url, "reviewer one")
        started = time.monotonic()
        add_images(page, paths, len(paths))
        print(f"\n{len(paths)} images classified and shown in the browser in {time.monotonic() - started:.1f} s")

        expected = json.loads(run_cli("predict", real_run, *paths, "--json").stdout)
        by_name = {r["path"].rsplit("/", 1)[-1]: r for r in expected["records"]}
        shown = page.evaluate("window.bloodcell.rows()")
        assert len(shown) == len(paths)
        assert all(row["model_class"] == by_name[row["file"]]["class"] for row in shown)
        counts = page.evaluate("window.bloodcell.differential().per_class")
        assert {k: v["count"] for k, v in counts.items()} == {
            k: v["count"] for k, v in expected["summary"]["per_class"].items()
        }
        table = {
            row.get_attribute("data-class"): row for row in page.query_selector_all("#differential tr[data-class]")
        }
        assert table["platelet"].query_selector_all("td")[1].inner_text() == str(counts["platelet"]["count"])

        page.query_selector("[data-testid=cell]").click()  # correct the first cell, and watch the count follow
        page.wait_for_selector("#detail[open]")
        page.wait_for_function("document.getElementById('overlay-caption').textContent.startsWith('Grad-CAM for')")
        name = page.inner_text("#detail-title")
        model_class = by_name[name.rsplit("/", 1)[-1]]["class"]
        new_class = "monocyte" if model_class != "monocyte" else "lymphocyte"
        page.select_option("[data-testid=correct]", new_class)
        page.wait_for_function("window.bloodcell.differential().corrected === 1")
        page.keyboard.press("Escape")
        after = page.evaluate("window.bloodcell.differential()")
        assert after["per_class"][new_class]["count"] == counts[new_class]["count"] + 1
        assert after["per_class"][model_class]["count"] == counts[model_class]["count"] - 1

        with page.expect_download() as download:
            page.click("#export-csv")
        saved = tmp_path / "review.csv"
        download.value.save_as(saved)
        text = saved.read_text()
        rows = list(csv.DictReader(io.StringIO(text.split("\n\n")[0].replace("\r", ""))))
        corrected = [r for r in rows if r["corrected"] == "True"]
        assert len(rows) == len(paths) and len(corrected) == 1
        assert corrected[0]["model_class"] == model_class and corrected[0]["reviewer_class"] == new_class
        assert f"{new_class},{after['per_class'][new_class]['count']}," in text

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=False)
        if os.environ.get("BLOODCELL_SCREENSHOT"):  # for a person to look at
            shutil.copy(shot, os.environ["BLOODCELL_SCREENSHOT"])
        assert shot.stat().st_size > 20_000


def test_a_review_of_fields_survives_a_server_restart(real_run, field_samples, tmp_path):
    """Fields from two labs: one tile per white cell found, its box drawn on the field; a correction;
    then the server stops, starts again, and the reopened review holds the correction and the count."""
    reviews = tmp_path / "reviews"
    expected = json.loads(run_cli("predict", real_run, *field_samples, "--crop", "cell", "--json").stdout)
    cells = len(expected["records"])
    assert expected["summary"]["fields"] >= len(field_samples) // 2  # most of the samples are read as fields
    process, url, _ = start_server(real_run, reviews, "--crop", "cell")
    try:
        with chromium() as browser:
            page = open_page(browser, url, "reviewer one")
            page.fill("#review-title", "two labs' fields")
            add_images(page, field_samples, cells)
            before = page.evaluate("window.bloodcell.differential()")
            assert before["classified"] == expected["summary"]["classified"]

            field_cell = page.evaluate("window.bloodcell.state.cells.find((c) => c.image_kind === 'field').id")
            page.click(f"[data-cell='{field_cell}']")
            page.wait_for_selector("#detail[open]")
            boxes = page.evaluate("document.querySelectorAll('#field-boxes rect').length")
            same_field = page.evaluate(
                f"(() => {{ const c = window.bloodcell.state.cells.find((x) => x.id === {field_cell}); "
                "return window.bloodcell.state.cells.filter((x) => x.image === c.image).length; })()"
            )
            assert boxes == same_field >= 1 and page.query_selector("#field-boxes rect.current")
            model_class = page.input_value("[data-testid=correct]")
            new_class = "basophil" if model_class != "basophil" else "eosinophil"
            page.select_option("[data-testid=correct]", new_class)
            page.wait_for_function("window.bloodcell.differential().corrected === 1")
            page.keyboard.press("Escape")
            page.fill("#wbc-count", "6.8")
            page.dispatch_event("#wbc-count", "change")
            page.wait_for_function("window.bloodcell.differential().wbc_count === 6.8")
            corrected = page.evaluate("window.bloodcell.differential()")
    finally:
        process.terminate()
        process.wait(timeout=60)

    process, url, _ = start_server(real_run, reviews, "--crop", "cell")  # a new process, the same database
    try:
        with chromium() as browser:
            page = open_page(browser, url, "reviewer two")
            titles = page.evaluate(
                "[...document.querySelectorAll('#review-list option')].map((o) => [o.value, o.text])"
            )
            review = next(value for value, text in titles if text.startswith("two labs'"))
            page.select_option("[data-testid=review-list]", review)
            page.wait_for_function(f"document.querySelectorAll('[data-testid=cell]').length === {cells}")
            reopened = page.evaluate("window.bloodcell.differential()")
            assert reopened["per_class"] == corrected["per_class"] and reopened["corrected"] == 1
            assert reopened["wbc_count"] == 6.8
            cell = page.evaluate(f"window.bloodcell.state.cells.find((c) => c.id === {field_cell})")
            assert cell["class"] == new_class and cell["corrections"][0]["by"] == "reviewer one"
            assert any("per_litre" in row for row in reopened["white_cell_differential"].values())
            page.check("[data-testid=absolute]")
            assert "×10⁹/L" in page.inner_text("#differential")
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_two_reviewers_on_one_server_do_not_undo_each_other(real_run, pbc_sample, tmp_path):
    process, url, _ = start_server(real_run, tmp_path / "reviews")
    paths = [r["path"] for r in pbc_sample[:6]]
    try:
        with chromium() as browser:
            first = open_page(browser, url, "ana")
            add_images(first, paths, len(paths))
            review = first.evaluate("window.bloodcell.state.review.id")
            second = open_page(browser, url, "ben")  # a second browser context: its own storage and tabs
            second.evaluate(f"window.bloodcell.openReview({review})")
            second.wait_for_function(f"document.querySelectorAll('[data-testid=cell]').length === {len(paths)}")
            ids = first.evaluate("window.bloodcell.state.cells.map((c) => c.id)")

            first.click(f"[data-cell='{ids[0]}']")
            first.select_option("[data-testid=correct]", "monocyte")
            first.wait_for_function("window.bloodcell.differential().corrected === 1")
            second.click(f"[data-cell='{ids[0]}']")  # ben still shows the model's class for this cell
            stale = second.input_value("[data-testid=correct]")
            second.select_option("[data-testid=correct]", "lymphocyte" if stale != "lymphocyte" else "basophil")
            second.wait_for_function("document.getElementById('status').textContent.includes('another reviewer')")
            second.keyboard.press("Escape")
            second.wait_for_function(  # ben's page reloaded the review: ana's correction is there
                f"window.bloodcell.state.cells.find((c) => c.id === {ids[0]}).class === 'monocyte'"
            )
            second.click(f"[data-cell='{ids[1]}']")
            second.select_option("[data-testid=correct]", "eosinophil")
            second.wait_for_function("window.bloodcell.differential().corrected === 2")
    finally:
        process.terminate()
        process.wait(timeout=60)
    from bloodcell.app.reviews import ReviewStore

    store = ReviewStore(tmp_path / "reviews")
    by_id = {c["id"]: c for c in store.cells(review)}
    assert by_id[ids[0]]["class"] == "monocyte" and by_id[ids[1]]["class"] == "eosinophil"
    assert [(e["by"], e["value"]) for e in store.events(review)] == [("ana", "monocyte"), ("ben", "eosinophil")]
