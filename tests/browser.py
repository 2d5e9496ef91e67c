"""A real browser for the tests: Debian's `chromium`, headless, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: file descriptors 3 and 4, no port, nothing but the standard library).

`open_page(html_path, screenshot_path)` loads a local file in a fresh profile with every host name
unresolvable (a page that fetches anything from the network fails to load it, and says so, instead of
waiting for it), and returns what the page did:

    {
      "console": [{"level": str, "source": str, "text": str, "url": str}, ...],
                 # every message, in order: console.* calls (source "console", level "log", "info",
                 # "warning", "error", "debug", ...), uncaught exceptions (source "exception", level
                 # "error") and the browser's own log entries (source "network", "javascript", "security",
                 # ...; e.g. "Failed to load resource: net::ERR_FILE_NOT_FOUND" at level "error")
      "console_errors": [str, ...],     # the texts of the messages at level "error" (the URL in
                                        # parentheses after a network error's)
      "requests": [str, ...],           # every URL the page requested, its own file first
      "failed_requests": [{"url": str, "error": str}, ...],
      "dom": str,                       # the doctype and document.documentElement.outerHTML after load
      "page_size": [width, height],     # CSS pixels of the whole page (the viewport is 1280 wide)
      "screenshot": Path,               # a PNG of the whole page, not only the viewport
      "seconds": float,                 # from starting chromium to its exit
    }

A page that does not load (a missing file) or no chromium raises RuntimeError; chromium taking more
than `timeout` seconds in all raises TimeoutError. Either way, chromium's process group is gone when
open_page returns or raises.
"""

import base64
import fcntl
import json
import os
import select
import signal
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1280, 900
# Chromium's largest texture: a taller page is cut at this height in the screenshot.
MAX_SHOT_HEIGHT = 16384
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-breakpad", "--disable-domain-reliability",
    "--metrics-recording-only", "--mute-audio", "--hide-scrollbars", "--disable-features=Translate,MediaRouter",
    # No name resolves: nothing is fetched from the network, by the page or by the browser.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-pipe", f"--window-size={WIDTH},{HEIGHT}",
]


class _DevTools:
    """One chromium and its DevTools pipe: commands in, answers and events out (JSON, NUL-terminated)."""

    def __init__(self, profile: str, log, deadline: float):
        self.deadline = deadline
        self.events: list[dict] = []
        self.answers: dict[int, dict] = {}
        self.next_id = 0
        self.buffer = b""
        to_browser, self.commands = os.pipe()
        self.answers_fd, from_browser = os.pipe()
        # The child finds the pipe on 3 (commands) and 4 (answers): its ends are moved above 9 first, so
        # that putting them in place cannot overwrite one with the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        try:
            self.pid = os.posix_spawn(
                CHROMIUM, [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"], os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, log.fileno(), 1), (os.POSIX_SPAWN_DUP2, log.fileno(), 2),
                              (os.POSIX_SPAWN_DUP2, ends[0], 3), (os.POSIX_SPAWN_DUP2, ends[1], 4)],
                # Its own process group: the browser's helpers (zygote, renderers) go with it.
                setsid=True)
        finally:
            for fd in ends:
                os.close(fd)

    def _read(self, until: float) -> bool:
        """Reads what chromium wrote (waiting until `until` at most); False once the pipe is closed."""
        if not select.select([self.answers_fd], [], [], max(0.0, until - time.monotonic()))[0]:
            return True
        chunk = os.read(self.answers_fd, 1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        *messages, self.buffer = self.buffer.split(b"\0")
        for raw in messages:
            message = json.loads(raw)
            if "id" in message:
                self.answers[message["id"]] = message
            else:
                self.events.append(message)
        return True

    def _check_time(self, what: str):
        if time.monotonic() >= self.deadline:
            raise TimeoutError(f"chromium: no {what} in time")

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self.commands, json.dumps(command).encode() + b"\0")
        while self.next_id not in self.answers:
            self._check_time(f"answer to {method}")
            if not self._read(self.deadline):
                raise RuntimeError(f"chromium exited before answering {method}")
        answer = self.answers.pop(self.next_id)
        if "error" in answer:
            raise RuntimeError(f"chromium: {method}: {answer['error']}")
        return answer.get("result", {})

    def wait_event(self, method: str, session: str):
        while not any(e["method"] == method and e.get("sessionId") == session for e in self.events):
            self._check_time(method)
            if not self._read(self.deadline):
                raise RuntimeError(f"chromium exited before {method}")

    def drain(self, seconds: float):
        """Collects the events of the next `seconds` (what a page does just after its load event)."""
        until = min(time.monotonic() + seconds, self.deadline)
        while time.monotonic() < until and self._read(until):
            pass

    def close(self):
        try:
            os.write(self.commands, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        # Waits for the browser's exit without reaping it, so that its process group (helpers that
        # outlive it included) is still its own when it is killed.
        until = time.monotonic() + max(0.1, min(5.0, self.deadline - time.monotonic()))
        while not os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) and time.monotonic() < until:
            time.sleep(0.02)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.commands)
        os.close(self.answers_fd)


