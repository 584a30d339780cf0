"""Ingest throughput: examples per second from MQTT publish to committed-and-acked.

The real daemon (a ``sprout run`` process) against a private Mosquitto on
this machine, fed 224x224 JPEGs of about 30 KB (Fashion-MNIST upscaled, with
sensor-like noise so that they compress like photos). Two figures, each the
median of repeats:

- live: a publisher process sends as fast as the broker acks while the daemon
  ingests; the clock runs from the first publish to the last example committed;
- backlog: the examples wait in the broker's session while the daemon is down;
  the clock runs from the daemon's start to the last example committed (the
  catch-up rate after an outage).

``--store both`` runs every repeat on the SQLite store and on a PostgreSQL store (a private server on
this machine, fsync on, a new database per run), alternating, so that the two are compared in one sitting.

Usage: python bench/ingest.py [--examples 10000] [--repeats 3] [--store sqlite|postgresql|both] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import wait_subscribed  # noqa: E402
from loadgen import LoadGenerator  # noqa: E402

from daemon.store.database import Database  # noqa: E402
from daemon.store.errors import StoreError, is_database_error  # noqa: E402
from daemon.store.location import StoreLocation  # noqa: E402
from daemon.store.reader import open_reader  # noqa: E402
from daemon.tools.broker import Mosquitto, free_port  # noqa: E402
from daemon.tools.datasets import fashion_mnist  # noqa: E402
from daemon.tools.feeder import Publisher  # noqa: E402
from daemon.tools.postgres import PrivatePostgres  # noqa: E402

MODEL = "bench"
TOPIC = f"sprout/{MODEL}/examples"
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def make_jpegs(count: int, target_bytes: int = 30_000, seed: int = 0) -> list[tuple[str, bytes]]:
    """(label, JPEG bytes) pairs of 224x224 RGB images near target_bytes."""
    images, labels = fashion_mnist("train")
    rng = np.random.default_rng(seed)
    out = []
    noise_sigma = 9.0
    for i in range(count):
        base = np.asarray(
            Image.fromarray(images[i]).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC), np.float32
        )
        noisy = np.clip(base + rng.normal(0, noise_sigma, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        # Steer the noise so the sizes centre on the target.
        noise_sigma *= (target_bytes / len(data)) ** 0.5
        noise_sigma = min(max(noise_sigma, 1.0), 60.0)
        out.append((LABELS[labels[i]], data))
    return out


def publish_all(
    url: str, jpegs: list[tuple[str, bytes]], n: int, prefix: str, started_at, done_at, publisher: str
) -> None:
    if publisher == "raw":
        host, port = url.removeprefix("mqtt://").split(":")
        gen = LoadGenerator(host, int(port), window=1000)
        messages = [(f"{prefix}-{i}", *jpegs[i % len(jpegs)]) for i in range(n)]
        started_at.value = time.time()
        gen.publish_all(TOPIC, messages)
        done_at.value = time.time()
        gen.close()
        if gen.acked != n:
            raise SystemExit(f"broker acked {gen.acked} of {n} ({gen.failed} failed)")
        return
    with Publisher(url, window=1000) as pub:
        started_at.value = time.time()
        for i in range(n):
            label, data = jpegs[i % len(jpegs)]
            pub.publish(TOPIC, data, label, "image/jpeg", f"{prefix}-{i}")
        pub.wait_all_acked(120)
        done_at.value = time.time()
        if pub.report.acked != n:
            raise SystemExit(f"broker acked {pub.report.acked} of {n}: {pub.report.as_dict()}")


class Members:
    """Several `--role intake` daemons as one: started, stopped and waited for together."""

    def __init__(self, daemons: list[Daemon]):
        self.daemons = daemons
        self.proc: subprocess.Popen[bytes] | None = None  # no single process to profile

    def start(self) -> None:
        for d in self.daemons:
            d.start()

    def wait_subscribed(self, broker: Mosquitto, timeout_s: float = 30) -> None:
        for d in self.daemons:
            d.wait_subscribed(broker, timeout_s)

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def kill(self) -> None:
        for d in self.daemons:
            if d.proc and d.proc.poll() is None:
                d.proc.kill()


class StoredCount:
    """Counts examples whose id starts with prefix + '-' (a range scan of the unique index), on one reader
    connection once the store exists."""

    def __init__(self, store: StoreLocation):
        self.store = store
        self.db: Database | None = None

    def __call__(self, prefix: str) -> int:
        try:
            if self.db is None:
                self.db = open_reader(self.store)
            sql = "SELECT COUNT(*) FROM examples WHERE example_id >= ? AND example_id < ?"
            return int(self.db.scalar(sql, (f"{prefix}-", f"{prefix}.")))
        except StoreError:  # not made yet: the daemon is starting
            return 0
        except Exception as err:
            if not is_database_error(err):
                raise
            return 0

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def wait_stored(count: StoredCount, prefix: str, n: int, timeout_s: float = 300, poll_s: float = 0.01) -> float:
    """Poll until n examples are committed; returns the time they were (each commit is acked at once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if count(prefix) >= n:
            return time.time()
        time.sleep(poll_s)
    raise SystemExit(f"only {count(prefix)} of {n} stored after {timeout_s}s")


class Daemon:
    def __init__(self, url: str, state: Path, learner: bool, store: StoreLocation, member: str = ""):
        self.url, self.state, self.learner, self.store = url, state, learner, store
        self.member = member  # a name: one `--role intake` member of a group
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "SPROUT_LOGGING__LEVEL": "WARNING",
            "SPROUT_TRAINING__ENABLED": str(self.learner).lower(),
            "SPROUT_STORE__URL": self.store.postgres_url or "",
            "SPROUT_STORE__BLOB_DIR": str(self.store.blob_dir or ""),
        }
        if self.member:
            env |= {"SPROUT_ROLE": "intake", "SPROUT_MQTT__CLIENT_ID": f"{MODEL}-intake-{self.member}"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.cli",
                "run",
                "--broker",
                self.url,
                "--model",
                MODEL,
                "--state",
                str(self.state),
                "--http",
                f"127.0.0.1:{self.http_port}",
            ],
            env=env,
            cwd=ROOT,
        )

    def wait_subscribed(self, broker: Mosquitto, timeout_s: float = 30) -> None:
        if not self.member:
            wait_subscribed(broker.url, TOPIC, PROBE, timeout_s)
            return
        # A probe's PUBACK says only that some member subscribed: this one's /healthz says it did.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"intake member {self.member} did not subscribe within {timeout_s:.0f} s")

    def stop(self) -> None:
        assert self.proc is not None, "stop() before start()"
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


