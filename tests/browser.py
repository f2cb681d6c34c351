"""Real headless Chromium for the page tests (Debian's chromium and chromium-driver).

Driven with Selenium through the system's chromedriver, so nothing is downloaded. The tests
that use it are skipped, saying why, only when chromium or its driver is not installed;
``.ci/run`` installs both. Screenshots go to ``test-artifacts/`` at the repository's root
(``PIPELINE_TEST_ARTIFACTS`` to put them elsewhere).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1500",
]

needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium"
    " chromium-driver; .ci/run installs them)",
)


def artifacts_dir() -> Path:
    """Return (and create) the directory for screenshots and other test artifacts."""
    path = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium(downloads: Path | None = None) -> Iterator[Any]:
    """Start headless Chromium with a fresh profile; yield the Selenium driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    if downloads is not None:
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(downloads),
                "download.prompt_for_download": False,
                "safebrowsing.enabled": False,
            },
        )
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        if downloads is not None:
            driver.execute_cdp_cmd(
                "Browser.setDownloadBehavior",
                {"behavior": "allow", "downloadPath": str(downloads)},
            )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 90) -> Any:
    """Wait until ``condition(driver)`` is truthy (the browser's own polling); return it.

    The page re-renders as events arrive, so an element found a moment ago may be gone (stale)
    or hold text that is not yet a number: those mean "not yet", and the wait polls again.
    """
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    not_yet = (NoSuchElementException, StaleElementReferenceException, ValueError, IndexError)
    try:
        wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=not_yet)
        return wait.until(condition)
    except TimeoutException:
        shot = artifacts_dir() / "timeout.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"timed out waiting for {what} (screenshot: {shot})") from None


def chart_points(driver: Any) -> dict[str, int]:
    """Return the number of points each chart of the page draws, by the chart's id."""
    found = driver.execute_script(
        "return Array.from(document.querySelectorAll('.chart')).map("
        "c => [c.id, Number(c.querySelector('svg').getAttribute('data-points'))]);"
    )
    return {name: count for name, count in found}