def _text(args: list[dict]) -> str:
    def one(arg: dict) -> str:
        if "value" in arg:
            return arg["value"] if isinstance(arg["value"], str) else json.dumps(arg["value"])
        return arg.get("unserializableValue") or arg.get("description") or arg.get("type", "")
    return " ".join(one(a) for a in args)


def _messages(events: list[dict], session: str) -> tuple[list[dict], list[str], list[dict]]:
    console, requests, failed = [], [], []
    urls = {}
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            level = {"warning": "warning", "error": "error", "assert": "error"}.get(params["type"], params["type"])
            console.append({"level": level, "source": "console", "text": _text(params.get("args", [])),
                            "url": frames[0].get("url", "")})
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exception = details.get("exception") or {}
            what = (exception.get("description") or str(exception.get("value", ""))).split("\n")[0]
            text = details.get("text", "Uncaught")
            console.append({"level": "error", "source": "exception",
                            "text": f"{text} {what}" if what and what not in text else text,
                            "url": details.get("url", "")})
        elif method == "Log.entryAdded":
            entry = params["entry"]
            console.append({"level": entry["level"], "source": entry["source"], "text": entry["text"],
                            "url": entry.get("url", "")})
        elif method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
            requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            failed.append({"url": urls.get(params["requestId"], ""),
                           "error": params.get("blockedReason") or params.get("errorText", "")})
    return console, requests, failed


def open_page(html_path, screenshot_path, timeout: float = 60.0, settle: float = 0.3) -> dict:
    """Opens `html_path` in headless chromium, waits for its load event and `settle` seconds more, and
    returns the shape described at the top of this module; the PNG is written to `screenshot_path`."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"no {CHROMIUM}: `make system-deps` installs Debian's chromium")
    started = time.monotonic()
    url = Path(html_path).resolve().as_uri()
    screenshot = Path(screenshot_path).resolve()
    with tempfile.TemporaryDirectory(prefix="kvab-chromium-", ignore_cleanup_errors=True) as profile, \
            tempfile.TemporaryFile() as log:
        browser = _DevTools(profile, log, started + timeout)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
            navigated = browser.send("Page.navigate", {"url": url}, session)
            if navigated.get("errorText"):
                raise RuntimeError(f"chromium cannot open {url}: {navigated['errorText']}")
            browser.wait_event("Page.loadEventFired", session)
            browser.drain(settle)
            dom = browser.send("Runtime.evaluate", {
                "expression": "(document.doctype ? new XMLSerializer().serializeToString(document.doctype) : '')"
                              " + document.documentElement.outerHTML",
                "returnByValue": True}, session)["result"]["value"]
            content = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            width, height = max(WIDTH, round(content["width"])), round(content["height"])
            shot = browser.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(max(height, 1), MAX_SHOT_HEIGHT),
                         "scale": 1}}, session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        except (TimeoutError, RuntimeError) as e:
            log.seek(0)
            raise type(e)(f"{e}\nchromium's output:\n{log.read().decode(errors='replace')[-3000:]}") from None
        finally:
            browser.close()
    console, requests, failed = _messages(browser.events, session)
    return {
        "console": console,
        "console_errors": [m["text"] + (f" ({m['url']})" if m["source"] == "network" and m["url"] else "")
                           for m in console if m["level"] == "error"],
        "requests": requests,
        "failed_requests": failed,
        "dom": dom,
        "page_size": [width, height],
        "screenshot": screenshot,
        "seconds": round(time.monotonic() - started, 3),
    }
