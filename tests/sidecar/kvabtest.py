"""Helpers for the `kvab serve` end-to-end tests beyond the local stack's: promtool."""

import subprocess

from kvablocal.net import free_port, wait_until  # noqa: F401  (re-exported for the test modules)


def promtool_check(promtool: str, text: str) -> None:
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (
        f"promtool check metrics failed ({result.returncode}):\n{result.stdout.decode()}"
        f"{result.stderr.decode()}\n--- input ---\n{text}"
    )
