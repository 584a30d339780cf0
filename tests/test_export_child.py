"""The daemon's export thread runs each export in a child process: outcomes, failures and stops come back whole."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import pytest

from daemon import checkpoint
from daemon.export_child import TMP_PREFIX, ExportChild, ExportStopped, remove_orphaned_temporaries
from daemon.exporting import Exporting
from daemon.settings import ExportSettings, ModelSettings, Settings, TrainingSettings
from helpers import wait_for
from test_learner import learn_all, make_learner, stream


def settings_for(state: Path) -> Settings:
    return Settings(state_dir=state, model=ModelSettings(backbone="tiny", input_size=32),
                    training=TrainingSettings(mode="head", device="cpu"),
                    export=ExportSettings(quantization=["none"], runtimes=["ai-edge-litert"], every_seconds=120))


def learned(state: Path) -> int:
    learner, reader = make_learner(state, stream([0, 1], 20, seed=41, order="iid"))
    learn_all(learner, reader)
    checkpoint.save(state / "checkpoints", learner.state())
    return learner.trained


def test_an_export_in_a_child_publishes_and_reports_back(tmp_path: Path):
    trained = learned(tmp_path)
    exporting = Exporting(settings_for(tmp_path), lambda: trained, lambda: None)
    outcome = exporting.export()
    assert outcome is not None and outcome.published["version"] == 1, outcome
    assert outcome.published["quantization"] == "none" and outcome.metrics["examples_trained"] == trained
    assert (exporting.published, exporting.exports, exporting.failed) == (1, 1, 0)
    assert exporting.exported_learned == trained


def test_an_export_that_raises_is_logged_counted_and_retried_later_without_killing_the_thread(tmp_path: Path, caplog):
    trained = learned(tmp_path)
    (tmp_path / "checkpoints" / checkpoint.CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    exporting = Exporting(settings_for(tmp_path), lambda: trained, lambda: None)
    with caplog.at_level(logging.ERROR, "sprout.export"):
        assert exporting.export() is None
    assert exporting.failed == 1 and exporting.exports == 0
    assert "export failed: the export process ended without an outcome (exit code 70" in caplog.text
    assert not exporting.due()  # not again at once: after export.every_seconds


def test_a_stop_kills_the_running_child_and_removes_its_temporaries(tmp_path: Path, monkeypatch):
    learned(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    child = ExportChild()
    result: list[BaseException] = []

    def run() -> None:
        try:
            child.run(settings_for(tmp_path))
        except BaseException as err:  # noqa: BLE001 - what the test inspects
            result.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    pid = wait_for(lambda: child.pid, 30, "the export process to start", 0.01)
    assert child.stop()
    thread.join(30)
    assert isinstance(result[0], ExportStopped)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the export process to be gone")
    assert list(tmp.iterdir()) == []
    with pytest.raises(ExportStopped):  # a stopped handle starts no more
        child.run(settings_for(tmp_path))


def test_temporaries_of_a_daemon_that_is_gone_are_removed_and_a_living_ones_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    gone = tmp_path / f"{TMP_PREFIX}{2**22 + 12345}-abc"  # above pid_max's default: no such process
    mine = tmp_path / f"{TMP_PREFIX}{os.getpid()}-def"
    parent = tmp_path / f"{TMP_PREFIX}{os.getppid()}-ghi"
    for folder in (gone, mine, parent):
        folder.mkdir()
        (folder / "model.tflite").write_bytes(b"x")
    assert remove_orphaned_temporaries() == 1
    assert not gone.exists() and mine.exists() and parent.exists()
