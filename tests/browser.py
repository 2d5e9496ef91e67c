"""A real browser for the tests: Debian's `chromium`, headless, opening a local file with no network
needed. `open_page` returns what the page said on its console (errors, uncaught exceptions, failed
loads: every console line, since kvab's reports run no script that logs) and the DOM after load, and
keeps a PNG screenshot."""

import re
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# [pid:tid:date/time:INFO:CONSOLE:1] "Uncaught Error: x", source: file:///... (1)
CONSOLE = re.compile(r":CONSOLE(?::\d+)?\] (.*)$")


def _chromium(url: str, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="kvab-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags, url],
            capture_output=True, text=True, timeout=timeout)


def open_page(html_path, screenshot_path, timeout: float = 60.0) -> dict:
    """{"console": [message, ...], "console_errors": [...] (the same list), "dom": str, "screenshot": Path}."""
    url = Path(html_path).resolve().as_uri()
    dumped = _chromium(url, "--dump-dom", timeout=timeout)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    console = [m.group(1) for line in dumped.stderr.splitlines() if (m := CONSOLE.search(line))]
    screenshot = Path(screenshot_path).resolve()
    shot = _chromium(url, f"--screenshot={screenshot}", "--window-size=1280,2400", "--hide-scrollbars",
                     timeout=timeout)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    return {"console": console, "console_errors": console, "dom": dumped.stdout, "screenshot": screenshot}
