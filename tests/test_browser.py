"""Headless Chromium (`intraneuron.reports.browser`) on small local pages: scripts run, images
render, screenshots have the requested size, network resources fail at once when offline, and a
capture over the DevTools pipe clicks, dismisses and crops.

Skipped without Chromium, except on CI (`CI` set), where scripts/setup.sh should have installed it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image

from intraneuron.reports import browser
from intraneuron.reports.browser import (
    BrowserError,
    capture,
    dump_dom,
    evaluate,
    resolver_rules,
    screenshot,
)

if browser.find_chromium() is None:
    if os.environ.get("CI"):
        pytest.fail(
            "no chromium on PATH: scripts/setup.sh should have installed Debian's chromium",
            pytrace=False,
        )
    pytest.skip("chromium is not installed (scripts/setup.sh installs it)", allow_module_level=True)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RED, BLUE = (220, 20, 20), (20, 40, 220)
IMAGE_SIZE = (30, 20)  # the data-URI image's own pixels, shown scaled to 120 x 80
# TEST-NET-3 (RFC 5737): never routed; a browser that really tried it would wait for a timeout.
UNROUTABLE = "http://203.0.113.7"


def data_uri_png(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


PAGE = f"""<!doctype html>
<html><head><style>
  body {{ margin: 0; background: white; }}
  #banner {{ width: 200px; height: 100px; background: rgb{RED}; }}
  #picture {{ display: block; width: 120px; height: 80px; }}
</style></head><body>
<div id="banner"></div>
<img id="picture" src="{data_uri_png(IMAGE_SIZE, BLUE)}">
<p id="status">static html</p>
<script>
  document.getElementById("status").textContent = "written by a script";
  const picture = document.getElementById("picture");
  const report = () => document.body.insertAdjacentHTML(
    "beforeend", `<p id="loaded">image ${{picture.naturalWidth}}x${{picture.naturalHeight}}</p>`);
  picture.complete ? report() : picture.addEventListener("load", report);
</script>
</body></html>
"""

# A page whose every outside resource would hang a browser that went online.
OFFLINE_PAGE = f"""<!doctype html>
<html><head>
<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">
<script src="{UNROUTABLE}/library.js"></script>
</head><body>
<img id="remote" src="{UNROUTABLE}/figure.png"
     onerror="document.body.insertAdjacentHTML('beforeend', '<p id=failed>remote image failed</p>')">
<img id="local" src="local.png"
     onload="document.body.insertAdjacentHTML('beforeend', '<p id=ok>local image loaded</p>')">
<script>document.body.insertAdjacentHTML("beforeend", "<p id=ran>inline script ran</p>");</script>
</body></html>
"""


@pytest.fixture
def page(tmp_path) -> Path:
    path = tmp_path / "page.html"
    path.write_text(PAGE)
    return path


@pytest.fixture
def offline_page(tmp_path) -> Path:
    Image.new("RGB", (4, 4), BLUE).save(tmp_path / "local.png")
    path = tmp_path / "offline.html"
    path.write_text(OFFLINE_PAGE)
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def close_to(pixel, color, tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], color, strict=True))


def test_dump_dom_returns_the_dom_after_the_scripts_ran(page):
    dom = dump_dom(page)
    assert "written by a script" in dom and "static html" not in dom
    # the data-URI image was decoded before the DOM was taken
    assert f"image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}" in dom


def test_a_screenshot_is_a_png_of_the_requested_size_showing_the_page(page, tmp_path):
    out = screenshot(page, tmp_path / "shots" / "page.png", size=(640, 900))
    data = out.read_bytes()
    assert png_size(data) == (640, 900)
    with Image.open(out) as image:
        image = image.convert("RGB")
        assert close_to(image.getpixel((100, 50)), RED)  # the banner
        assert close_to(image.getpixel((60, 140)), BLUE)  # the data-URI image, scaled
        assert close_to(image.getpixel((600, 850)), (255, 255, 255))  # the page below
    assert len(data) > 1000  # a real picture, not an empty file


def test_a_screenshot_replaces_an_old_file(page, tmp_path):
    out = tmp_path / "page.png"
    out.write_bytes(b"stale")
    screenshot(page, out, size=(300, 200))
    assert png_size(out.read_bytes()) == (300, 200)


def test_offline_network_resources_fail_at_once_and_the_page_still_loads(offline_page):
    dom = dump_dom(offline_page)
    assert "inline script ran" in dom
    assert "remote image failed" in dom  # tried and refused, not skipped
    assert "local image loaded" in dom  # file:// resources next to the page are not network


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """`folder` served over HTTP on 127.0.0.1 (a free port) by a thread: its URL and the paths asked of it."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.asked = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.asked.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_site(offline_page):
    """The offline page's folder served over HTTP on 127.0.0.1 (a free port) by a thread."""
    with serving(offline_page.parent) as (url, _):
        yield url


