"""Headless Chromium over subprocess: the DOM of a page after its scripts ran, or a PNG of it.

Used for the README's images (neuron cards, MLflow's Compare view) and to test that HTML reports
render. No Python browser package. `dump_dom` and `screenshot` use Chromium's one-shot flags
(`--dump-dom`, `--screenshot=PATH`, https://developer.chrome.com/docs/automation-and-testing/headless-cli).
`capture` (a PNG) and `evaluate` (a value) wait for what a page shows only after a click or its
data (MLflow's Compare view, its runs table): both speak the DevTools protocol over
`--remote-debugging-pipe` (JSON messages ending in NUL on the browser's fds 3 and 4): no port opens.

Each call gets a fresh temporary profile (removed afterwards) and runs in its own process group,
which is killed whole on a timeout, so no browser process outlives the call. `--virtual-time-budget`
fast-forwards the page's timers before the one-shot capture, so a script-built page (a single-page
app, a delayed render) is there without waiting in real time.

Offline by default: a host-resolver rule maps every host name and IP literal to "not found", so any
network resource of the page fails at once instead of hanging (the page still loads). Only
127.0.0.1/localhost stay reachable, and only when the target itself is such a local server.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ENV = "INTRANEURON_CHROMIUM"  # path or name of the browser, overriding the search
CANDIDATES = ("chromium", "chromium-browser")  # Debian's package, and the name elsewhere
LOCAL_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_SIZE = (1280, 800)
DEFAULT_BUDGET_MS = 5000
_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu",
    # a predictable picture: no scrollbar strip, one device pixel per CSS pixel
    "--hide-scrollbars", "--force-device-scale-factor=1",
    # Debian's launcher adds --disable-dev-shm-usage only when its /dev/shm probe works; a small
    # /dev/shm (containers) crashes the renderer without it
    "--disable-dev-shm-usage",
    # no proxy from the environment: the page reaches the local server directly, or nothing
    "--no-proxy-server",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--mute-audio",
)  # fmt: skip
# Log lines of a container without a session bus or a display: noise, not the reason for a failure.
_NOISE = re.compile(r"dbus|unexpected operator|Fontconfig")
_STDERR_TAIL = 600  # characters of Chromium's stderr in an error message


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or timed out. One line, with the tail of its stderr."""


def find_chromium() -> str | None:
    """The browser to run: $INTRANEURON_CHROMIUM if set, else chromium or chromium-browser on PATH."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return shutil.which(override)  # a path or a name; None if it is not an executable
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def target_url(target: str | Path) -> str:
    """A file path (str or Path) as an absolute file:// URL; an http(s) or file URL as it is."""
    if isinstance(target, str) and urlparse(target).scheme in ("http", "https", "file"):
        return target
    path = Path(target).resolve()
    if not path.is_file():
        raise BrowserError(f"no such page: {path}")
    return path.as_uri()


