"""The page at `/` in a real headless Chromium (Debian's package, driven by Playwright): upload an
image, ask, see the streamed answer, the count badge and the numbered point markers drawn where
the server says, with coordinates on hover. The backend replays a known answer, so the expected
pixel positions are known. A screenshot is saved as a test artifact (path printed)."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from tests.serve_helpers import ScriptedBackend, demo_tokenizer_dir, running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (.ci/run installs it)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

ANSWER = ('Counting the <points x1="25.0" y1="30.0" x2="70.0" y2="65.0" alt="red circles">'
          'red circles</points> shows a total of 2.')
WIDTH, HEIGHT = 400, 300
EXPECTED = [(100.0, 90.0), (280.0, 195.0)]   # percent of (400, 300) in pixels


def _scene(path: Path) -> None:
  image = Image.new("RGB", (WIDTH, HEIGHT), (238, 232, 220))
  draw = ImageDraw.Draw(image)
  for x, y in EXPECTED:
    draw.ellipse([x - 28, y - 28, x + 28, y + 28], fill=(214, 40, 40))
  draw.rectangle([180, 40, 240, 100], fill=(40, 90, 200))
  image.save(path)


def _artifact_dir(tmp_path: Path) -> Path:
  root = os.environ.get("MOLMO_TEST_ARTIFACTS")
  out = Path(root) if root else tmp_path
  out.mkdir(parents=True, exist_ok=True)
  return out


def test_page_uploads_asks_streams_and_draws_points(tmp_path):
  image_path = tmp_path / "scene.png"
  _scene(image_path)
  backend = ScriptedBackend(demo_tokenizer_dir(tmp_path), lambda prepared: ANSWER, step_delay_s=0.01)
  with running_server(backend) as (url, _), sync_api.sync_playwright() as playwright:
    context = playwright.chromium.launch_persistent_context(
        tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 800})
    try:
      page = context.new_page()
      requests = []
      page.on("request", lambda r: requests.append(r.url))
      page.goto(url + "/")
      page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
      page.set_input_files("#file", str(image_path))
      page.wait_for_function("document.getElementById('photo').naturalWidth === 400")
      page.click("button[data-template='Count the ']")
      assert page.input_value("#prompt") == "Count the "
      page.type("#prompt", "red circles")
      page.click("#ask")
      page.wait_for_function("document.querySelectorAll('.marker').length === 2", timeout=60_000)
      page.wait_for_function("!document.getElementById('answer').classList.contains('streaming')")

      assert page.inner_text("#answer") == ANSWER
      assert page.inner_text("#count-value") == "2"
      assert page.is_visible("#count")
      photo = page.locator("#photo").bounding_box()
      scale_x, scale_y = photo["width"] / WIDTH, photo["height"] / HEIGHT
      markers = page.locator(".marker")
      for i, (x, y) in enumerate(EXPECTED):
        marker = markers.nth(i)
        assert marker.inner_text().startswith(str(i + 1))
        assert float(marker.get_attribute("data-x")) == pytest.approx(x)
        assert float(marker.get_attribute("data-y")) == pytest.approx(y)
        box = marker.bounding_box()
        centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert centre[0] == pytest.approx(photo["x"] + x * scale_x, abs=1.5)
        assert centre[1] == pytest.approx(photo["y"] + y * scale_y, abs=1.5)
      rows = page.locator("#points tbody tr")
      assert rows.count() == 2 and rows.nth(1).inner_text().split() == ["2", "280.0", "195.0"]

      markers.nth(1).hover()
      tip = markers.nth(1).locator(".tip")
      tip.wait_for(state="visible")
      assert tip.inner_text() == "#2: x=280.0, y=195.0 px"

      # Self-contained: every request the page made went to this server.
      assert requests and all(r.startswith(url) or r.startswith("data:") for r in requests), requests
      shot = _artifact_dir(tmp_path) / "serve-page.png"
      page.screenshot(path=str(shot), full_page=True)
      print(f"screenshot: {shot}")
      drawn = np.asarray(Image.open(shot).convert("RGB"))
      assert drawn.shape[0] > 300 and drawn.shape[1] > 400

      # A refused request shows the server's error message instead of an answer.
      page.evaluate("document.querySelector('details').open = true")
      page.fill("#max-tokens", "100000")
      page.click("#ask")
      page.wait_for_function("document.getElementById('answer').classList.contains('error')")
      assert "max_tokens must be between 1 and" in page.inner_text("#answer")
      assert page.locator(".marker").count() == 0
    finally:
      context.close()
