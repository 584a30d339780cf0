"""A full disk, for real: the daemon's state directory on a small tmpfs in a mount namespace of its own.

The tmpfs lives as long as a sleeping holder process; the daemon joins its mount namespace with
nsenter, so it can be killed and restarted on the same small filesystem, and the test reads the
store and grows the filesystem through the holder (``/proc/<pid>/root``, ``nsenter``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from helpers import jpeg, metrics, publish_examples, wait_for

DISK_MB = 8
FLOOR_MB = 1
READ_IDS = """
import pathlib, sqlite3, sys
path = pathlib.Path(sys.argv[1])
if path.exists():
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    print("\\n".join(row[0] for row in db.execute("SELECT example_id FROM examples ORDER BY seq")))
"""


class SmallDisk:
    def __init__(self, holder: subprocess.Popen, mountpoint: Path):
        self.holder = holder
        self.mountpoint = mountpoint
        self.enter = ["nsenter", "-t", str(holder.pid), "-m", "--"]

    def stored_ids(self) -> list[str]:
        """The store's example ids, read inside the namespace (SQLite resolves /proc/<pid>/root to the host's /)."""
        out = subprocess.run(
            [*self.enter, sys.executable, "-c", READ_IDS, str(self.mountpoint / "examples.db")],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    def resize(self, size_mb: int) -> None:
        subprocess.run([*self.enter, "mount", "-o", f"remount,size={size_mb}m", str(self.mountpoint)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    script = 'mount -t tmpfs -o size="$1"m sprout-test "$2" && echo mounted && exec sleep 600'
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(DISK_MB), str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stderr is not None  # both piped
    if holder.stdout.readline().strip() != "mounted":
        holder.wait(5)
        pytest.skip(
            f"cannot mount a tmpfs in a mount namespace of its own (root or CAP_SYS_ADMIN needed): "
            f"{holder.stderr.read().strip()}"
        )
    yield SmallDisk(holder, state)
    holder.kill()
    holder.wait()


def publish_photos(url: str, ids: list[str]) -> None:
    """13 KB JPEGs: enough of them fill the small disk."""
    labels = [("rust", "blight", "healthy")[i % 3] for i in range(len(ids))]
    photos = (jpeg(zlib.crc32(example_id.encode()), size=128, quality=85) for example_id in ids)
    publish_examples(url, "leaves", ids, labels, images=photos)


def test_a_full_disk_pauses_intake_unacked_and_it_resumes_when_space_returns(
    broker,
    daemon_factory,
    small_disk,
    systemd,
):
    env = {"SPROUT_STORE__MIN_FREE_MB": str(FLOOR_MB), **systemd.env(watchdog_s=1.0)}
    d = daemon_factory(broker.url, state=small_disk.mountpoint, env=env, prefix=small_disk.enter).start()
    ids = [f"photo-{i:04d}" for i in range(600)]  # about 9 MB of store pages: more than the 8 MB disk holds
    publish_photos(broker.url, ids)

    wait_for(lambda: "intake paused, disk full" in d.log(), 60, f"intake to pause (log: {d.log_path})")
    paused = time.monotonic()
    held = len(small_disk.stored_ids())
    assert 0 < held < len(ids)
    log = d.log()
    assert f"{small_disk.mountpoint} has" in log and f"below store.min_free_mb = {FLOOR_MB} MB" in log
    assert "Free space under" in log and "store.max_mb" in log
    assert log.count("intake paused, disk full") == 1  # one clear error, not one per retry
    time.sleep(2.5)  # more than the watchdog interval: waiting for space is not a hang
    assert d.proc.poll() is None
    assert len(small_disk.stored_ids()) == held  # nothing committed, so nothing acked
    code, health = d.health()
    assert code == 503 and health["disk"] is False and health["intake"] is False
    assert metrics(d.http_port)[("sprout_store_disk_full", ())] == 1.0
    watchdog = systemd.times("WATCHDOG", since=paused)
    assert (
        watchdog and max(b - a for a, b in zip([paused, *watchdog], [*watchdog, time.monotonic()], strict=True)) < 1.0
    )
    assert any("DISK FULL: intake paused" in s for s in systemd.statuses(since=paused))

    # Killed while paused: what it received and did not ack is only in the broker's session now.
    d.kill()
    d.start(wait_ready=False)  # still full: it starts, and pauses again
    wait_for(lambda: d.log().count("intake paused, disk full") == 2, 60, "the restarted daemon to pause")
    # The broker redelivers in batches of its own timing: a first batch smaller than the one that paused may
    # still fit above the floor. Paused again, it holds what it held or a little more, never all.
    again = len(small_disk.stored_ids())
    assert d.proc.poll() is None and held <= again < len(ids)
    time.sleep(1.5)
    assert len(small_disk.stored_ids()) == again  # paused: nothing more committed

    small_disk.resize(64)
    wait_for(lambda: len(small_disk.stored_ids()) == len(ids), 60, "every example once space returned", 0.5)
    stored = small_disk.stored_ids()
    assert sorted(stored) == ids  # each exactly once: none lost with the killed daemon, none twice
    assert "intake resumed:" in d.log()
    wait_for(lambda: d.health()[0] == 200, 10, "/healthz to recover")
    assert metrics(d.http_port)[("sprout_store_disk_full", ())] == 0.0
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0


STORE_ON_A_FULL_DISK = """
import os, subprocess, sys
from pathlib import Path
from daemon.store.errors import is_disk_full
from daemon.store.examples import Store
from daemon.ingest.wire import Example

state = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "sprout-test", str(state)], check=True)
store = Store(state / "examples.db")
batch = [Example(f"id-{i}", "rust", "train", "image/jpeg", 8, 8, os.urandom(20_000), 1.0) for i in range(200)]
try:
    store.commit(batch)
except Exception as err:
    print("refused:", type(err).__name__, err, "disk full:", is_disk_full(err))
print("stored before:", store.stats()["total"])
subprocess.run(["mount", "-o", "remount,size=64m", str(state)], check=True)
print("stored after:", store.commit(batch).stored)
"""


def test_sqlite_says_disk_full_nothing_is_stored_and_the_same_commit_succeeds_later(tmp_path: Path):
    """The other way a full disk shows: no floor (min_free_mb = 0) and SQLite runs out of room mid-commit."""
    state = tmp_path / "state"
    state.mkdir()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", STORE_ON_A_FULL_DISK, str(state)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if "mount:" in out.stderr and "refused" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace of its own: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert "refused: OperationalError database or disk is full disk full: True" in out.stdout
    assert "stored before: 0" in out.stdout and "stored after: 200" in out.stdout
