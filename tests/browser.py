"""A real headless Chromium driven over the Chrome DevTools Protocol, for the dashboard test.

No selenium or playwright: Chromium is started with ``--remote-debugging-port=0``,
the port is read from ``<user-data-dir>/DevToolsActivePort`` and the page
target's websocket is spoken to with Tornado's websocket client. The calls are
blocking (each runs the helper's own asyncio loop until its answer arrives), so
a plain synchronous test can use them. Every wait polls a condition against a
deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

from cachebus.testing import wait_for

#: Where tests/install-browser.sh (Debian's chromium package) puts it, then the usual names.
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(AssertionError):
    """The browser did not do what the test asked within its deadline."""


class Browser:
    """One headless Chromium process and its first page, over CDP."""

    def __init__(self, binary: str, log_path: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._user_data = Path(tempfile.mkdtemp(prefix="cachebus-chromium-"))
        self._log = open(log_path, "ab")
        self._loop = asyncio.new_event_loop()
        self._ws: WebSocketClientConnection | None = None
        self._next_id = 0
        #: CDP events seen while waiting for answers: console calls, exceptions, log entries.
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={self._user_data}", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", "--disable-background-networking", "--disable-extensions",
             "--disable-component-update", "--disable-sync", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Its own process group, so its renderer and helper processes can be ended with it.
            start_new_session=True)
        try:
            self._run(self._attach())
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    # --- plumbing ------------------------------------------------------------

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    async def _attach(self) -> None:
        port_file = self._user_data / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode} before it listened; "
                                   f"see {self._log.name}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if lines and lines[0].strip().isdigit():
                port = int(lines[0])
                break
            if time.monotonic() > deadline:
                raise BrowserError("chromium wrote no DevToolsActivePort in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        while True:
            targets = await asyncio.to_thread(self._targets, port)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                break
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium offers no page target: {targets}")
            await asyncio.sleep(0.1)
        self._ws = await websocket_connect(pages[0]["webSocketDebuggerUrl"], max_message_size=256 * 1024 * 1024)

    @staticmethod
    def _targets(port: int) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
            return json.load(response)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None
        self._next_id += 1
        call_id = self._next_id
        await self._ws.write_message(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            raw = await self._ws.read_message()
            if raw is None:
                raise BrowserError(f"the DevTools connection closed during {method}")
            message = json.loads(raw)
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its result."""
        return self._run(self._call(method, params))

    # --- what tests use --------------------------------------------------------

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float | None = None, what: str | None = None) -> Any:
        """Poll the JavaScript ``condition`` until it is truthy; its value. Fails at the deadline."""
        limit = self.timeout if timeout is None else timeout
        return wait_for(lambda: self.evaluate(condition), limit, what or condition)

    def navigate(self, url: str) -> None:
        """Load ``url`` and wait until the document and its scripts have loaded."""
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                      what=f"{url} to load")

    def _box(self, selector: str) -> dict[str, float]:
        """Scroll ``selector`` into view; the centre of its box, failing if it is not visible."""
        box = self.wait_for(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                const r = el.getBoundingClientRect();
                if (r.width === 0 || r.height === 0 || el.disabled) return null;
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()""", what=f"{selector} to be visible and enabled")
        return box

    def click(self, selector: str) -> None:
        """A real left click at the middle of the element, as a user's mouse would."""
        box = self._box(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
            self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], **extra)

    def type(self, selector: str, text: str) -> None:
        """Click into a field, empty it, and type ``text`` into it."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.send("Input.insertText", text=text)

    def set_viewport(self, width: int, height: int, scale: float = 1, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=scale, mobile=mobile)
        self.wait_for(f"window.innerWidth === {width}", what=f"the viewport to be {width} wide")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """JavaScript exceptions, console errors and browser log errors (CSP violations among them)."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + (details.get("exception", {}).get("description")
                                              or details.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        return found

    def close(self) -> None:
        """Stop Chromium (killed if it does not quit at once) and remove its profile."""
        try:
            if self._ws is not None:
                self._ws.close()
                self._ws = None
                # Let the close frame and the socket's callbacks run before the loop goes.
                self._loop.run_until_complete(asyncio.sleep(0))
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            try:
                # Helpers of this Chromium that outlived it (the group is the one started above).
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._loop.close()
            self._log.close()
            shutil.rmtree(self._user_data, ignore_errors=True)
