"""The web page end to end: headless Chromium (Debian's ``chromium``, driven by Playwright)
opens the page of a live service, types a query, sees the results with their images, uploads
an image and sees its zero-shot labels."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi", reason="the service needs fastapi and uvicorn: pip install 'cliplab[serve]'")
pytest.importorskip("httpx", reason="the service tests need httpx (the 'test' extra)")
playwright = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (the 'test' extra)")

from _serve import COLOURS, KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: install Debian's chromium "
                                                         "(apt-get install chromium; .ci/run does) to test the page")


def wait_until(page, expression: str, timeout_s: float = 60) -> None:
    """Poll a JavaScript expression until it is true (``page.wait_for_function`` would evaluate
    it with ``eval``, which the page's Content-Security-Policy forbids)."""
    for _ in range(int(timeout_s * 10)):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"still false after {timeout_s} s: {expression}")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, live):
    context = browser.new_context()
    page = context.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(60_000)
    page.goto(live.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()
    assert not errors, errors
    assert all(u.startswith(live.url) or u.startswith("blob:") for u in requests), requests   # nothing external


def test_search_by_text_shows_results_with_images(page):
    assert page.is_visible("#api-key")                      # the service asks for a key
    assert "8 indexed images" in page.inner_text("#model")
    page.fill("#api-key", KEY)
    page.fill("#k", "5")
    page.fill("#query", "a red circle")
    page.click("#search-button")
    page.wait_for_selector(".hit >> nth=4")
    hits = page.query_selector_all(".hit")
    assert len(hits) == 5
    scores = [float(h.query_selector(".score").inner_text()) for h in hits]
    assert scores == sorted(scores, reverse=True)
    paths = [h.query_selector(".path").inner_text() for h in hits]
    assert all(p.endswith(".png") and p.rsplit("/", 1)[-1][:-4] in COLOURS for p in paths)
    assert page.inner_text("#status") == "5 results"
    # every result's image was fetched with the key and decoded
    wait_until(page, "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")


def test_wrong_key_shows_the_error(page):
    page.fill("#api-key", "wrong")
    page.fill("#query", "a red circle")
    page.click("#search-button")
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status") and "API key" in page.inner_text("#status")
    assert page.query_selector_all(".hit") == []


def test_upload_shows_labels_and_similar_images(page, image_folder):
    page.fill("#api-key", KEY)
    page.set_input_files("#image", str(image_folder / "blue.png"))
    page.fill("#labels", "red circle, blue circle, green circle")
    page.click("#classify-button")
    page.wait_for_selector("#labels-out li >> nth=2")
    labels = [li.inner_text() for li in page.query_selector_all("#labels-out li")]
    assert sorted(text.strip().rsplit(" ", 1)[0] for text in labels) == ["blue circle", "green circle", "red circle"]
    assert page.inner_text("#status").startswith("top label: ")
    page.click("#image-search-button")
    page.wait_for_selector(".hit")
    first = page.query_selector(".hit .path").inner_text()
    assert first.endswith("blue.png")                       # the image itself is its nearest neighbour
