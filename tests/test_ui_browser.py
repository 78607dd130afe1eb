"""`vd ui` in a real browser: Debian's Chromium (/usr/bin/chromium, installed by `make install`) driven
headless by Playwright (never a downloaded browser). The page is served by `vd ui` in a subprocess over a
temporary ROOT holding a generated clip; the test opens the clip, clicks two points on the frame, types a
box, runs Track (box only), Invert and Edit with the tiny model, and checks what the page shows.

Without /usr/bin/chromium the test skips with a loud reason, except under CI (`CI` set), where it fails.
Screenshots go to the test's tmp dir; set VD_UI_SCREENSHOT=PATH to also keep the final one (the README's).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
VD = Path(sys.executable).parent / "vd"


def _require_browser() -> None:
    missing = [what for what, ok in (("/usr/bin/chromium", CHROMIUM.is_file()),) if not ok]
    try:
        import playwright.sync_api  # noqa: F401
    except ModuleNotFoundError:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if missing:
        reason = (f"BROWSER TEST NOT RUN: {', '.join(missing)} missing; `make install` installs Debian's chromium "
                  f"as root (apt-get install -y chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen, seconds: float = 45.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vd ui exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"vd ui did not answer on {url} within {seconds:.0f} s")


@pytest.fixture
def server(tmp_path):
    from stages.io.synthetic import moving_disc
    from stages.io.video import write_mp4

    _require_browser()
    root = tmp_path / "root"
    root.mkdir()
    video, _ = moving_disc(4, 128, 128, seed=0)
    write_mp4(root / "disc.mp4", video, 8.0)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([str(VD), "ui", str(root), "--port", str(port), "--model", "tiny", "--device", "cpu",
                             "--sam2", "random"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_up(url, proc)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _text(page, elem_id: str) -> str:
    """The value of a Gradio textbox."""
    return page.locator(f"#{elem_id}").get_by_role("textbox").first.input_value()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id}").get_by_role("textbox").first
    box.fill(value)
    box.blur()


def _fill_number(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(value)
    field.blur()


def _objects(page) -> list:
    return json.loads(page.locator("#objects .cm-content").inner_text())


def test_click_track_invert_edit_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, root = server
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#open-clip")
            # the clip under ROOT is preselected; 4 frames at 64 px
            _fill(page, "frames", "4")
            _fill(page, "size", "64")
            page.click("#open-clip")
            expect(page.locator("#workspace").get_by_role("textbox")).to_have_value(str(root / "disc.vd"),
                                                                                   timeout=30000)
            image = page.locator("#frame img")
            expect(image).to_be_visible(timeout=10000)
            assert "disc.mp4" in _text(page, "clip-cmd")

            # two clicks on the frame: two object points at once (no SAM2 involved), where we clicked
            for fx, fy in ((0.5, 0.5), (0.25, 0.75)):
                before = len(_objects(page)[0]["points"])
                image.scroll_into_view_if_needed()
                shown = image.evaluate("e => [e.clientWidth, e.clientHeight, e.naturalWidth, e.naturalHeight]")
                scale = min(shown[0] / shown[2], shown[1] / shown[3], 1)  # Gradio never enlarges an image
                left, top = (shown[0] - shown[2] * scale) / 2, (shown[1] - shown[3] * scale) / 2
                image.click(position={"x": left + fx * shown[2] * scale, "y": top + fy * shown[3] * scale})
                page.wait_for_function(
                    "n => JSON.parse(document.querySelector('#objects .cm-content').innerText)[0].points.length > n",
                    arg=before, timeout=10000)
            points = _objects(page)[0]["points"]
            assert len(points) == 2 and all(p[2] == 1 for p in points)
            assert abs(points[0][0] - 32) <= 3 and abs(points[0][1] - 32) <= 3, points
            assert abs(points[1][0] - 16) <= 3 and abs(points[1][1] - 48) <= 3, points
            page.screenshot(path=str(shots / "1-points.png"))

            # a typed box, box only (the random SAM2 means nothing), Track: the preview appears
            _fill(page, "box", "16,16,48,48")
            page.click("#set-box")
            page.wait_for_function(
                "() => JSON.parse(document.querySelector('#objects .cm-content').innerText)[0].box !== null",
                timeout=10000)
            page.locator("#box-only input[type=checkbox]").check()
            page.click("#track")
            expect(page.locator("#preview img")).to_be_visible(timeout=30000)
            assert (root / "disc.vd" / "masks" / "preview.gif").is_file()
            assert "--box-only" in _text(page, "track-cmd")
            page.screenshot(path=str(shots / "2-track.png"))

            # Invert with the tiny model (2 steps), then Edit: the player and the scores appear
            _fill(page, "invert-prompt", "a red disc")
            _fill_number(page, "steps", "2")
            _fill_number(page, "null-steps", "1")
            page.click("#invert")
            expect(page.locator("#invert-result").get_by_role("textbox")).to_have_value(
                re.compile("reconstruction PSNR"), timeout=60000)
            assert "predicted peak memory" in _text(page, "estimate")
            _fill(page, "edit-prompt", "a blue disc")
            page.click("#edit")
            expect(page.locator("#player video")).to_be_visible(timeout=60000)
            expect(page.locator("#scores")).to_contain_text("PSNR", timeout=30000)
            assert "vd edit" in _text(page, "edit-cmd")
            page.screenshot(path=str(shots / "3-edit.png"), full_page=True)
            keep = os.environ.get("VD_UI_SCREENSHOT")
            if keep:  # the README's picture: 256 colours keep it small
                from PIL import Image

                with Image.open(shots / "3-edit.png") as shot:
                    shot.convert("RGB").quantize(256).save(keep, optimize=True)
        finally:
            browser.close()
    assert (root / "disc.vd" / "edits" / "blue" / "edit.mp4").is_file()
