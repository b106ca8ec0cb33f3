"""Screenshot of image_search.py's web page (docs/search.md's picture), taken in headless Chromium.

Serves --gallery with --model on a free localhost port, uploads --query through the page's
file input, waits for the results' thumbnails, and saves the window as a PNG. Needs Debian's
chromium and chromedriver (tests/install_browser.sh) and selenium (requirements-dev.txt).

    python -m tools.search_page_screenshot --model m.model --gallery g.npy --query q.jpg --out docs/search_page.png
"""

import argparse
import shutil
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from deeprank.search.searcher import Searcher
from deeprank.search.web import create_app, make_server


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--out", default="docs/search_page.png")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--size", default="1280,1000", help="window width,height")
    args = parser.parse_args()

    server = make_server(create_app(Searcher(args.model, args.gallery), k=args.k))  # waitress, as --serve runs it
    threading.Thread(target=server.run, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        browser.get(f"http://127.0.0.1:{server.effective_port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery figure"))
        browser.find_element(By.ID, "file").send_keys(str(Path(args.query).resolve()))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results figure")) == args.k)
        wait.until(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        browser.quit()
        server.close()


if __name__ == "__main__":
    main()
