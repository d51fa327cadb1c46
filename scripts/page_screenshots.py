"""Screenshots of the service page steering the built-in demo model with the noise knob, for the
docs: one photo with added noise, upscaled at noise 0 and at noise 1 (headless Chromium).

    s3diff serve --port 8011 &
    python3 scripts/page_screenshots.py --url http://127.0.0.1:8011 --image noisy.png --out docs/images
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(args.url + "/")
        page.set_input_files("#file", str(args.image))
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
        page.uncheck("#noise-auto")
        for value in ("0.00", "1.00"):
            page.fill("#noise", value)
            page.wait_for_function(f"document.getElementById('status').textContent.includes('noise {value}')")
            page.screenshot(path=str(args.out / f"page-noise-{value}.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
