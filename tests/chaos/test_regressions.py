"""What the chaos runs found in the daemon, each kept as a test of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for
from learning_helpers import stream

from daemon.common.settings import ExportSettings, ModelSettings, Settings, TrainingSettings
from daemon.export.job import ExportJob
from daemon.export.schedule import Exporting
from daemon.learning.training import Training
from daemon.registry.signing import Signer
from daemon.registry.versions import Registry, registry_root
from daemon.store.examples import Store
from daemon.tools.feeder import Publisher

from .feeder import example
from .harness import DAEMON_ENV, MODEL
from .watch import Watch, kill_when_created

REPO = Path(__file__).resolve().parents[2]
# One publish in a process of its own, so that it can be killed at an exact step.
PUBLISH_ONE = """
import json, os, sys
from pathlib import Path
from daemon.registry.versions import Registry
from daemon.registry.signing import Signer
root, model, key, fields = sys.argv[1:]
Registry(Path(root), model, Signer.load(Path(key))).publish(os.urandom(2000), json.loads(fields))
"""
FIELDS = {
    "base": "tiny",
    "labels": ["healthy", "rust"],
    "quantization": "int8",
    "metrics": {},
    "input": {"shape": [1, 32, 32, 3], "layout": "NHWC", "dtype": "uint8", "range": [0, 255]},
    "runtimes_verified": [{"name": "ai-edge-litert", "version": "2.3.0"}],
}

VERSION_FOLDER_TEMPORARY = re.compile(r"^\.tmp-\d+-\d+$")


@pytest.mark.slow
def test_an_export_killed_mid_publish_is_redone_at_the_next_start_without_new_examples(broker, daemon_factory):
    # Found by the chaos harness: the export thread took "already exported" from the checkpoint, so a
    # publish cut short by a kill was not redone until more examples arrived, and the half-built version
    # folder stayed in the registry until then.
    env = {**DAEMON_ENV, "SPROUT_EXPORT__EVERY_EXAMPLES": "100", "SPROUT_EXPORT__EVERY_SECONDS": "3600"}
    d = daemon_factory(broker.url, env=env).start()
    with Publisher(broker.url) as pub:
        for n in range(150):
            image, label = example(f"redo-{n}", n)
            pub.publish(f"sprout/{MODEL}/examples", image, label, "image/jpeg", f"redo-{n}")
        assert pub.wait_all_acked(30)
    folder = registry_root(d.state) / MODEL
    wait_for(folder.exists, 60, "the registry folder")
    killed_at = kill_when_created(d.proc.pid, [folder], VERSION_FOLDER_TEMPORARY.match, 90)
    assert killed_at, f"no publish began (log: {d.log()[-2000:]})"
    d.proc.wait(10)
    registry = Registry.open_readonly(registry_root(d.state), MODEL)
    assert registry.latest() is None and (folder / killed_at).exists(), "the kill landed after the publish"
    d.start()  # no new examples from here on
    assert not (folder / killed_at).exists(), "the killed publish's temporary folder outlived the restart"
    manifest = wait_for(registry.latest, 60, "the killed export to be redone")
    assert manifest["version"] == 1
    assert d.stop() == 0


def test_the_learner_goes_on_learning_beside_an_export(tmp_path):
    # Found by the chaos harness: while torch.export traces, torch.compiler.is_exporting() is true in every
    # thread, and the learner's Optimizer.zero_grad then edited torch.fx's global trace metadata beside the
    # trace: the learner thread died with KeyError: 'custom' and the daemon exited 70. Exports now run in
    # a process of their own (daemon/export/child.py): the learner neither races with the trace nor waits.
    store = Store(tmp_path / "examples.db")
    store.commit(stream([0, 1, 2], 2000, seed=5, order="iid"))
    store.close()
    settings = Settings(
        state_dir=tmp_path,
        model=ModelSettings(name=MODEL, backbone="tiny", input_size=32),
        training=TrainingSettings(mode="head", device="cpu", batch_size=2, checkpoint_every_s=0.2),
        export=ExportSettings(quantization=["none"], runtimes=["ai-edge-litert"]),
    )
    training = Training(settings.model, settings.training, settings.state_dir)
    training.start()
    try:
        wait_for(lambda: len(training.learner.labels) == 3, 30, "the learner to see every class")
        exporting = Exporting(
            ExportJob.from_settings(settings), lambda: training.learner.trained, training.checkpoint_now
        )
        assert training.backlog > 1000, "the learner ran out of examples before the export: nothing to race"
        before = training.learner.step
        outcome = exporting.export()
        steps = training.learner.step - before
        assert outcome is not None and outcome.published is not None, outcome
        assert training.error is None, training.error
    finally:
        training.stop(time.monotonic() + 30)
        if "exporting" in locals():
            exporting.stop(time.monotonic())  # its spare process
    assert training.error is None, training.error
    assert steps > 10, f"learner steps during the export: {steps}"  # it learned on, not waiting


@pytest.mark.parametrize("step", ["latest", "versions"])
def test_a_publish_killed_after_its_version_was_complete_is_finished_by_the_next_writer(tmp_path, step):
    # Found by the chaos harness: a kill between the version folder's rename and the log (while latest or
    # versions was being written) left a complete, verified version that was never made latest, or was
    # served as latest, with no "published" event in the registry's log.
    key = tmp_path / "signing.key"
    registry = Registry(tmp_path / "registry", MODEL, Signer.load_or_create(key))
    registry.publish(os.urandom(2000), FIELDS)
    with Watch([registry.folder]) as watch:
        child = subprocess.Popen(
            [sys.executable, "-c", PUBLISH_ONE, str(registry.root), MODEL, str(key), json.dumps(FIELDS)], cwd=REPO
        )
        killed = False
        while not killed and child.poll() is None:
            for name in watch.names(1.0):
                if name.startswith(f".tmp-{step}-"):
                    os.kill(child.pid, signal.SIGKILL)
                    killed = True
        child.wait(30)
    assert killed and child.returncode == -signal.SIGKILL, "the publish ended before the kill"
    assert (registry.folder / "2" / "model.tflite").exists()  # the version itself was complete

    reopened = Registry(registry.root, MODEL, registry.signer)
    assert reopened.latest()["version"] == 2
    assert [e["version"] for e in reopened.events() if e["event"] == "published"] == [1, 2]
    assert [v["version"] for v in json.loads((reopened.folder / "versions").read_text())] == [2, 1]
    assert reopened.publish(os.urandom(2000), FIELDS)["version"] == 3
