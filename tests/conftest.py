import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))

from kvablocal.arm import ArmServer  # noqa: E402
from kvablocal.envoy import Gateway  # noqa: E402
from kvablocal.stack import Stack  # noqa: E402


@pytest.fixture(scope="module")
def arms():
    """The two local proxy arms, as the runbook names them."""
    nvlink = ArmServer("nvlink").start()
    fs = ArmServer("fs").start()
    yield {"nvlink": nvlink, "fs": fs}
    nvlink.stop()
    fs.stop()


@pytest.fixture(scope="module")
def gateways(arms, tmp_path_factory):
    """Starts Envoy + filter with a given filter configuration; all are stopped and checked at the end."""
    started = []

    def start(filter_config, **kw):
        g = Gateway(filter_config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path_factory.mktemp("envoy"), **kw)
        started.append(g)
        return g.start()

    yield start
    for g in started:
        g.stop()
    for g in started:
        g.assert_healthy()


@pytest.fixture
def stack(tmp_path):
    """Starts a full local Stack with the given knobs; stops every one at the end and checks its Envoy."""
    started = []

    def start(**knobs):
        s = Stack(workdir=tmp_path / f"stack{len(started)}", **knobs)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()
    for s in started:
        s.gateway.assert_healthy()
