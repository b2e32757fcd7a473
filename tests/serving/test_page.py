"""The web page in a real headless Chromium (Debian's package, driven by Playwright).

Skips, saying why, only when Playwright or a Chromium binary is missing; .ci/run installs both.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium() -> str:
    for candidate in (os.environ.get("LMFUSION_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("no Chromium installed (apt-get install chromium; .ci/run does this)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/")
    yield page
    page.close()
    assert errors == [], errors  # no JavaScript errors


def test_the_page_draws_a_prompt_and_shows_the_image(page, tmp_path):
    page.wait_for_selector("#model-info:has-text('16×16')")
    page.fill("#draw-prompt", "a small red circle")
    page.fill("#draw-n", "2")
    page.fill("#draw-seed", "4")
    page.click("#draw-submit")
    page.wait_for_selector("#draw-results img", timeout=30_000)
    sizes = page.eval_on_selector_all("#draw-results img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert sizes == [[True, 16, 16]] * 2
    assert page.inner_text("#draw-results").split() == ["seed", "4", "seed", "5"]
    assert page.is_hidden("#draw-error")
    shot = tmp_path / "draw.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000


def test_the_page_shows_server_errors(page):
    page.fill("#draw-prompt", "")
    page.click("#draw-submit")
    page.wait_for_selector("#draw-error:not([hidden])")
    assert "prompt is empty" in page.inner_text("#draw-error")


def test_the_page_captions_a_chosen_image_and_chats(page, tmp_path):
    from PIL import Image

    picture = tmp_path / "square.png"
    Image.new("RGB", (40, 30), (30, 60, 200)).save(picture)
    page.click("nav button[data-tab=caption]")
    page.set_input_files("#caption-file", str(picture))
    page.wait_for_function("document.querySelector('#caption-text').textContent.length > 0", timeout=30_000)
    assert page.is_visible("#caption-preview") and page.is_hidden("#caption-error")

    page.click("nav button[data-tab=chat]")
    page.uncheck("#chat-draw")  # text only: the reply streams in
    page.fill("#chat-input", "the quick brown fox")
    page.click("#chat-submit")
    page.wait_for_selector(".message.assistant", timeout=30_000)
    page.wait_for_selector("#chat-submit:not([disabled])", timeout=30_000)
    assert page.inner_text(".message.user") == "the quick brown fox"
    assert page.is_hidden("#chat-error")
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)


def test_the_page_edits_a_chosen_image_and_shows_its_errors(page, tmp_path):
    from PIL import Image

    picture = tmp_path / "circle.png"
    Image.new("RGB", (16, 16), (215, 25, 25)).save(picture)
    page.wait_for_selector("#model-info:has-text('16×16')")
    page.click("nav button[data-tab=edit]")
    page.fill("#edit-prompt", "make it blue")
    page.click("#edit-submit")  # no image chosen: the server's 400 appears in the page
    page.wait_for_selector("#edit-error:not([hidden])")
    assert "image is required" in page.inner_text("#edit-error")
    page.set_input_files("#edit-file", str(picture))
    page.fill("#edit-n", "2")
    page.fill("#edit-seed", "7")
    page.fill("#edit-image-guidance", "1.5")
    page.fill("#edit-strength", "0.5")
    page.click("#edit-submit")
    page.wait_for_selector("#edit-results img", timeout=30_000)
    sizes = page.eval_on_selector_all("#edit-results img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert sizes == [[True, 16, 16]] * 2
    assert page.inner_text("#edit-results").split() == ["seed", "7", "seed", "8"]
    assert page.is_visible("#edit-preview") and page.is_hidden("#edit-error")