def test_offline_no_request_leaves_the_browser(tmp_path):
    """Why offline resources fail at once rather than after a network timeout: nothing is asked of
    the network. A server on this machine that a file:// page links by address hears nothing
    offline, and the request online."""
    site = tmp_path / "site"
    site.mkdir()
    Image.new("RGB", (4, 4), BLUE).save(site / "figure.png")
    with serving(site) as (url, asked):
        page = tmp_path / "linking.html"
        page.write_text(
            f'<img src="{url}/figure.png" '
            "onload=\"document.body.insertAdjacentHTML('beforeend', '<p>remote image loaded</p>')\" "
            "onerror=\"document.body.insertAdjacentHTML('beforeend', '<p>remote image failed</p>')\">"
        )
        offline = dump_dom(page)
        assert asked == [] and "remote image failed" in offline
        online = dump_dom(page, offline=False)
        assert "/figure.png" in asked and "remote image loaded" in online


def test_offline_a_local_server_is_reachable_and_nothing_else(local_site):
    dom = dump_dom(f"{local_site}/offline.html")
    assert "inline script ran" in dom
    assert "local image loaded" in dom and "remote image failed" in dom


def test_offline_refuses_a_remote_target_and_online_lifts_the_rules():
    with pytest.raises(BrowserError, match="offline"):
        resolver_rules("https://example.org/", offline=True)
    assert resolver_rules("file:///tmp/page.html", offline=True) == "MAP * ~NOTFOUND"
    local = resolver_rules("http://localhost:5000/#/compare-runs", offline=True)
    assert local.startswith("MAP * ~NOTFOUND") and "EXCLUDE 127.0.0.1" in local
    assert resolver_rules("https://example.org/", offline=False) is None


def test_errors_are_one_line_and_name_the_cause(tmp_path, monkeypatch, page):
    with pytest.raises(BrowserError, match="no such page"):
        dump_dom(tmp_path / "missing.html")
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(tmp_path / "no-such-browser"))
    with pytest.raises(BrowserError, match="no Chromium found") as missing:
        dump_dom(page)
    assert "\n" not in str(missing.value)
    failing = tmp_path / "failing-browser"
    failing.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 3\n")
    failing.chmod(0o755)
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(failing))
    with pytest.raises(BrowserError, match="exited with 3.*cannot open display") as failed:
        screenshot(page, tmp_path / "never.png")
    assert "\n" not in str(failed.value)
    assert not (tmp_path / "never.png").exists()


def test_a_browser_that_hangs_is_killed_at_the_timeout(tmp_path, monkeypatch, page):
    # a child too, holding no pipe of ours (nothing would wait for it): the whole group must go
    child_pid = tmp_path / "child.pid"
    hanging = tmp_path / "hanging-browser"
    hanging.write_text(f"#!/bin/sh\nsleep 600 </dev/null >/dev/null 2>&1 &\necho $! > {child_pid}\nwait\n")
    hanging.chmod(0o755)
    monkeypatch.setenv(browser.CHROMIUM_ENV, str(hanging))
    with pytest.raises(BrowserError, match="did not finish within 1 s"):
        dump_dom(page, timeout=1)
    pid = int(child_pid.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# A figure that appears only after a click, far below a small viewport, and a side panel with a
# close button: what MLflow's Compare view needs before its picture is worth taking.
CLICK_PAGE = f"""<!doctype html>
<html><head><style>
  body {{ margin: 0; display: flex; }}
  main {{ flex: 1; }}
  #spacer {{ height: 600px; }}
  #figure {{ height: 200px; background: rgb{BLUE}; }}
  aside {{ width: 150px; height: 100vh; background: rgb{RED}; }}
</style></head><body>
<main><button id="show" onclick="document.getElementById('slot').innerHTML =
  '<div id=figure></div>'">show</button><div id="spacer"></div><div id="slot"></div></main>
<aside><button id="close" onclick="this.parentElement.remove()">close</button></aside>
</body></html>
"""


def test_capture_clicks_dismisses_and_crops_below_the_viewport(tmp_path):
    page = tmp_path / "click.html"
    page.write_text(CLICK_PAGE)
    out = capture(
        page, tmp_path / "click.png", clicks=["#show"], dismiss=["#close", "#not-there"],
        crop_to="#figure", size=(400, 300), timeout=30,
    )  # fmt: skip
    width, height = png_size(out.read_bytes())
    assert width == 400 and 800 < height < 900  # grown from 300 to the figure's bottom (+16)
    with Image.open(out) as image:
        image = image.convert("RGB")
        assert close_to(image.getpixel((380, height - 16 - 100)), BLUE)  # the panel is gone
        assert close_to(image.getpixel((200, height - 5)), (255, 255, 255))


def test_capture_names_the_element_it_waited_for(tmp_path):
    page = tmp_path / "click.html"
    page.write_text(CLICK_PAGE)
    with pytest.raises(BrowserError, match="timed out waiting for an element #never to click"):
        capture(page, tmp_path / "never.png", clicks=["#never"], timeout=3)
    assert not (tmp_path / "never.png").exists()


def test_evaluate_waits_until_a_script_has_shown_the_value(tmp_path):
    page = tmp_path / "late.html"
    page.write_text("<body><script>setTimeout(() => { document.body.dataset.rows = '[1, 2]'; }, 700)</script>")
    assert evaluate(page, "document.body.dataset.rows && JSON.parse(document.body.dataset.rows)", timeout=30) == [1, 2]
    with pytest.raises(BrowserError, match="timed out waiting"):
        evaluate(page, "document.body.dataset.never", timeout=3)
