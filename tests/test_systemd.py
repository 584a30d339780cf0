"""The unit file is valid as systemd reads it, with ExecStart pointing at this checkout's sprout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "sprout.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_cleanly(tmp_path: Path):
    sprout = Path(sys.executable).parent / "sprout"
    text = UNIT.read_text()
    assert "/opt/sprout/.venv/bin/sprout" in text
    unit = tmp_path / "sprout.service"
    unit.write_text(text.replace("/opt/sprout/.venv/bin/sprout", str(sprout)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify only warns (exit 0) on unknown keys and typos: the stderr must be empty.
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_unit_does_not_restart_on_a_bad_config():
    text = UNIT.read_text()
    assert "RestartPreventExitStatus=78" in text
    assert "Restart=on-failure" in text
