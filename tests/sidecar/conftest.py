"""End-to-end fixtures for `kvab serve`: the real binary, real HTTP on 127.0.0.1, real promtool.

Environment:
  KVAB_BIN               use this kvab binary instead of building target/debug/kvab with cargo
  KVAB_SKIP_PROMTOOL=1   skip (instead of fail) the promtool checks when promtool is not installed
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# This directory (for kvabtest) and tests/ (for fakekube) on sys.path.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from kvablocal.sidecar import REPO, Sidecar  # noqa: E402


@pytest.fixture(scope="session")
def kvab_bin() -> str:
    explicit = os.environ.get("KVAB_BIN")
    if explicit:
        assert Path(explicit).is_file(), f"KVAB_BIN={explicit} does not exist"
        return explicit
    # Build (incrementally) so the tests never run a stale binary.
    subprocess.run(["cargo", "build", "--quiet", "-p", "kvab", "--bin", "kvab"], cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "kvab")


@pytest.fixture
def sidecar(kvab_bin, tmp_path):
    """Factory: sidecar(config_text, env=None) starts `kvab serve` and waits for /healthz."""
    started: list[Sidecar] = []

    def start(config: str, env: dict | None = None, wait: bool = True) -> Sidecar:
        s = Sidecar(config, workdir=tmp_path, env=env, binary=kvab_bin)
        started.append(s)
        return s.start(wait=wait)

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("KVAB_SKIP_PROMTOOL") == "1":
        pytest.skip("promtool not installed and KVAB_SKIP_PROMTOOL=1")
    pytest.fail("promtool not found: install the Debian package (apt-get install -y prometheus), "
                "or set KVAB_SKIP_PROMTOOL=1 to skip these checks")
