"""A real headless browser for the web pages' tests: Debian's chromium driven through chromium-driver.

Missing chromium or chromium-driver skips the test, or fails it where CI requires a browser
(RATIOCINATOR_REQUIRE_BROWSER=1, set by .ci/run after installing them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")


def _find(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((path for path in extra if os.access(path, os.X_OK)), None)


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or a skip (a failure when RATIOCINATOR_REQUIRE_BROWSER=1)."""
    chromium = _find(CHROMIUM_NAMES)
    driver = _find(DRIVER_NAMES, ("/usr/lib/chromium/chromedriver",))
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(n for n, p in (("chromium", chromium), ("chromium-driver", driver)) if not p)
    if os.environ.get("RATIOCINATOR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{missing} not found, and RATIOCINATOR_REQUIRE_BROWSER=1:"
                    " apt-get install chromium chromium-driver")
    pytest.skip(f"{missing} not installed (apt-get install chromium chromium-driver)")


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1800) -> Iterator[Any]:
    """A Selenium WebDriver on headless chromium, quit on exit."""
    chromium, driver = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield browser
    finally:
        browser.quit()
