"""The chat page in a real headless Chromium (the system's chromium and chromedriver, driven by
Selenium): type a message, watch the reply stream in, watch the status view follow a burst; no
console errors; at a desktop and a phone-sized window. Screenshots are kept in
build/test-artifacts/serve/ (or $MOLECULE_GPT_ARTIFACTS)."""
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("selenium.webdriver")

import molecule_gpt as mg  # noqa: E402
from molecule_gpt import server  # noqa: E402
from molecule_gpt.server import create_app  # noqa: E402

from browser import (ARTIFACTS, browser, needs_chromium, send_and_watch_reply, severe_console_errors,  # noqa: E402,F401
                     text_of, wait_until)
from live_server import LiveServer, pace_streams  # noqa: E402

pytestmark = needs_chromium
WINDOWS = {"desktop": (1280, 860), "phone": (390, 844)}
PIECE_DELAY = 0.02  # seconds between streamed pieces (see live_server.pace_streams)


@pytest.fixture(scope="module")
def organism():
    org = mg.Organism(mg.Config(warmup_steps=40, eval_interval=20), mg.seed_corpus_lines(), memory=":memory:")
    org.warmup()
    yield org
    org.close()


@pytest.fixture
def slow_stream(monkeypatch):
    pace_streams(monkeypatch, PIECE_DELAY)


@pytest.mark.parametrize("window", list(WINDOWS))
def test_chat_page_streams_and_follows_the_organism(window, organism, browser, slow_stream):
    width, height = WINDOWS[window]
    browser.set_window_size(width, height)
    out = ARTIFACTS / "serve"
    out.mkdir(parents=True, exist_ok=True)
    with LiveServer(create_app(organisms={"pet": organism}, learn=True)) as srv:
        browser.get(srv.url + "/")
        assert browser.title == "molecule-gpt"
        wait_until(browser, "document.getElementById('stat-steps').textContent !== '-'", what="the status view")
        assert text_of(browser, "stat-steps").replace(",", "") == str(organism.trainer.steps)
        assert text_of(browser, "state") == "learning"
        points_before = int(browser.execute_script("return document.getElementById('chart').dataset.points"))
        assert points_before >= 1  # the warmup's held-out evaluations

        # the page lays out inside the window: no horizontal scrolling, the input and button visible
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        for element_id in ("input", "send", "messages"):
            assert browser.find_element("id", element_id).is_displayed()
        for element_id in ("keyform", "error"):  # no key is needed, nothing went wrong
            assert not browser.find_element("id", element_id).is_displayed()

        reply, seen = send_and_watch_reply(browser, "hello, what is a river?")
        user = browser.execute_script("return document.querySelector('#messages .msg.user').textContent")
        assert user == "hello, what is a river?"
        assert reply and seen[-1] == reply
        partial = {s for s in seen if s != reply}
        assert partial and all(reply.startswith(s) for s in partial), seen  # it grew, piece by piece
        browser.save_screenshot(str(out / f"chat-{window}.png"))

        # the turn was learned (memory count on the page), then a burst: numbers and chart follow
        wait_until(browser, "document.getElementById('stat-memory').textContent.startsWith('2 ')",
                   what="the learned turn in the memory count")
        bursts_before = int(text_of(browser, "stat-accepted")) + int(text_of(browser, "stat-rolled-back"))
        report = organism.train_burst()
        wait_until(browser, f"(+document.getElementById('stat-accepted').textContent + "
                            f"+document.getElementById('stat-rolled-back').textContent) === {bursts_before + 1}",
                   what="the burst in the numbers")
        wait_until(browser, f"+document.getElementById('chart').dataset.points === {points_before + 1}",
                   what="the burst in the chart")
        first_burst = browser.execute_script("return document.querySelector('#bursts li').className")
        assert first_burst == ("kept" if report.accepted else "rolled-back")
        assert text_of(browser, "stat-steps").replace(",", "") == str(organism.trainer.steps)
        browser.save_screenshot(str(out / f"status-{window}.png"))

        # the chart was drawn: the canvas holds painted pixels in the line's colour
        painted = browser.execute_script("""
            const c = document.getElementById('chart'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] === 0x3c && d[i+1] === 0x6e && d[i+2] === 0x91) n++;
            return n;""")
        assert painted > 20

        assert severe_console_errors(browser) == []
        organism.memory.forget(None)  # the next window starts with an empty memory count
