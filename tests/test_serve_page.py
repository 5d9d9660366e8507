"""The web page in real headless Chromium: upload an image, see thumbnails, scores and paths.

Chromium is driven by Selenium through Debian's chromedriver (no browser download); CI installs
both in .ci/run. A screenshot is saved under test-artifacts/ for people to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CLIPDEX_BIN, ROOT, near_copy, scene
from .servekit import (
    HOSTILE_NAME,
    TOKEN,
    Server,
    build,
    make_collection,
    make_labelled_store,
    running_server,
    tiny_env,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--disable-dev-shm-usage", "--window-size=1280,1100")

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN), reason="clipdex is not installed"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="chromium/chromedriver missing: apt-get install chromium "
                              "chromium-driver (.ci/run does)"),
]


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str
                ) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("page")
    env = tiny_env(tiny_weights, root / "p.clipdex", root)
    photos = make_collection(root)
    build(photos, env)
    with running_server(env, root) as server:
        yield server, photos


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_shows_thumbnails_scores_paths_and_the_detection_state(page_server, browser,
                                                                      tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, photos = page_server
    query = tmp_path / "query.jpg"
    near_copy(scene(7, (240, 180))).save(query, quality=70)
    driver = browser
    driver.get(server.url + "/")
    token = driver.find_element(By.ID, "token")
    token.send_keys(TOKEN)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
    driver.find_element(By.ID, "file").send_keys(str(query))

    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state")
               in ("done", "error"))
    status = driver.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert len(cards) == 12  # k=20, the store holds 12 images
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results .hit img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"))
    first_paths = [p.text for p in cards[0].find_elements(By.CLASS_NAME, "path")]
    assert str(photos / "p7-reupload.jpg") in first_paths or str(photos / "p7.png") in first_paths
    scores = [float(c.get_attribute("data-score")) for c in cards]
    assert scores == sorted(scores, reverse=True)
    dup = driver.find_elements(By.CSS_SELECTOR, "#results .hit.dup")
    assert len(dup) == sum(s >= 0.95 for s in scores)
    # A hostile file name is shown as text, never parsed as markup.
    all_paths = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "#results .path")]
    assert str(photos / HOSTILE_NAME) in all_paths
    assert not driver.find_elements(By.CSS_SELECTOR, "#results img[src='x']")
    verdict = driver.find_element(By.ID, "verdict")
    assert "Detection unavailable" in verdict.text and "clipdex detect train" in verdict.text
    wait.until(lambda d: "12 images" in d.find_element(By.ID, "stats").text)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    cards[3].find_element(By.TAG_NAME, "img").click()  # "more like this" by stored id
    wait.until(lambda d: "a stored image" in d.find_element(By.ID, "status").text)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results .hit")) == 11


def test_detection_verdict_is_shown_with_its_parts(tmp_path_factory, tiny_weights, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path_factory.mktemp("page-detect")
    env = tiny_env(tiny_weights, root / "d.clipdex", root)
    make_labelled_store(root, env)
    with running_server(env, root, token=None) as server:  # loopback: no token needed
        browser.get(server.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(root / "bad" / "5.png"))
        WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
        verdict = browser.find_element(By.ID, "verdict")
        assert verdict.get_attribute("data-flagged") == "true"
        for part in ("FLAGGED", "LR probability", "kNN vote", "nearest malicious 1.000"):
            assert part in verdict.text
        neighbours = verdict.find_elements(By.CSS_SELECTOR, ".nbr")
        assert len(neighbours) == 10 and "malicious / dark" in neighbours[0].text
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#verdict img, #results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve-page-detect.png"))
