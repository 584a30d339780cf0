"""The daemon's export thread runs each export in a child process: outcomes, failures and stops come back whole."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_for
from learning_helpers import learn_all, make_learner, stream

from daemon.common.settings import ExportSettings, ModelSettings, Settings, TrainingSettings
from daemon.export.child import TMP_PREFIX, ExportChild, ExportStopped, remove_orphaned_temporaries
from daemon.export.job import ExportJob
from daemon.export.outcome import ExportOutcome
from daemon.export.schedule import Exporting
from daemon.learning import checkpoint


def settings_for(state: Path) -> Settings:
    return Settings(
        state_dir=state,
        model=ModelSettings(backbone="tiny", input_size=32),
        training=TrainingSettings(mode="head", device="cpu"),
        export=ExportSettings(quantization=["none"], runtimes=["ai-edge-litert"], every_seconds=120),
    )


def learned(state: Path) -> int:
    learner, reader = make_learner(state, stream([0, 1], 20, seed=41, order="iid"))
    learn_all(learner, reader)
    checkpoint.save(state / "checkpoints", learner.state())
    return learner.trained


def test_an_export_in_a_child_publishes_and_reports_back(tmp_path: Path, caplog):
    trained = learned(tmp_path)
    exporting = Exporting(ExportJob.from_settings(settings_for(tmp_path)), lambda: trained, lambda: None)
    try:
        with caplog.at_level(logging.INFO):
            outcome = exporting.export()
    finally:
        exporting.stop(time.monotonic())
    # Every log record of the child comes back through its stderr and is logged again here, in order: none is
    # lost to another reader of the pipe (Popen.communicate once read it too, and kept what it got).
    child_lines = [r.getMessage() for r in caplog.records if r.name in ("sprout.export", "sprout.registry")]
    published = [i for i, m in enumerate(child_lines) if m.startswith("published version 1 (")]
    registry = [
        i
        for i, m in enumerate(child_lines)
        if m.startswith("published leaves version 1") or m.startswith("published plant-disease version 1")
    ]
    took = [i for i, m in enumerate(child_lines) if m.startswith("export took")]
    assert registry and published and took and registry[0] < published[0] < took[0], child_lines
    assert outcome is not None and outcome.published is not None and outcome.published["version"] == 1, outcome
    assert outcome.published["quantization"] == "none" and outcome.metrics["examples_trained"] == trained
    assert (exporting.published, exporting.exports, exporting.failed) == (1, 1, 0)
    assert exporting.exported_learned == trained


def test_an_export_that_raises_is_logged_counted_and_retried_later_without_killing_the_thread(tmp_path: Path, caplog):
    trained = learned(tmp_path)
    (tmp_path / "checkpoints" / checkpoint.CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    exporting = Exporting(ExportJob.from_settings(settings_for(tmp_path)), lambda: trained, lambda: None)
    with caplog.at_level(logging.ERROR, "sprout.export"):
        assert exporting.export() is None
    exporting.stop(time.monotonic())
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
            child.run(ExportJob.from_settings(settings_for(tmp_path)))
        except BaseException as err:
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
        child.run(ExportJob.from_settings(settings_for(tmp_path)))


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


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _waiting_on_stdin(pid: int) -> bool:
    """Asleep with torch loaded: its imports are done and it reads the settings that never came yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state == "S" and "libtorch_cpu" in _maps(pid)


def test_the_next_exports_process_waits_with_its_imports_done_and_the_next_export_uses_it(tmp_path: Path, monkeypatch):
    learned(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    settings = settings_for(tmp_path)
    child = ExportChild()
    try:
        assert child.spare_pid is None  # the first export after a start pays the imports
        first = child.run(ExportJob.from_settings(settings))
        assert isinstance(first, ExportOutcome) and first.metrics["conversion"] == "full"
        spare = child.spare_pid
        assert spare is not None and child.pid is None
        wait_for(lambda: _waiting_on_stdin(spare), 60, "the spare to finish its imports and wait")
        assert len(list(tmp.iterdir())) == 1  # the spare's folder only: the converting export's went with it
        second = child.run(ExportJob.from_settings(settings))  # a second version, published by the spare
        assert isinstance(second, ExportOutcome) and second.published["version"] == 2, second
        # It only wrote the new head into the kept conversion: it stays, and serves the next export too.
        assert second.metrics["conversion"] == "patched" and child.spare_pid == spare
        wait_for(lambda: _waiting_on_stdin(spare), 60, "the process to wait for its next export")
        settings.export.full_conversion_every = 1  # the next export converts in full, in that same process
        third = child.run(ExportJob.from_settings(settings))
        assert isinstance(third, ExportOutcome) and third.published["version"] == 3, third
        assert third.metrics["conversion"] == "full"
        assert not Path(f"/proc/{spare}").exists()  # it converted: it ended and was reaped
        assert child.spare_pid not in (None, spare)  # a fresh process waits for the next
    finally:
        child.stop()
    assert child.spare_pid is None and list(tmp.iterdir()) == []  # the stop discards the spare and its folder


def test_without_prewarming_no_process_waits_between_exports(tmp_path: Path):
    learned(tmp_path)
    settings = settings_for(tmp_path)
    settings.export.prewarm_process = False
    child = ExportChild()
    try:
        assert isinstance(child.run(ExportJob.from_settings(settings)), ExportOutcome)
        assert child.spare_pid is None
    finally:
        child.stop()


def test_a_spare_killed_while_it_waits_is_replaced_by_a_fresh_process(tmp_path: Path, caplog):
    learned(tmp_path)
    settings = settings_for(tmp_path)
    child = ExportChild()
    try:
        child.run(ExportJob.from_settings(settings))
        spare = child.spare_pid
        assert spare is not None, "no spare process waiting"
        os.kill(spare, signal.SIGKILL)
        wait_for(lambda: child.spare_pid is None, 10, "the spare to be seen dead")
        with caplog.at_level(logging.WARNING, "sprout.export"):
            assert isinstance(child.run(ExportJob.from_settings(settings)), ExportOutcome)
        assert "the waiting export process ended (exit code -9); starting another" in caplog.text
    finally:
        child.stop()
