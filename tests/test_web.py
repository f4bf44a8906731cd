"""The review page in a real browser: headless Chromium (Debian's) driven by Playwright against a
real `bloodcell serve`, with real PBC images; the page's classes and counts must equal
`bloodcell predict --json`, and a correction must change the count and the exported CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time

import pytest

from tests.cli import run_cli
from tests.test_serve import server  # noqa: F401  (the real server fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser_page(server):  # noqa: F811
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1366, "height": 900}, accept_downloads=True)
        page.goto(url)
        page.wait_for_function("window.bloodcell.state.classes.length === 8")
        yield page
        browser.close()


def test_the_page_classifies_reviews_and_exports(browser_page, real_run, pbc_sample, tmp_path):
    page = browser_page
    paths = [str(r["path"]) for r in pbc_sample]
    started = time.monotonic()
    page.set_input_files("#files", paths)
    page.wait_for_function(f"document.querySelectorAll('[data-testid=cell]').length === {len(paths)}", timeout=120_000)
    page.wait_for_function("document.getElementById('progress').hidden")
    seconds = time.monotonic() - started
    print(f"\n{len(paths)} images classified and shown in the browser in {seconds:.1f} s")

    expected = json.loads(run_cli("predict", real_run, *paths, "--json").stdout)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in expected["records"]}
    shown = page.evaluate("window.bloodcell.rows()")
    assert len(shown) == len(paths)
    assert all(row["model_class"] == by_name[row["file"]]["class"] for row in shown)
    counts = page.evaluate("window.bloodcell.differential().per_class")
    assert {k: v["count"] for k, v in counts.items()} == {
        k: v["count"] for k, v in expected["summary"]["per_class"].items()
    }
    table = {row.get_attribute("data-class"): row for row in page.query_selector_all("#differential tr[data-class]")}
    assert table["platelet"].query_selector_all("td")[1].inner_text() == str(counts["platelet"]["count"])

    # open the first cell, correct it to another class, and watch the count follow
    first = page.query_selector("[data-testid=cell]")
    first.click()
    page.wait_for_selector("#detail[open]")
    page.wait_for_function("document.getElementById('overlay-caption').textContent.startsWith('Grad-CAM for')")
    name = page.inner_text("#detail-title")
    model_class = by_name[name.rsplit("/", 1)[-1]]["class"]
    new_class = "monocyte" if model_class != "monocyte" else "lymphocyte"
    page.select_option("[data-testid=correct]", new_class)
    page.keyboard.press("Escape")
    after = page.evaluate("window.bloodcell.differential()")
    assert after["per_class"][new_class]["count"] == counts[new_class]["count"] + 1
    assert after["per_class"][model_class]["count"] == counts[model_class]["count"] - 1
    assert after["corrected"] == 1

    with page.expect_download() as download:
        page.click("#export-csv")
    saved = tmp_path / "review.csv"
    download.value.save_as(saved)
    text = saved.read_text()
    rows = list(csv.DictReader(io.StringIO(text.split("\n\n")[0])))
    corrected = [r for r in rows if r["corrected"] == "true"]
    assert len(rows) == len(paths) and len(corrected) == 1
    assert corrected[0]["model_class"] == model_class and corrected[0]["reviewer_class"] == new_class
    assert f"{new_class},{after['per_class'][new_class]['count']}," in text

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=False)
    if os.environ.get("BLOODCELL_SCREENSHOT"):  # for a person to look at
        shutil.copy(shot, os.environ["BLOODCELL_SCREENSHOT"])
    assert shot.stat().st_size > 20_000
