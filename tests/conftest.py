"""Real parts for the tests: a Mosquitto per test on a free port, the daemon as a real process."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DaemonProcess

from daemon.tools.broker import Mosquitto

# Under CI a test skipped for a reason set-up should have removed fails the run (tests/skip_gate.py).
pytest_plugins = ["skip_gate"]


@pytest.fixture
def broker(tmp_path: Path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def daemon_factory(tmp_path: Path):
    started: list[DaemonProcess] = []

    def make(broker_url: str, **kwargs) -> DaemonProcess:
        d = DaemonProcess(broker_url, kwargs.pop("state", tmp_path / "state"), **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
