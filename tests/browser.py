"""A real headless Chromium for the page tests (the system's chromium and chromedriver, driven by
Selenium), shared by tests/test_server_page.py and tests/test_colony.py. Importing it needs
selenium; `needs_chromium` skips a test module on a machine without the browser."""
import os
import pathlib
import shutil
import time

import pytest
from selenium import webdriver

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason="needs Chromium and chromedriver from the system's packages "
                                           "(Debian: apt-get install chromium chromium-driver); .ci/run installs them")
ARTIFACTS = pathlib.Path(os.environ.get("MOLECULE_GPT_ARTIFACTS",
                                        pathlib.Path(__file__).resolve().parents[1] / "build" / "test-artifacts"))


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_until(driver, script, timeout=30.0, what="the page"):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {script}")


def text_of(driver, element_id):
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def severe_console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
