"""One exporter at a time (`sprout run --role exporter`), and `sprout serve` over the registry it publishes.

The leases on their real engines: flock on a file, a PostgreSQL session advisory lock; then two candidate
processes on one state folder, the elected one SIGKILLed, the other taking over and publishing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import SPROUT, DaemonProcess, latest_published, wait_for
from learning_helpers import learn_all, learned_state, make_learner, stream

from daemon.export.election import FileLease, PostgresLease
from daemon.learning import checkpoint
from daemon.registry.versions import Registry, registry_root
from daemon.store.database import connect
from daemon.tools.broker import free_port

MODEL = "plant-disease"  # learned_state's


def test_a_file_lease_has_one_holder_and_is_freed_when_its_process_dies(tmp_path: Path):
    path = tmp_path / "export.lock"
    first, second = FileLease(path), FileLease(path)
    assert first.try_acquire() and first.held()
    assert not second.try_acquire() and not second.held()
    first.release()
    assert second.try_acquire()
    second.release()
    # Held by another process, which is then SIGKILLed: the kernel frees it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time, pathlib; from daemon.export.election import FileLease; "
            f"assert FileLease(pathlib.Path({str(path)!r})).try_acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not FileLease(path).try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        taker = FileLease(path)
        assert taker.try_acquire()
        taker.release()
    finally:
        holder.kill()


def test_a_postgres_lease_has_one_holder_per_model_and_ends_with_its_session(postgres_store):
    first, second = PostgresLease(postgres_store, "leaves"), PostgresLease(postgres_store, "leaves")
    other_model = PostgresLease(postgres_store, "hb")
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire()
        assert other_model.try_acquire()  # one exporter per model, not per database
        # The holder's session ends (a crash, a cut connection): the server frees the lock, and the holder
        # sees it has lost it at its next check.
        admin = connect(postgres_store)
        ended = admin.scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = ?",
            ("sprout-leaves-exporter",),
        )
        admin.close()
        assert ended == 1
        wait_for(lambda: not first.held(), 10, "the holder to see its session gone")
        assert wait_for(second.try_acquire, 10, "the second candidate to take the lease")
    finally:
        for lease in (first, second, other_model):
            lease.release()


def exporter(broker_url: str, state: Path, name: str) -> DaemonProcess:
    """A candidate; two on one host have a client id each (as two intake members do)."""
    d = DaemonProcess(
        broker_url,
        state,
        model=MODEL,
        env={
            "SPROUT_ROLE": "exporter",
            "SPROUT_MQTT__CLIENT_ID": f"sprout-{MODEL}-exporter-{name}",
            "SPROUT_EXPORT__EVERY_EXAMPLES": "10",
            "SPROUT_EXPORT__EVERY_SECONDS": "3600",
            "SPROUT_EXPORT__QUANTIZATION": '["int8"]',
        },
    )
    d.log_path = state.parent / f"exporter-{name}.log"
    return d


def test_two_exporter_candidates_publish_one_at_a_time_and_the_spare_takes_over(tmp_path: Path, broker):
    state = learned_state(tmp_path / "state")
    first = exporter(broker.url, state, "a").start()
    time.sleep(1)  # the first candidate takes the lease first
    second = exporter(broker.url, state, "b").start()
    try:
        wait_for(lambda: latest_published(state, MODEL), 120, "version 1")
        assert "elected" in first.log() and "elected" not in second.log()
        assert "export candidate" in second.log()
        # Both serve downloads and say they are healthy, elected or not.
        for d in (first, second):
            status, parts = d.health()
            assert status == 200 and parts["exporter"] is True, parts
        first.kill()
        wait_for(lambda: "elected" in second.log(), 20, "the spare to take the lease")
        assert Registry.open_readonly(registry_root(state), MODEL).versions() == [1]
        # The trainers checkpoint more: the new exporter publishes it.
        learner, reader = make_learner(state, stream([0, 1, 2], 20, seed=44, order="iid"))
        learn_all(learner, reader)
        checkpoint.save(state / "checkpoints", learner.state())
        wait_for(lambda: (m := latest_published(state, MODEL)) and m["version"] == 2, 120, "version 2")
        assert second.log().count("exporting:") == 1
        served(state)
    finally:
        second.stop()


def served(state: Path) -> None:
    """`sprout serve` on the registry answers as the daemon's API does, and stops cleanly on SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        [*SPROUT, "serve", "--state", str(state), "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def get(path: str) -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.loads(r.read())

        wait_for(lambda: _answers(get, "/healthz"), 30, "sprout serve to listen")
        assert get("/healthz") == {"registry": True}
        latest = get(f"/v1/models/{MODEL}/latest")
        assert latest == latest_published(state, MODEL)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{MODEL}/versions/2/model.tflite") as r:
            assert r.read() == Registry.open_readonly(registry_root(state), MODEL).model_path(2).read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out, out


def _answers(get, path: str) -> bool:
    try:
        get(path)
        return True
    except OSError:
        return False
