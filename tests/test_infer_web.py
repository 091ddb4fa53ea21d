"""The chat page at GET / driven in headless Chromium (Selenium + Debian's chromium-driver):
type a prompt, see streamed text appear, stop the generation (its engine row is freed),
clear the conversation, and fill in a gap on the infill tab. Skipped, with the reason, only
where no browser is installed (CI: apt-get install chromium chromium-driver; pip install selenium)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest
from helpers_post import tiny_checkpoint

from codefoundry.checkpoint import load_model
from codefoundry.infer.engine import Engine
from codefoundry.infer.server import BackgroundServer, ServerLimits, make_app

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no headless browser: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def page():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    model, tok = load_model(tiny_checkpoint())
    model.register_forward_hook(lambda *_: time.sleep(0.03))  # slow enough to press Stop mid-stream
    limits = ServerLimits(max_tokens=200)
    engine = Engine(model, tok, max_batch=4)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with BackgroundServer(make_app(engine, tok, "tiny", limits), limits=limits) as url:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            driver.get(url + "/")
            yield driver, url
        finally:
            driver.quit()
    engine.close()


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_chat_streams_stops_and_clears(page):
    from selenium.webdriver.common.by import By

    driver, url = page
    wait_for(lambda: driver.find_element(By.ID, "model").text == "tiny")
    driver.find_element(By.ID, "max-tokens").clear()
    driver.find_element(By.ID, "max-tokens").send_keys("200")
    driver.find_element(By.ID, "prompt").send_keys("write a function")
    driver.find_element(By.ID, "send").click()
    reply = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant"))[-1]
    first = wait_for(lambda: reply.text.removeprefix("model: ") and reply.text)
    wait_for(lambda: len(reply.text) > len(first))  # more text streamed in after the first piece
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: any(e.text == "(stopped)" for e in driver.find_elements(By.CSS_SELECTOR, ".error")))
    stopped_at = reply.text
    health = wait_for(lambda: (h := json.load(urllib.request.urlopen(url + "/health")))["active_rows"] == 0 and h)
    assert health["status"] == "ok"  # the row was cancelled, not left running
    time.sleep(0.3)
    assert reply.text == stopped_at
    assert driver.find_element(By.ID, "send").is_enabled()
    driver.find_element(By.ID, "clear").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#log .msg") == []


def test_infill_tab_fills_the_gap(page):
    from selenium.webdriver.common.by import By

    driver, _ = page
    driver.find_element(By.ID, "tab-infill").click()
    driver.find_element(By.ID, "fill").click()
    wait_for(lambda: driver.find_element(By.ID, "infill-out").text)
    wait_for(lambda: driver.find_element(By.ID, "fill").is_enabled())