PROBE = b""
PROFILE = os.environ.get("SPROUT_BENCH_PROFILE")  # a path: py-spy samples the daemon during the live run


def run_once(
    jpegs, n: int, mode: str, workdir: Path, publisher: str, learner: bool, store: StoreLocation, members: int = 0
) -> dict[str, float]:
    """One timed run; ``members``: that many `--role intake` daemons on the store instead of one `sprout run`."""
    broker = Mosquitto(workdir / "broker").start()
    state = workdir / "state"
    daemon: Daemon | Members = Daemon(broker.url, state, learner, store)
    if members:
        daemon = Members([Daemon(broker.url, workdir / f"state-{i}", False, store, str(i)) for i in range(members)])
    db = StoredCount(store)
    try:
        daemon.start()
        daemon.wait_subscribed(broker)
        ctx = mp.get_context("spawn")
        started_at, done_at = ctx.Value("d", 0.0), ctx.Value("d", 0.0)
        if mode == "backlog":
            daemon.stop()
            feeder = ctx.Process(target=publish_all, args=(broker.url, jpegs, n, mode, started_at, done_at, publisher))
            feeder.start()
            feeder.join()
            daemon.start()
            # From the first example committed: the catch-up rate, without the process's start-up.
            t0 = wait_stored(db, mode, 1, poll_s=0.002)
            t1 = wait_stored(db, mode, n)
        else:
            feeder = ctx.Process(target=publish_all, args=(broker.url, jpegs, n, mode, started_at, done_at, publisher))
            feeder.start()
            if PROFILE:
                assert daemon.proc is not None, "profiling takes one daemon, not --members"
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-p",
                        str(daemon.proc.pid),
                        "-o",
                        PROFILE,
                        "-f",
                        "raw",
                        "-d",
                        "5",
                        "-r",
                        "250",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            t1 = wait_stored(db, mode, n)
            feeder.join()
            if PROFILE:
                spy.wait()
            t0 = started_at.value
        daemon.stop()
        return {
            "seconds": t1 - t0,
            "per_second": n / (t1 - t0),
            "publish_per_second": n / (done_at.value - started_at.value),
        }
    finally:
        db.close()
        if isinstance(daemon, Members):
            daemon.kill()
        elif daemon.proc and daemon.proc.poll() is None:
            daemon.proc.kill()
        broker.stop()


