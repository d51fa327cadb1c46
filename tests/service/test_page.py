"""The page at `/` in headless Chromium (Debian's binary, driven by playwright): upload an image,
see the result, move the noise slider and see the new scores and image."""
from __future__ import annotations

import shutil

import pytest

from tests.service.conftest import API_KEY
from tests.service.images import encode, random_rgb

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")]


@pytest.fixture(scope="module")
def browser_page(server):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_page_upload_slider_and_result(server, browser_page, tmp_path):
    page = browser_page
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(encode(random_rgb(12, 16, seed=9)))
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.set_input_files("#file", str(image_path))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
    first_status = page.text_content("#status")
    page.wait_for_function("document.getElementById('result').naturalWidth === 64")
    assert page.evaluate("document.getElementById('result').naturalHeight") == 48
    assert page.get_attribute("#download", "hidden") is None
    first_result = page.get_attribute("#result", "src")

    page.uncheck("#noise-auto")
    page.fill("#noise", "0.8")  # fires 'input' like a drag of the slider
    page.wait_for_function("document.getElementById('status').textContent.includes('noise 0.80')")
    assert page.text_content("#noise-value") == "0.80"
    assert page.get_attribute("#result", "src") != first_result
    assert first_status != page.text_content("#status")


def test_page_shows_the_error_message_of_a_refused_request(server, browser_page, tmp_path):
    page = browser_page
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is text, not an image")
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.set_input_files("#file", str(bogus))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Error 415')")
    assert "not a PNG" in page.text_content("#status")
