"""report/index.html: a tiny experiment's page opened in headless Chromium (the table holds results.json's rows
and numbers, every figure loads, the weights are linked relatively), readable offline from a moved run folder.

The browser test needs the system's chromium and chromedriver (`make test` installs them where it can): on a
developer machine without them it is skipped, saying so; in CI (CI=true) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import compose, one_torch_thread
from test_end_to_end import ALL_STAGES, TINY_STEPS

from conceptdistill.report_page import BOX_COLUMNS, report_page
from conceptdistill.runner import run
from conceptdistill.stages.report import table_rows

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def missing_browser(reason: str):
    """Fail in CI, where the browser test must run; skip elsewhere, saying what to install."""
    message = (f"{reason}: the report page test needs headless Chromium (Debian/Ubuntu: "
               "apt-get install -y chromium chromium-driver; `make test` does this when run as root)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_browser("selenium is not installed (the dev extra)")
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        missing_browser(f"no {'chromium' if binary is None else 'chromedriver'} on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # root in a container needs --no-sandbox; a proxy that refuses everything makes any network load fail
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--proxy-server=http://127.0.0.1:9", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, tiny_model):
    """A finished tiny shapes-world run, moved to another folder after it was written (as a copied run is)."""
    folder = tmp_path_factory.mktemp("report-page")
    cfg = compose([f"stages=[{','.join(ALL_STAGES)}]", f"diffusion.path={tiny_model}", "data.num_train=8",
                   "data.num_test=4", "logger=none", *TINY_STEPS], run_dir=folder / "run")
    with one_torch_thread():
        run(cfg)
    moved = shutil.move(folder / "run", folder / "copied-elsewhere")
    return Path(moved), cfg


def test_the_page_shows_results_json_and_every_figure_in_a_browser(browser, moved_run):  # browser first: no run without it
    from selenium.webdriver.common.by import By

    run_dir, cfg = moved_run
    results = json.loads((run_dir / "report" / "results.json").read_text())
    labels = dict(table_rows(cfg))
    browser.get((run_dir / "report" / "index.html").as_uri())

    table = [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
             for row in browser.find_elements(By.CSS_SELECTOR, "#results tr")]
    assert table[0] == ["method", "acc", "IoU", "mIoU"]
    assert len(results["rows"]) == 8  # the shapes world has masks: every row of the ladder
    assert table[1:] == [[labels[key], *(f"{100 * row[m]:.1f}" for m in ("acc", "iou", "miou"))]
                         for key, row in results["rows"].items()]

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
    assert [alt for alt, *_ in images] == results["figures"] and len(images) >= 4
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in images), images

    seconds = [[c.text for c in row.find_elements(By.TAG_NAME, "td")]
               for row in browser.find_elements(By.CSS_SELECTOR, "#seconds tbody tr")]
    assert [stage for stage, _ in seconds] == list(results["seconds"])
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#weights a")]
    assert any(link.endswith("/finetune/weights/") for link in links)
    assert sum(link.endswith("/final.ckpt") for link in links) == len(cfg.segment.sources)
    for link in links:  # relative links resolve inside the moved folder
        assert link.startswith(run_dir.as_uri()) and Path(link.removeprefix("file://")).exists(), link
    details = browser.find_element(By.TAG_NAME, "details")
    assert details.get_attribute("open") is None and "segment:" in details.get_attribute("textContent")
    assert results["command"] in browser.find_element(By.ID, "run").text


def test_the_page_references_no_network_resource(moved_run):
    run_dir, _ = moved_run
    page = (run_dir / "report" / "index.html").read_text()
    assert re.findall(r"https?://[^\s\"'<]*", page) == []
    assert "<script" not in page and "<link" not in page
    for reference in re.findall(r'(?:src|href)="([^"]*)"', page):  # embedded images, relative links
        assert reference.startswith(("data:image/png;base64,", "../")), reference[:60]


def test_a_box_scored_page_shows_both_box_protocols_with_their_definitions(tmp_path):
    results = {"experiment": "stanford_dogs", "concept": ["dog"], "date": "2026-01-01", "git_commit": None,
               "command": "python -m conceptdistill experiment=stanford_dogs", "figures": [], "seconds": {"masks": 1.0},
               "rows": {"preliminary_masks": {"acc": 0.5, "iou": 0.25, "miou": 0.375, "iou_mask_vs_box": 0.25,
                                              "iou_box": 0.625}}}
    page = report_page(results, {"preliminary_masks": "preliminary <M_pre>"}, folder=tmp_path, settings="a: 1",
                       weights={})
    header = re.search(r'<table id="results"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["method", "acc", "IoU mask vs box", "mIoU", "IoU box"]
    assert "<td>preliminary &lt;M_pre&gt;</td>" in page  # labels are escaped
    assert re.findall(r'<td class="num">(.*?)</td>', page)[:4] == ["50.0", "25.0", "37.5", "62.5"]
    for key, label, _ in BOX_COLUMNS:
        assert f"{label} (<code>{key}</code>): " in page
