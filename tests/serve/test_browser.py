"""The page of `i2v serve` in a real browser: Playwright driving Debian's chromium against a live server.

Playwright's own browser download is out of reach where CI runs (only package registries answer), so the test
uses the distribution's chromium, installing it with apt-get when it is missing. When it cannot, the test fails
and says why: a browser test that skips silently would let the page break unnoticed.
"""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from aptget import apt_install
from illust2vec.infer.tagger import Tagger
from illust2vec.infer.thresholds import MIN_CHARACTER_MCUT, resolve
from illust2vec.search import VectorIndex
from illust2vec.serve import ServeConfig, create_app
from illust2vec.serve.state import MCUT

pytestmark = pytest.mark.slow

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # kept after the run (gitignored)


def find_chromium() -> str | None:
    return next((p for p in CHROMIUM if os.access(p, os.X_OK)), None) or shutil.which("chromium")


def install_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing."""
    return apt_install("chromium", find_chromium)


@pytest.fixture(scope="module")
def chromium() -> str:
    return install_chromium()


@pytest.fixture(scope="module")
def server(synth_bundle, synth_images):
    """The app with an index of the held-out images, served by uvicorn on an ephemeral loopback port."""
    import uvicorn

    tagger = Tagger.load(synth_bundle)
    images = sorted(p for p in synth_images.iterdir() if p.suffix != ".json")
    index = VectorIndex.build(tagger.extract_feature(images), [p.stem for p in images], [str(p) for p in images])
    app = create_app(ServeConfig(model=str(synth_bundle), k=8), tagger=tagger, index=index)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", tagger, images
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_tag_move_thresholds_copy_caption(chromium, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, tagger, images = server
    image = images[2]
    general_all = len(tagger.labels.heads["general"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        tag_requests = []
        page.on("request", lambda r: tag_requests.append(r.url) if "/api/tag" in r.url else None)

        page.goto(url)
        expect(page.locator("#model")).to_contain_text(f"{len(tagger.labels)} tags")
        page.set_input_files("#file", str(image))

        # Tags appear, grouped by head, each with a bar as wide as its score.
        general = page.locator(".group-general .tag")
        expect(general.first).to_be_visible(timeout=30_000)
        expect(page.locator(".group-rating .tag")).to_have_count(len(tagger.labels.heads["rating"]))
        first = general.first
        score = float(first.locator(".score").text_content())
        width = first.locator(".fill").evaluate(
            "e => e.getBoundingClientRect().width / e.parentNode.getBoundingClientRect().width"
        )
        assert abs(width - score) < 0.01
        shown = general.count()
        assert 0 < shown <= general_all

        # Thresholds move on the page alone: no new request.
        slider = page.locator("#thr-general")
        slider.focus()
        page.keyboard.press("Home")  # 0: every general tag
        expect(general).to_have_count(general_all)
        page.keyboard.press("End")  # 1: none (no synthetic-board score reaches 1.0)
        expect(general).to_have_count(0)
        for _ in range(65):  # down to 0.35 in steps of 0.01
            page.keyboard.press("ArrowLeft")
        expect(page.locator("#thr-general-value")).to_have_text("0.35")
        n = general.count()
        assert n == sum(1 for s in tagger.scores(tagger.predict([image])[0])["general"].values() if s >= 0.35)
        assert len(tag_requests) == 1

        # The caption: the shown tags, characters first, comma-separated; the button copies it.
        caption = page.locator("#caption").input_value()
        shown_tags = page.locator(".group-character .tag, .group-copyright .tag, .group-general .tag")
        names = shown_tags.evaluate_all("els => els.map(e => e.dataset.tag)")
        assert len(names) >= n and caption == ", ".join(t.replace("_", " ") for t in names)
        page.click("#copy")
        expect(page.locator("#copied")).to_have_text("copied")
        assert page.evaluate("navigator.clipboard.readText()") == caption

        # MCut: the sliders take the thresholds the server resolved (the character one floored), no new request.
        probs = tagger.predict([image])[0]
        want = resolve(tagger.labels.heads, tagger.labels.names, probs, tagger.thresholds, MCUT)
        page.check("#mcut")
        for head in ("general", "character"):
            expect(page.locator(f"#thr-{head}-value")).to_have_text(f"{want[head].value:.2f}")
        assert want["character"].value >= MIN_CHARACTER_MCUT
        assert len(tag_requests) == 1

        # Similar images from the index, with thumbnails served by id.
        thumbs = page.locator("#similar .sim img")
        expect(thumbs).to_have_count(8)
        expect(page.locator("#similar .sim").first).to_have_attribute("href", f"/api/image/{image.stem}")
        loaded = "[...document.querySelectorAll('#similar img')].every(i => i.complete && i.naturalWidth > 0)"
        page.wait_for_function(loaded)

        # A file that is not an image is refused with the server's message.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"this is text")
        page.set_input_files("#file", str(bad))
        expect(page.locator("#error")).to_contain_text("not an image")
        page.set_input_files("#file", str(image))
        expect(page.locator("#error")).to_be_hidden()
        expect(general.first).to_be_visible()

        shot = tmp_path / "serve-page.png"
        page.screenshot(path=str(shot), full_page=True)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "serve-page.png")
        assert not errors, errors
        browser.close()
