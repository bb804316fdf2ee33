"""The page in headless Chromium driven by Playwright: Debian's chromium (installed by .ci/run),
not Playwright's own browser download. Translate, read the n-best list, see the heat map drawn,
stream a generation and watch it grow, classify a review; a screenshot for the docs."""
import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from conftest import ROOT  # noqa: E402
from test_serve_live import start_server  # noqa: E402

CHROMIUM = os.environ.get("SEQ2SEQ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("SEQ2SEQ_REQUIRE_BROWSER"):
    raise RuntimeError("SEQ2SEQ_REQUIRE_BROWSER is set and chromium is not installed (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
SCREENSHOT = os.environ.get("SEQ2SEQ_SCREENSHOT")  # where to keep the page's screenshot (docs/serve.png)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    process, url = start_server(tmp_path_factory.mktemp("page"))  # no model given: the released ones
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_the_page_translates_draws_attention_streams_and_classifies(page_url, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1400})
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(page_url) else None)
            blocked = []  # what the page's Content-Security-Policy refused: nothing of its own
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            response = page.goto(page_url + "/")
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            sync_api.expect(page.locator("#models")).to_contain_text("en-fr", timeout=30_000)

            page.fill("#source", "Two dogs play in the snow.")
            page.click("#translate")
            sync_api.expect(page.locator("#best")).to_contain_text("chiens", timeout=30_000)
            assert page.locator("#nbest-list li").count() == 3
            heatmap = page.locator("#heatmap")
            sync_api.expect(heatmap).to_be_visible()
            assert int(heatmap.get_attribute("data-cells")) >= 7 * 7
            # the canvas holds drawn cells: some pixels are neither white nor transparent
            coloured = page.evaluate("""() => { const c = document.getElementById('heatmap');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] < 200 || d[i + 1] < 200)) n++; return n; }""")
            assert coloured > 500

            page.type("#prefix", "Deux chie", delay=30)  # each key cancels the last; the pause asks
            sync_api.expect(page.locator("#completion")).to_contain_text("Deux chiens", timeout=30_000)
            page.fill("#source", "Two dogs play in the snow. A man in a red shirt rides a bicycle. The children laugh.")
            page.fill("#prefix", "")
            page.click("#translate")
            sync_api.expect(page.locator("#best")).to_contain_text("enfants", timeout=30_000)  # the third sentence too
            page.fill("#glossary", "bicycle = bicyclette")
            page.click("#translate")
            sync_api.expect(page.locator("#best")).to_contain_text("bicyclette", timeout=30_000)
            page.fill("#glossary", "")

            page.fill("#prompt", "ROMEO:")
            page.fill("#max-chars", "1500")
            page.click("#generate")
            generated = page.locator("#generated")
            page.wait_for_function("() => document.getElementById('generated').textContent.length > 20", timeout=30_000)
            partial = len(generated.text_content())
            assert generated.get_attribute("data-done") == "false" and partial < len("ROMEO:") + 1500
            page.wait_for_function("() => document.getElementById('generated').dataset.done === 'true'", timeout=60_000)
            assert len(generated.text_content()) == len("ROMEO:") + 1500 > partial  # it grew as it streamed

            page.click("#classify")
            sync_api.expect(page.locator("#label-text")).to_contain_text("positive", timeout=30_000)
            page.screenshot(path=SCREENSHOT or str(tmp_path / "page.png"), full_page=True)
            assert not outside, outside  # nothing loaded from outside the server
            assert not blocked, blocked
        finally:
            browser.close()
    assert Path(SCREENSHOT or tmp_path / "page.png").stat().st_size > 10_000
