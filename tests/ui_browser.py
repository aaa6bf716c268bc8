"""The browser side of tests/test_ui.py: Debian's chromium driven by Selenium, and the page helpers its tests
share (wait for a view, enter a key, read a canvas, save a screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_service_e2e import Service


def ensure_chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt-get when missing (as tests/services.py does for
    Postgres and Redis); a skip with the reason when they cannot be."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium and chromium-driver are not installed and apt-get cannot run here (not root)")
    for cmd in (["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode == 0 and cmd[1] == "install":
            break
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"apt-get could not install chromium and chromium-driver: {done.stderr[-500:]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    chromium, driver_path = ensure_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900",
                "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                # no host but loopback resolves: every page must work offline, from its own assets
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=DriverService(executable_path=driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def shot(browser, name: str) -> None:
    """The whole page (the window made as tall as the page, up to 2400 px) into HELIP_UI_SCREENSHOTS."""
    where = os.environ.get("HELIP_UI_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1366, min(max(int(height) + 120, 900), 2400))
        time.sleep(0.3)
        browser.save_screenshot(str(Path(where) / name))
        browser.set_window_size(1366, 900)


def wait_for(browser, script: str, timeout: float = 60, what: str = "") -> Any:
    """Run `script` (a JS expression) until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            main = browser.execute_script("const m = document.getElementById('main'); "
                                          "return [location.hash, m.dataset.route, m.innerText.slice(0, 1500)];")
            raise AssertionError(f"timed out waiting for {what or script}; page: {main}")
        time.sleep(0.2)


def goto(browser, service: Service, hash_: str) -> None:
    """Open a view and wait until it is the one rendered (a hash change alone does not reload the page)."""
    browser.execute_script("const m = document.getElementById('main'); if (m) m.dataset.route = '';")
    browser.get(f"{service.base}/ui/{hash_}")
    wait_for(browser, f"document.getElementById('main').dataset.route === {json.dumps(hash_)}", what=hash_)


def use_key(browser, service: Service, key: str, hash_: str) -> None:
    """Open the page in a fresh document and enter the key in its form (it stays in sessionStorage for this
    tab, across documents)."""
    from selenium.webdriver.common.by import By

    # From another view of the same page, get() alone is a hash change: that view renders asynchronously,
    # possibly after the key's own rendering, and over what a test then types. A fresh document has begun
    # its first view before get() returns, so the key's view replaces it.
    browser.get("about:blank")
    browser.get(f"{service.base}/ui/{hash_}")
    field = browser.find_element(By.ID, "api-key")
    # set rather than typed: a view that finishes rendering moves the focus to its title, away from the field
    browser.execute_script("arguments[0].value = arguments[1];", field, key)
    browser.execute_script("document.getElementById('main').dataset.route = '';")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    # the click's handler runs asynchronously: wait for it (an immediate read raced it on a loaded machine)
    wait_for(browser, f"sessionStorage.getItem('helip.apiKey') === {json.dumps(key)}", what="the key stored")
    wait_for(browser, f"document.getElementById('main').dataset.route === {json.dumps(hash_)}", what=hash_)


def metrics_json(service: Service, s3, job_id: str) -> dict[str, Any]:
    obj = s3.client().get_object(service.bucket, f"{service.prefix}/jobs/{job_id}/metrics.json")
    try:
        return json.loads(obj.read())
    finally:
        obj.close()
        obj.release_conn()


def guard_pixels(browser, axis: str) -> dict[str, int]:
    """Pixels of the guard chart's canvas in its two series' colours (objective blue, protected orange) and
    painted at all."""
    return browser.execute_script("""
        const c = document.querySelector(`#guard-charts figure[data-guard-chart="${arguments[0]}"] canvas`);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let objective = 0, protected_ = 0, painted = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] > 0) painted++;
          if (Math.abs(d[i] - 26) < 30 && Math.abs(d[i + 1] - 95) < 30 && Math.abs(d[i + 2] - 180) < 30) objective++;
          if (Math.abs(d[i] - 198) < 30 && Math.abs(d[i + 1] - 70) < 30 && d[i + 2] < 40) protected_++;
        }
        return {objective, protected: protected_, painted};""", axis)
