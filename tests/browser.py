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


def send_and_watch_reply(driver, text, timeout=30.0):
    """Type `text` into the chat page, send it and wait for the (only) reply to finish
    streaming. Returns (reply, seen): the reply bubble's final text and every non-empty text it
    showed while it streamed, in order (a MutationObserver installed before sending)."""
    driver.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
          const b = document.querySelector('#messages .msg.assistant:last-child');
          if (b) window.__seen.push(b.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()
    wait_until(driver, "document.querySelector('#messages .msg.assistant.streaming') === null && "
                       "document.querySelectorAll('#messages .msg.assistant').length === 1", timeout=timeout,
               what="the reply")
    reply = driver.execute_script("return document.querySelector('#messages .msg.assistant').textContent")
    return reply, [s for s in driver.execute_script("return window.__seen") if s]
