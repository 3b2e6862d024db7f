"""Headless Chromium for the page tests, and where their screenshots go.

The browser is the system's ``chromium`` with its ``chromedriver`` (``make browser`` installs
Debian's packages where apt and root are at hand). Where they are missing the page tests are
skipped with what to install, except in CI (``CI=true``), where a missing browser is a failure.
``make test BROWSER=0`` (``REIR_BROWSER=0``) skips them without looking, outside CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Root in a container: no sandbox, no GPU, no /dev/shm, nothing phoning home.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900")


def chromium(profile: Path):
    """A Selenium driver on the system Chromium with a fresh profile folder."""
    in_ci = os.environ.get("CI", "").lower() == "true"
    if os.environ.get("REIR_BROWSER") == "0" and not in_ci:
        pytest.skip("browser tests turned off (make test BROWSER=0); CI runs them")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        missing = " and ".join(name for name, found in (("chromium", binary), ("chromedriver", driver)) if not found)
        message = (f"{missing} not found on PATH; install Chromium and its driver: Debian/Ubuntu `make browser` "
                   "(apt-get install chromium chromium-driver), Fedora `dnf install chromium chromedriver`, "
                   "Alpine `apk add chromium chromium-chromedriver`, macOS `brew install --cask chromium` and "
                   "`brew install chromedriver`")
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
