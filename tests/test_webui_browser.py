"""End to end in a real headless browser: Debian's chromium driven by Playwright (no browser
download), against ``python -m paletta_webui`` and a tiny-profile server, both as subprocesses.

Upload an image, paint a mask stroke, run inpaint, see the output image loaded, approve it,
reload and find the approval still there; caption the input and see the caption's chip stay in
its card. Screenshots at 1280 and 420 px go to
``webui-screenshots/`` (gitignored).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import link_tiny_models

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "webui-screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def webui(tmp_path: Path, tiny_models_dir: Path) -> Iterator[str]:
    """A tiny server and the page in front of it; yields the page's URL."""
    data = tmp_path / "data"
    link_tiny_models(data, tiny_models_dir)
    grpc_port, http_port = free_port(), free_port()
    # The subprocesses run in tmp_path: the import path the tests run with, made absolute.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
    python_path = os.pathsep.join(str((ROOT / p).resolve()) for p in [*paths, "server", "client", "webui", "."])
    # Without pytest's variables: NiceGUI would take the subprocess for a test of its own.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("NICEGUI_", "PYTEST_"))}
    env = {**inherited, "PALETTA_PORT": str(grpc_port), "PALETTA_PROFILE": "tiny", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": python_path}
    logs = (tmp_path / "server.log").open("wb"), (tmp_path / "webui.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "paletta_server.main", str(data)], env=env, cwd=tmp_path,
                              stdout=logs[0], stderr=subprocess.STDOUT)
    page = subprocess.Popen(
        [sys.executable, "-m", "paletta_webui", "--address", f"127.0.0.1:{grpc_port}", "--port", str(http_port),
         "--cache-dir", str(tmp_path / "cache")],
        env=env, cwd=tmp_path, stdout=logs[1], stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_http(url, page, tmp_path / "webui.log")
        yield url
    finally:
        for proc in (page, server):
            proc.terminate()
        for proc in (page, server):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def test_inpaint_in_a_real_browser_then_approve_and_reload(webui, tmp_path, tiny_image_bytes):
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "input.png"
    image.write_bytes(tiny_image_bytes)
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(webui)
        page.get_by_text("Resident models").wait_for()

        page.get_by_label("Mode").click()
        page.get_by_role("option", name="Inpaint", exact=True).click()
        page.locator("[data-slot=image] input[type=file]").set_input_files(str(image))
        page.wait_for_function(
            "() => { const i = document.querySelector('.paletta-mask img'); return i && i.naturalWidth > 0 }"
        )
        box = page.locator(".paletta-mask-canvas").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=8)
        page.mouse.up()
        page.get_by_text("Mask painted").wait_for()

        page.get_by_label("What to paint in the mask").fill("a golden hat")
        page.get_by_role("spinbutton", name="Steps").fill("2")  # the visible one: the inpaint form's
        page.get_by_role("button", name="Run", exact=True).click()
        output = "img[alt='output 0']"
        page.wait_for_selector(output)
        page.wait_for_function(f"() => {{ const i = document.querySelector(\"{output}\"); "
                               "return i && i.complete && i.naturalWidth > 0 }")
        assert page.eval_on_selector(output, "img => img.getAttribute('src')").startswith("/outputs/")

        page.locator(".q-toggle", has_text="Approved").first.click()
        approved = "img[alt^='approved jobs/']"
        page.wait_for_selector(approved)
        page.set_viewport_size({"width": 1280, "height": 1100})
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(600)  # images fade in
        page.screenshot(path=str(SHOTS / "workstation-1280.png"))

        page.reload()
        page.wait_for_selector(approved)
        page.wait_for_function(f"() => {{ const i = document.querySelector(\"{approved}\"); "
                               "return i && i.complete && i.naturalWidth > 0 }")
        assert loaded(page, approved)
        assert page.locator(".q-toggle[aria-checked=true]", has_text="Approved").count() == 1

        # a caption of the same input: its text comes back as a chip, which must wrap inside its card
        page.get_by_label("Mode").click()
        page.get_by_role("option", name="Caption", exact=True).click()
        page.get_by_role("button", name="Use as input").first.click()  # the inpainted output
        page.get_by_role("button", name="Run", exact=True).click()
        chip = page.locator(".paletta-cards .q-chip").first
        chip.wait_for()
        card = chip.locator("xpath=ancestor::div[contains(@class, 'q-card')][1]")
        chip_box, card_box = chip.bounding_box(), card.bounding_box()
        assert chip_box is not None and card_box is not None
        assert chip_box["x"] + chip_box["width"] <= card_box["x"] + card_box["width"] + 0.5

        page.set_viewport_size({"width": 420, "height": 900})
        page.wait_for_timeout(600)
        page.screenshot(path=str(SHOTS / "workstation-420.png"), full_page=True)
        # nothing wider than the viewport at 420 px: the columns stack
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        browser.close()