def main() -> None:
    global PROBE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=500, help="distinct images (ids are all distinct)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--publisher", choices=["raw", "paho"], default="raw", help="load generator (see bench/loadgen.py)")
    ap.add_argument(
        "--learner",
        choices=["on", "off"],
        default="on",
        help="on: the default daemon, learning beside intake; off: an ingest-only node",
    )
    ap.add_argument(
        "--store",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="the example store: SQLite (the default), a private PostgreSQL server, or both alternately",
    )
    ap.add_argument(
        "--members",
        default="",
        help="comma-separated intake group sizes to run on the PostgreSQL store (`sprout run --role intake` "
        "members sharing the feed), e.g. 1,2; empty: one `sprout run` per store",
    )
    ap.add_argument(
        "--photos",
        choices=["rows", "files", "both"],
        default="rows",
        help="where the photos go: rows of the store (the default), files in store.blob_dir, or both alternately",
    )
    args = ap.parse_args()
    groups = [int(m) for m in args.members.split(",") if m]
    if groups and args.store == "sqlite":
        ap.error("--members needs the PostgreSQL store: --store postgresql or both")
    jpegs = make_jpegs(args.distinct)
    PROBE = jpegs[0][1]
    sizes = [len(d) for _, d in jpegs]
    print(f"images: 224x224 JPEG, median {statistics.median(sizes) / 1000:.1f} KB, {args.examples} per run")
    stores = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    # (store, intake members): 0 members = one `sprout run`; intake groups run on PostgreSQL only.
    stores_setups = [(s, 0) for s in stores if s == "sqlite" or not groups] + [("postgresql", m) for m in groups]
    photo_kinds = ["rows", "files"] if args.photos == "both" else [args.photos]
    setups = [(s, m, p) for s, m in stores_setups for p in photo_kinds]
    server_dir = Path(tempfile.mkdtemp(prefix="sprout-bench-postgres-")) if "postgresql" in stores else None
    server = PrivatePostgres(server_dir).start() if server_dir is not None else None
    modes = ("live", "backlog")

    def key_of(mode: str, store: str, members: int, photos: str) -> str:
        if len(setups) == 1:
            return mode
        key = f"{mode}_{store}" if len(stores_setups) > 1 else mode
        key += f"-intake-x{members}" if members else ""
        return key + (f"_photos-{photos}" if len(photo_kinds) > 1 else "")

    results: dict[str, list[dict[str, float]]] = {key_of(mode, *setup): [] for setup in setups for mode in modes}
    try:
        for r in range(args.repeats):
            for store_kind, members, photos in setups:
                for mode in modes:
                    key = key_of(mode, store_kind, members, photos)
                    workdir = Path(tempfile.mkdtemp(prefix=f"sprout-bench-{mode}-"))
                    blob_dir = workdir / "photos" if photos == "files" else None
                    if server is not None and store_kind == "postgresql":
                        name = f"bench_{r}_{mode}_{members}_{photos}"
                        store = StoreLocation(postgres_url=server.create_database(name), blob_dir=blob_dir)
                    else:
                        store = StoreLocation.of(workdir / "state", "", blob_dir=blob_dir)
                    learner = args.learner == "on"
                    try:
                        res = run_once(jpegs, args.examples, mode, workdir, args.publisher, learner, store, members)
                    finally:
                        shutil.rmtree(workdir, ignore_errors=True)
                    results[key].append(res)
                    print(
                        f"  run {r + 1} {key:28s}: {res['per_second']:8.0f} examples/s ({res['seconds']:.2f} s)",
                        flush=True,
                    )
    finally:
        if server is not None and server_dir is not None:
            server.stop()
            shutil.rmtree(server_dir, ignore_errors=True)
    summary = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "image_kb_median": round(statistics.median(sizes) / 1000, 1),
        "examples_per_run": args.examples,
        "learner": args.learner,
        "store": args.store,
        "members": groups,
        "photos": args.photos,
        "repeats": args.repeats,
        **{
            f"{mode}_per_second_median": round(statistics.median(x["per_second"] for x in runs))
            for mode, runs in results.items()
        },
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
