"""Headless Chromium through selenium: open a report page, wait until its charts are drawn, read what it logged.

Tests and `genfoundry bench report` use it to check a page the way a reader's browser shows it: the
page's own readiness flag (`window.genfoundryReport.ready`), its console errors and paint timings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from genfoundry.errors import GenfoundryError

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)
INSTALL_HINT = "install them (Debian/Ubuntu: apt-get install chromium chromium-driver)"
MAX_SCREENSHOT_HEIGHT = 12000    # px; a taller page is cut there
PAINT_WAIT_S = 2                 # after ready, how long to wait for the first-contentful-paint entry
READY = "return !!(window.genfoundryReport && window.genfoundryReport.ready)"
TIMINGS = """
const at = name => { const e = performance.getEntriesByName(name)[0]; return e ? e.startTime : null; };
return [at("first-contentful-paint"), at("genfoundry-charts-drawn")];
"""


class BrowserError(GenfoundryError):
    """No usable headless Chromium, or a page that did not become ready."""


def find_browser() -> tuple[str, str]:
    """Paths of the Chromium binary and of chromedriver on PATH."""
    browser = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    missing = [what for what, path in (("Chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        raise BrowserError(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}")
    return browser, driver


def _selenium():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        raise BrowserError("selenium is not installed: pip install 'selenium>=4.20'") from None
    return webdriver, Service, WebDriverWait, TimeoutException, WebDriverException


def _severe(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def open_page(path: str | Path, screenshot: Path | None = None, width: int = 1400, timeout_s: float = 60) -> dict:
    """Opens `path` in headless Chromium and waits until its charts are drawn.

    Returns {status: window.genfoundryReport, console_errors: messages of SEVERE log entries,
    first_contentful_paint_ms, charts_drawn_ms (from the page's performance entries), load_s (wall
    time from navigation until ready)}. With `screenshot`, the window is first made as tall as the
    page (at most MAX_SCREENSHOT_HEIGHT px) so that the PNG shows all of it.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise BrowserError(f"page '{path}' does not exist (or is not a file)")
    browser, driver_path = find_browser()
    webdriver, Service, WebDriverWait, TimeoutException, WebDriverException = _selenium()
    with tempfile.TemporaryDirectory(prefix="genfoundry-chromium-", ignore_cleanup_errors=True) as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    f"--user-data-dir={profile}", f"--window-size={width},1000"):
            options.add_argument(arg)
        if os.geteuid() == 0:  # Chromium refuses to start its sandbox as root
            options.add_argument("--no-sandbox")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            driver = webdriver.Chrome(service=Service(driver_path), options=options)
        except WebDriverException as e:
            raise BrowserError(f"cannot start {browser} through {driver_path}: {e.msg or e}".splitlines()[0]) from None
        try:
            driver.set_page_load_timeout(timeout_s)
            start = time.perf_counter()
            try:
                driver.get(path.as_uri())
                WebDriverWait(driver, max(0.0, timeout_s - (time.perf_counter() - start)),
                              poll_frequency=0.02).until(lambda d: d.execute_script(READY))
            except TimeoutException:
                status = driver.execute_script("return window.genfoundryReport === undefined ? null : "
                                               "window.genfoundryReport")
                errors = _severe(driver)
                raise BrowserError(f"{path} did not become ready within {timeout_s:g} s: window.genfoundryReport "
                                   f"was {json.dumps(status)[:300]}; console errors: "
                                   f"{json.dumps(errors)[:1000] if errors else 'none'}") from None
            load_s = time.perf_counter() - start
            status = driver.execute_script("return window.genfoundryReport")
            try:  # ready is set while drawing; the first paint comes a frame later
                WebDriverWait(driver, PAINT_WAIT_S, poll_frequency=0.02).until(
                    lambda d: d.execute_script(TIMINGS)[0] is not None)
            except TimeoutException:
                pass  # reported as None
            first_paint_ms, drawn_ms = driver.execute_script(TIMINGS)
            if screenshot is not None:
                _screenshot(driver, Path(screenshot), width)
            return {"status": status, "console_errors": _severe(driver), "first_contentful_paint_ms": first_paint_ms,
                    "charts_drawn_ms": drawn_ms, "load_s": load_s}
        finally:
            driver.quit()


def _screenshot(driver, out: Path, width: int) -> None:
    """Saves the whole page: the window grows until its viewport holds the page's scroll height."""
    height = min(MAX_SCREENSHOT_HEIGHT, driver.execute_script(
        "return Math.ceil(Math.max(document.documentElement.scrollHeight, document.body?.scrollHeight ?? 0))"))
    driver.set_window_size(width, height)
    chrome = height - driver.execute_script("return window.innerHeight")  # window frame above the viewport
    if chrome > 0:
        driver.set_window_size(width, height + chrome)
    # two frames, so that anything redrawing on resize has painted
    driver.execute_async_script("const done = arguments[0]; "
                                "requestAnimationFrame(() => requestAnimationFrame(() => done(true)));")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out)):
        raise BrowserError(f"cannot write the screenshot '{out}'")
