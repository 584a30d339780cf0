"""``sprout cluster-demo``: the deployment past one machine (docs/scale.md), every process on this one.

It starts a private PostgreSQL server and a private Mosquitto, then, each a process of its own as on
separate hosts: two intake members (``--role intake``, one MQTT shared subscription), a trainer group of
two ranks under torchrun (``--role trainer``, DDP over gloo, or NCCL with a GPU each), two exporter
candidates (``--role exporter``, one elected) and a ``sprout serve``. It feeds Fashion-MNIST to the
broker, and a device (sprout-edge) follows the models that ``sprout serve`` hands out and the exporter
announces. It prints a progress line every few seconds and a line per published version, and ends,
once everything caught up with the feed (or after ``--max-seconds``), with the device's top-1 on photos
the cluster never saw. Every process's log is in STATE/logs/; the state folder the trainers, the
exporters and the server share is STATE/shared. Exit 0 when the device holds a verified model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.common.settings import Settings
from daemon.registry.signing import Signer
from daemon.registry.versions import Registry, RegistryError, registry_root
from daemon.service.status import pct
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader, stats
from daemon.tools.broker import Mosquitto, end_process, free_port
from daemon.tools.demo import DemoFeed, Terminal
from daemon.tools.demo_device import DemoDevice, device_summary
from daemon.tools.postgres import PrivatePostgres
from edge.atomic import write_atomic

PROGRESS_EVERY_S = 5.0
START_BOUND_S = 300.0  # each process's start: importing torch, loading the backbone, joining the group


@dataclass
class Process:
    """One of the cluster's processes, its log in STATE/logs/<name>.log."""

    name: str
    args: list[str]
    log: Path
    http: str  # HOST:PORT of its /healthz
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited with {code}: see {self.log}")
        try:
            with urllib.request.urlopen(f"http://{self.http}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        end_process(self.proc, signal.SIGTERM, 60.0)
        return None if self.proc is None else self.proc.returncode


def run_cluster_demo(args: Any) -> int:
    terminal = Terminal()
    root = Path(args.state or "var-cluster").absolute()
    shared = root / "shared"
    logs = root / "logs"
    # Afresh every time: the database is new each run, and a checkpoint past its examples would skip them.
    for folder in (shared, logs, root / "intake-1", root / "intake-2", root / "broker"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    terminal.say(f"cluster: starting afresh in {root}")
    # PostgreSQL's data in a folder of its own that its user can reach (not under a private home).
    pg_dir = Path(tempfile.mkdtemp(prefix="sprout-cluster-postgres-"))
    postgres = PrivatePostgres(pg_dir).start()
    broker = Mosquitto(root / "broker").start()
    processes: list[Process] = []
    device: DemoDevice | None = None
    try:
        store_url = postgres.create_database("sprout")
        terminal.say(
            f"cluster: PostgreSQL at {store_url} (photos in {root / 'photos'}), Mosquitto at {broker.url}; "
            f"logs in {logs}"
        )
        env = {
            **os.environ,
            "SPROUT_STORE__URL": store_url,
            # The photos as files in a folder every member reaches (shared storage across machines).
            "SPROUT_STORE__BLOB_DIR": str(root / "photos"),
            "SPROUT_MQTT__BROKER": broker.url,
            "SPROUT_LOGGING__PROGRESS_EVERY_S": "3600",
            # As `sprout demo`: a model every 1,000 examples learned, and what is left 15 s after the feed.
            "SPROUT_EXPORT__EVERY_EXAMPLES": "1000",
            "SPROUT_EXPORT__EVERY_SECONDS": "15",
            # The exporters export what rank 0 last checkpointed: this bounds how stale a published model is.
            "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "10",
            # torchrun: a store of its own for each attempt, or a restart may not reconnect (docs/scale.md).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        env.pop("SPROUT_ROLE", None)
        settings = Settings.load(None, {"state_dir": shared, "mqtt": {"broker": broker.url}})
        # The key pair now: the device needs the public key from the start.
        Signer.load_or_create(settings.signing.resolved_key_file(shared))
        sprout = [sys.executable, "-m", "daemon.cli"]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        # The store's schema once, before the members start: then none of them waits on another's migration.
        subprocess.run(
            [*sprout, "store", "migrate", "--state", str(root / "intake-1")],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )

        def add(name: str, cmd: list[str]) -> Process:
            address = f"127.0.0.1:{free_port()}"  # its /healthz (a trainer group's: rank 0's)
            p = Process(name, [*cmd, "--http", address], logs / f"{name}.log", address).start(env)
            processes.append(p)
            return p

        for i in (1, 2):  # one host each, in a real deployment: a client id each here (one per host by default)
            env["SPROUT_MQTT__CLIENT_ID"] = f"sprout-cluster-intake-{i}"
            add(f"intake-{i}", [*sprout, "run", "--role", "intake", "--state", str(root / f"intake-{i}")])
        env.pop("SPROUT_MQTT__CLIENT_ID")
        trainer = [torchrun, "--standalone", "--nproc-per-node=2", "--max-restarts=3", "-m", "daemon.cli", "run"]
        add("trainers", [*trainer, "--role", "trainer", "--state", str(shared)])
        for i in (1, 2):
            env["SPROUT_MQTT__CLIENT_ID"] = f"sprout-cluster-exporter-{i}"
            add(f"exporter-{i}", [*sprout, "run", "--role", "exporter", "--state", str(shared)])
        env.pop("SPROUT_MQTT__CLIENT_ID")
        serve = add("serve", [*sprout, "serve", "--state", str(shared)])
        _wait_healthy(processes)
        terminal.say(
            "cluster: intake x2, trainer group of 2 ranks (torchrun), exporter x2 (one elected), sprout serve at "
            f"http://{serve.http}/ : all healthy"
        )
        device = DemoDevice(settings, serve.http, terminal.say)
        device.start()
        feeder = DemoFeed(
            broker.url, settings.mqtt.examples_topic(settings.model.name), args.limit, args.rate, args.order
        )
        feeder.start()
        outcome = _follow(args, settings, store_url, processes, feeder, terminal)
        summary = {**outcome, "device": device_summary(device)}
        device = None
        write_atomic(root / "cluster-summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return _report(summary, terminal, root)
    finally:
        if device is not None:
            device.stop()
        for p in reversed(processes):
            p.stop()
        broker.stop()
        postgres.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


def _wait_healthy(processes: list[Process]) -> None:
    deadline = time.monotonic() + START_BOUND_S
    waiting = list(processes)
    while waiting:
        waiting = [p for p in waiting if not p.healthy()]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {START_BOUND_S:.0f}s: {', '.join(p.name for p in waiting)}")
        time.sleep(0.5)


def _follow(
    args: Any, settings: Settings, store_url: str, processes: list[Process], feeder: DemoFeed, terminal: Terminal
) -> dict:
    """Progress until the feed is stored, learned and published, or ``--max-seconds`` are up."""
    from daemon.export.election import CheckpointProgress

    started = time.monotonic()
    learned = CheckpointProgress(settings.state_dir / "checkpoints")
    reader = open_reader(StoreLocation.of(settings.state_dir, store_url), "sprout-cluster-demo")
    announced = 0
    try:
        while True:
            time.sleep(PROGRESS_EVERY_S)
            for p in processes:
                p.healthy()  # a process that died ends the demo with its log's name
            latest = _latest(settings)
            if latest is not None and latest["version"] != announced:
                announced = latest["version"]
                m = latest["metrics"]
                on = ", ".join(f"{runtime} {pct(top1)}" for runtime, top1 in m["holdout_top1"].items())
                terminal.say(
                    f"cluster: version {announced} published by the elected exporter ({latest['quantization']}, "
                    f"{m['examples_trained']} examples learned), holdout top-1 {on}"
                )
            totals = stats(reader)["total"]
            stored = totals if isinstance(totals, int) else 0
            done_learning = learned()
            r = feeder.report
            terminal.say(
                f"cluster: fed {r.acked}/{args.limit} | stored {stored} (2 intake members) | learned "
                f"{done_learning} (2 ranks) | model v{announced or '-'}"
            )
            trained_published = latest["metrics"]["examples_trained"] if latest else -1
            caught_up = (
                feeder.done.is_set()
                and stored >= r.acked
                and learned.high_water_mark >= _store_high_water_mark(reader)
                and trained_published >= done_learning > 0
            )
            if caught_up or time.monotonic() - started > args.max_seconds:
                return {
                    "feed": r.as_dict(),
                    "stored": stored,
                    "learned": done_learning,
                    "model_version": announced,
                    "seconds": round(time.monotonic() - started, 1),
                    "caught_up": caught_up,
                }
    finally:
        reader.close()


def _store_high_water_mark(db: Any) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(seq), 0) FROM examples"))


def _latest(settings: Settings) -> dict | None:
    try:
        return Registry.open_readonly(registry_root(settings.state_dir), settings.model.name).latest()
    except (RegistryError, OSError):
        return None


def _report(summary: dict, terminal: Terminal, root: Path) -> int:
    device = summary["device"]
    if not device.get("version"):
        terminal.say(f"cluster: FAILED: the device holds no model ({device.get('reason', 'no version')})")
        return 1
    if not summary["caught_up"]:
        terminal.say("cluster: the time was up before the last examples were published (the summary says where)")
    print(
        f"cluster: {summary['stored']} examples stored by 2 intake members, {summary['learned']} learned by a "
        f"trainer group of 2 ranks, version {summary['model_version']} published by the elected exporter "
        f"in {summary['seconds']:.0f} s",
        flush=True,
    )
    print(
        f"cluster: the device installed version {device['version']} ({device['quantization']}) from sprout serve and "
        f"scored {pct(device['top1_on_device'])} top-1 on {device['test_photos']} photos the cluster never saw "
        f"(summary: {root / 'cluster-summary.json'})",
        flush=True,
    )
    return 0