def dump_dom(
    target: str | Path,
    *,
    timeout: float = 60,
    offline: bool = True,
    budget_ms: int = DEFAULT_BUDGET_MS,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> str:
    """The serialized DOM of the page once its scripts ran (what `--dump-dom` prints)."""
    return _run(target, ["--dump-dom"], size, timeout, offline, budget_ms)


def screenshot(
    target: str | Path,
    out_png: str | Path,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    timeout: float = 60,
    offline: bool = True,
    budget_ms: int = DEFAULT_BUDGET_MS,
) -> Path:
    """A PNG of the page's viewport at `size` (width, height) CSS pixels, written to out_png.

    Only the viewport is captured: give a tall size for a long page."""
    out = Path(out_png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a stale file must not pass for this call's picture
    _run(target, [f"--screenshot={out}"], size, timeout, offline, budget_ms)
    if not out.is_file() or out.stat().st_size == 0:
        raise BrowserError(f"chromium wrote no screenshot to {out}")
    return out


def capture(
    target: str | Path,
    out_png: str | Path,
    *,
    clicks: Sequence[str] = (),
    dismiss: Sequence[str] = (),
    ready: str | None = None,
    crop_to: str | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    timeout: float = 60,
    offline: bool = True,
) -> Path:
    """A PNG of the page after clicking each CSS selector of `clicks` in turn.

    Each click waits for its element to appear (a single-page app renders it after its data
    arrived). Then the elements of `dismiss` that are there are clicked once, without waiting (the
    close button of a side panel or banner), and it waits until the JavaScript expression `ready`
    is true (if given) and every image has loaded.

    The picture is the viewport at `size`; with `crop_to`, the page from its top down to the
    bottom of the elements matching that selector, the viewport first grown to reach them (an app
    laid out in 100vh scrolls inside itself: only a taller viewport shows more of it)."""
    out = Path(out_png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a stale file must not pass for this call's picture
    width, height = (int(n) for n in size)
    with _page(target, size, timeout, offline) as tools:
        for selector in clicks:
            tools.until(_CLICK % json.dumps(selector), f"an element {selector} to click")
        for selector in dismiss:
            tools.call("Runtime.evaluate", {"expression": _CLICK % json.dumps(selector)})
        if ready:
            tools.until(ready, f"the page to be ready ({ready})")
        tools.settle()
        params: dict = {"format": "png"}
        if crop_to:
            bottom_of = _BOTTOM_OF % json.dumps(crop_to)
            bottom = tools.until(bottom_of, f"an element {crop_to}")
            for _ in range(_GROW_STEPS):  # a taller viewport may move or grow the elements
                if bottom <= height:
                    break
                height = tools.resize(width, int(bottom))
                bottom = tools.until(bottom_of, f"an element {crop_to}")
            clip = {"x": 0, "y": 0, "width": width, "height": min(int(bottom), height)}
            params["clip"] = clip | {"scale": 1}
        data = tools.call("Page.captureScreenshot", params)["data"]
    out.write_bytes(base64.b64decode(data))
    return out


def evaluate(
    target: str | Path,
    expression: str,
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    timeout: float = 60,
    offline: bool = True,
):
    """The value (as JSON gives it back) of a JavaScript expression in the page, once it is truthy:
    what a single-page app shows once its data arrived, the expression being falsy until then."""
    with _page(target, size, timeout, offline) as tools:
        return tools.until(expression, "the page to show what the expression waits for")


@contextlib.contextmanager
def _page(target: str | Path, size: tuple[int, int], timeout: float, offline: bool):
    """A browser over its DevTools pipe, with the page loaded in a viewport of `size`."""
    url = target_url(target)
    # the browser may still be letting go of its profile when the folder is removed
    profiles = tempfile.TemporaryDirectory(prefix="intraneuron-chromium-", ignore_cleanup_errors=True)
    with profiles as profile:
        command = [*_command(url, size, offline, profile), "--remote-debugging-pipe", "about:blank"]
        with _DevTools(command, time.monotonic() + timeout, url) as tools:
            tools.open(url, *(int(n) for n in size))
            yield tools


def resolver_rules(url: str, offline: bool) -> str | None:
    """The --host-resolver-rules value: every host unresolvable, except a local target's host."""
    if not offline:
        return None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if parsed.hostname not in LOCAL_HOSTS:
            raise BrowserError(f"offline mode reaches only {'/'.join(LOCAL_HOSTS)}, not {url}")
        # both names: the page may link one while the server was addressed by the other
        return "MAP * ~NOTFOUND, " + ", ".join(f"EXCLUDE {host}" for host in LOCAL_HOSTS)
    return "MAP * ~NOTFOUND"


def _command(url: str, size: tuple[int, int], offline: bool, profile: str) -> list[str]:
    """The browser and the flags every call shares (no action, no target)."""
    browser = find_chromium()
    if browser is None:
        where = os.environ.get(CHROMIUM_ENV) or " or ".join(CANDIDATES)
        raise BrowserError(
            f"no Chromium found ({where}); scripts/setup.sh installs Debian's chromium"
        )
    width, height = size
    flags = [*_FLAGS, f"--window-size={int(width)},{int(height)}", f"--user-data-dir={profile}"]
    rules = resolver_rules(url, offline)
    if rules:
        flags.append(f"--host-resolver-rules={rules}")
    return [browser, *flags]


def _run(
    target: str | Path,
    action: list[str],
    size: tuple[int, int],
    timeout: float,
    offline: bool,
    budget_ms: int,
) -> str:
    """Run Chromium once on the target; its stdout. Raises BrowserError on any failure."""
    url = target_url(target)
    with tempfile.TemporaryDirectory(prefix="intraneuron-chromium-") as profile:
        command = [*_command(url, size, offline, profile),
                   f"--virtual-time-budget={int(budget_ms)}", *action, url]  # fmt: skip
        stdout, stderr, code = _communicate(command, timeout)
    if code != 0:
        raise BrowserError(f"chromium exited with {code} on {url}: {_tail(stderr)}")
    return stdout


def _communicate(command: list[str], timeout: float) -> tuple[str, str, int]:
    """Run in a new process group; on timeout kill the whole group (zygote, renderers, GPU)."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, text=True, errors="replace",
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        _, stderr = process.communicate()
        raise BrowserError(
            f"chromium did not finish within {timeout:g} s on {command[-1]}: {_tail(stderr)}"
        ) from None
    _kill_group(process.pid)  # a helper the browser left behind (none, normally)
    return stdout, stderr, process.returncode


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(stderr: str) -> str:
    lines = [
        line.strip() for line in stderr.splitlines() if line.strip() and not _NOISE.search(line)
    ]
    text = " | ".join(lines)[-_STDERR_TAIL:]
    return text or "(no stderr)"


# JavaScript for `capture`, each a value that is falsy until its step can be taken.
_CLICK = "(() => { const e = document.querySelector(%s); if (e) e.click(); return !!e; })()"
_IMAGES_LOADED = "[...document.images].every(i => i.complete)"
_BOTTOM_OF = """(() => { const all = [...document.querySelectorAll(%s)];
  if (!all.length) return 0; window.scrollTo(0, 0);
  return Math.ceil(Math.max(...all.map(e => e.getBoundingClientRect().bottom))) + 16; })()"""
_SETTLE_S = 0.5  # after the last image loaded: the layout and paint that follow it
_GROW_STEPS = 3  # viewport enlargements for `crop_to`
_POLL_S = 0.2


class _DevTools:
    """One browser driven over --remote-debugging-pipe: it reads commands on fd 3 and writes
    replies and events on fd 4. Chromium is started through bash, whose `exec` redirections put
    the two pipe ends on those numbers (subprocess keeps descriptors but cannot renumber them)."""

    def __init__(self, command: list[str], deadline: float, url: str):
        self.deadline, self.url = deadline, url
        bash = shutil.which("bash")
        if bash is None:
            raise BrowserError("capture needs bash to start chromium with its DevTools pipe")
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        # both ends the browser keeps on numbers >= 10: renumbering to 3 and 4 cannot clobber them
        keep = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        script = f'exec "$@" 3<&{keep[0]} 4>&{keep[1]} {keep[0]}<&- {keep[1]}>&-'
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [bash, "-c", script, "chromium", *command], pass_fds=keep, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
        )  # fmt: skip
        for fd in keep:
            os.close(fd)
        self._buffer, self._next_id, self.session = b"", 0, None

    def __enter__(self) -> _DevTools:
        return self

    def __exit__(self, *exc_info) -> None:
        try:  # a clean exit lets Chromium release its profile before the folder is removed
            os.write(self._commands, b'{"id": 0, "method": "Browser.close"}\0')
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _kill_group(self.process.pid)
        self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        self._stderr.close()

    def open(self, url: str, width: int, height: int) -> None:
        """A new tab with a viewport of exactly width x height, loaded with url."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)
        attach = {"targetId": target["targetId"], "flatten": True}  # one pipe, sessions by id
        self.session = self.call("Target.attachToTarget", attach, browser=True)["sessionId"]
        self.call("Page.enable")
        self.resize(width, height, settle=False)
        self.call("Page.navigate", {"url": url})
        self._read(lambda m: m.get("method") == "Page.loadEventFired", "the page to load")

    def resize(self, width: int, height: int, settle: bool = True) -> int:
        """Set the viewport (CSS pixels, one device pixel each); its new height."""
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics)
        if settle:
            self.settle()
        return height

    def settle(self) -> None:
        """Wait for every image to load, then for the layout and paint after it."""
        self.until(_IMAGES_LOADED, "the images to load")
        time.sleep(_SETTLE_S)

    def until(self, expression: str, what: str):
        """Evaluate the expression in the page until its value is truthy; that value."""
        while True:
            reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
            if "exceptionDetails" in reply:  # a broken expression would never become true
                error = reply.get("result", {}).get("description") or reply["exceptionDetails"]
                self._fail(f"{what}: the page threw {str(error).splitlines()[0]}")
            value = reply.get("result", {}).get("value")
            if value:
                return value
            if time.monotonic() + _POLL_S > self.deadline:
                self._fail(f"timed out waiting for {what}")
            time.sleep(_POLL_S)

    def call(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        try:
            os.write(self._commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            self._fail(f"chromium closed its DevTools pipe before {method}")
        reply = self._read(lambda m: m.get("id") == self._next_id, method)
        if "error" in reply:
            self._fail(f"{method} failed: {reply['error'].get('message', reply['error'])}")
        return reply.get("result", {})

    def _read(self, wanted, what: str) -> dict:
        """The next message that `wanted` accepts; other events are dropped."""
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                self._fail(f"timed out waiting for {what}")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                self._fail(f"chromium exited while waiting for {what}")
            self._buffer += chunk

    def _fail(self, reason: str):
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        raise BrowserError(f"chromium on {self.url}: {reason}: {_tail(stderr)}")
