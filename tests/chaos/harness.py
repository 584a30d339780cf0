"""The chaos run: the real daemon and a real Mosquitto under a steady feed, killed at seeded random moments.

Daemon kills (SIGKILL) land in one of four windows, drawn by the seed:
anywhere (a random moment after start), during a checkpoint write (the
instant its temporary file appears), during an export (a random moment
after "exporting:" is logged: converting, verifying or publishing), and
during a publish (the instant a registry temporary appears: the version
folder, ``latest.sig``, ``latest`` or ``versions``). A targeted window that
does not come in time while the feed still runs is a failure of the run
(nothing was tested there); once the feed has ended no checkpoint or export
is due, and a kill then counts as "anywhere". Between kills the broker is restarted
with SIGTERM or SIGKILL, on the same port and persistence folder, sometimes
while the daemon is down.

A SIGKILLed Mosquitto loses what it acknowledged since its last autosave
(docs/broker.md): that is the broker's own bound, not Sprout's, so before a
broker SIGKILL the feed pauses until no PUBACK has come for longer than two
autosave intervals (Mosquitto counts them in whole seconds).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import DaemonProcess, stored_ids, wait_for

from daemon.learning import checkpoint
from daemon.tools.broker import Mosquitto
from edge.atomic import TMP_PREFIX

from . import audit
from .feeder import Feeder
from .watch import kill_when_created

MODEL = "leaves"
# The broker settings docs/broker.md asks for (test_chaos.py holds the two to the same values).
AUTOSAVE_INTERVAL_S = 1
# Sized far past the longest outage here (a few seconds at 30 examples/s): past it Mosquitto drops the newest.
MAX_QUEUED_MESSAGES = 1_000_000

# The tiny backbone at 32 px learns, checkpoints and exports in seconds, so every window comes round often.
DAEMON_ENV = {
    "SPROUT_TRAINING__ENABLED": "true",
    "SPROUT_TRAINING__BATCH_SIZE": "8",
    "SPROUT_TRAINING__LEARNING_RATE": "0.1",
    "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "0.5",
    "SPROUT_TRAINING__HOLDOUT_EVERY_STEPS": "5",
    "SPROUT_EXPORT__EVERY_EXAMPLES": "150",
    "SPROUT_EXPORT__EVERY_SECONDS": "3",
    "SPROUT_EXPORT__VERIFY_EXAMPLES": "60",
    "SPROUT_EXPORT__CALIBRATION_EXAMPLES": "16",
    "SPROUT_REGISTRY__KEEP_VERSIONS": "5",  # retention deletes versions under the kills too
}

WINDOWS = ("anywhere", "checkpoint write", "export", "publish")
WINDOW_WEIGHTS = (0.3, 0.25, 0.2, 0.25)
_REGISTRY_TEMPORARY = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+|latest|latest\.sig|versions)-\d+$")


@dataclass
class Plan:
    kills: int
    broker_restarts: list[signal.Signals]  # in order
    seed: int
    examples: int
    rate: float  # examples per second

    @classmethod
    def from_environment(cls) -> Plan:
        """CI's short run by default; ``SPROUT_CHAOS_KILLS`` and ``SPROUT_CHAOS_SEED`` (make chaos) for the full one."""
        kills = int(os.environ.get("SPROUT_CHAOS_KILLS", "3"))
        seed = int(os.environ.get("SPROUT_CHAOS_SEED", "1127"))
        restarts = int(os.environ.get("SPROUT_CHAOS_BROKER_RESTARTS", max(1, kills // 5)))
        rate = 30.0
        # SIGKILL first: CI's one restart is the one that tests the broker's persistence settings.
        signals = [(signal.SIGKILL, signal.SIGTERM)[i % 2] for i in range(restarts)]
        # About 8 s of feed per kill, so that the feed runs through the kills.
        return cls(kills, signals, seed, int(rate * 8 * max(kills, 1)), rate)


@dataclass
class Tally:
    runs: int = 0  # daemon processes started
    kills: dict[str, int] = field(default_factory=lambda: {w: 0 for w in WINDOWS})
    missed_windows: int = 0  # targeted kills whose window did not come in time while the feed ran: a failure
    windows_after_feed: int = 0  # targeted kills drawn after the feed ended (nothing left to write): anywhere
    temporaries_left_by_kills: int = 0  # kills that left a .tmp-* behind: they landed inside a write
    broker_restarts: dict[str, int] = field(default_factory=lambda: {"SIGTERM": 0, "SIGKILL": 0})
    broker_restarts_daemon_down: int = 0
    seconds: float = 0.0

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


class Chaos:
    def __init__(self, root: Path, plan: Plan):
        """Nothing starts here: :meth:`run` starts the broker, the daemon and the feed."""
        self.root = root
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.tally = Tally()
        self.state = root / "state"
        # Temporaries outside the state folder (the export processes') go here, to be counted.
        self.tmpdir = root / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.broker = Mosquitto(
            root / "broker", autosave_interval=AUTOSAVE_INTERVAL_S, max_queued_messages=MAX_QUEUED_MESSAGES
        )
        self.daemon = DaemonProcess(
            self.broker.url, self.state, model=MODEL, env={**DAEMON_ENV, "TMPDIR": str(self.tmpdir)}
        )
        self.feeder = Feeder(self.broker.url, MODEL, plan.examples, plan.rate)
        self._log_offset = 0

    # The run.

    def run(self) -> int:
        """The chaos, then a clean stop; the daemon's exit code of that stop."""
        started = time.monotonic()
        self.broker.start()
        self.start_daemon()  # first, so that the broker holds Sprout's session before the feed starts
        self.feeder.start()
        restart_at = dict(
            zip(
                self.rng.sample(range(self.plan.kills), len(self.plan.broker_restarts)),
                self.plan.broker_restarts,
                strict=True,
            )
        )
        for i in range(self.plan.kills):
            if i in restart_at:
                self.restart_broker(restart_at[i], daemon_down=self.rng.random() < 0.5)
            self.kill_daemon(self.rng.choices(WINDOWS, WINDOW_WEIGHTS)[0])
            if self.rng.random() < 0.3:
                time.sleep(self.rng.uniform(0.5, 3.0))  # down for a while: the broker queues the feed
            self.start_daemon()
        code = self.settle()
        self.tally.seconds = time.monotonic() - started
        return code

    def settle(self) -> int:
        """Let the feed finish and the daemon catch up on everything, then stop it with SIGTERM."""
        self.feeder.join(self.plan.examples / self.plan.rate + 120)
        assert self.feeder.error is None, f"the feeder failed: {self.feeder.error!r}"
        assert self.feeder.done, f"the broker acknowledged {len(self.feeder.acked)} of {self.plan.examples}"
        acked = self.feeder.acked_ids()
        wait_for(lambda: acked <= set(stored_ids(self.state)), 90, f"all {len(acked)} acknowledged ids stored")
        wait_for(self.learner_caught_up, 90, "the learner to learn everything stored")
        wait_for(lambda: (self.state / "registry" / MODEL / "latest").exists(), 90, "a published model")
        return self.daemon.stop(30.0)

    def learner_caught_up(self) -> bool:
        try:
            payload = checkpoint.load(self.state / "checkpoints")
        except checkpoint.CheckpointError:
            return False
        return payload is not None and payload.high_water_mark >= audit.store_high_water_mark(self.state)

    def close(self) -> None:
        """Whatever happened, leave no process behind."""
        self.feeder.stop()
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
            self.daemon.proc.wait()
        self.broker.kill()

    # The faults.

    def start_daemon(self) -> None:
        self._log_offset = self.daemon.log_path.stat().st_size if self.daemon.log_path.exists() else 0
        self.daemon.start()
        self.tally.runs += 1

    def kill_daemon(self, window: str) -> None:
        proc = self.daemon.proc
        assert proc is not None, "the daemon was never started"
        pid = proc.pid
        landed: str | None = window
        if window == "checkpoint write":
            folder = self.state / "checkpoints"
            if not wait_exists(folder, 10) or not kill_when_created(
                pid, [folder], lambda n: n.startswith(f"{TMP_PREFIX}{checkpoint.CHECKPOINT_NAME}-"), 10
            ):
                landed = None
        elif window == "publish":
            folder = self.state / "registry" / MODEL
            if not wait_exists(folder, 15) or not kill_when_created(pid, [folder], self._publish_temporary(), 30):
                landed = None
        elif window == "export":
            if self.wait_log("exporting: ", 30):
                time.sleep(self.rng.uniform(0.0, 4.0))  # converting, verifying, or publishing
            else:
                landed = None
        else:
            time.sleep(self.rng.uniform(0.3, 15.0))  # long enough, at times, for an export to publish
        if landed is None:
            if self.feeder.done:
                self.tally.windows_after_feed += 1
            else:
                self.tally.missed_windows += 1
            landed = "anywhere"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, (
            f"the daemon exited with {proc.returncode} before the kill:\n{self.log_since_start()[-3000:]}"
        )
        self.tally.kills[landed] += 1
        if audit.temporaries(self.state):
            self.tally.temporaries_left_by_kills += 1

    def _publish_temporary(self):
        """Which of a publish's temporaries to kill at: the version folder, ``latest`` or ``versions``."""
        target = self.rng.choice(["version", "latest.sig", "latest", "versions"])

        def wanted(name: str) -> bool:
            m = _REGISTRY_TEMPORARY.match(name)
            return m is not None and (m.group(1) == target or (target == "version" and m.group(1).isdigit()))

        return wanted

    def restart_broker(self, sig: int, daemon_down: bool) -> None:
        if sig == signal.SIGKILL:
            self.feeder.pause()
            # Nothing acknowledged within the broker's autosave bound, so nothing acknowledged is in memory only.
            quiet = 2 * AUTOSAVE_INTERVAL_S + 1
            wait_for(lambda: time.monotonic() - self.feeder.last_ack_at > quiet, 30, "the feed to go quiet")
        if daemon_down:
            self.daemon.kill()
            self.tally.kills["anywhere"] += 1
            self.tally.broker_restarts_daemon_down += 1
        self.broker.stop(sig)
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.broker.start()
        self.feeder.resume()
        self.tally.broker_restarts[signal.Signals(sig).name] += 1
        if daemon_down:
            self.start_daemon()

    # Reading the daemon.

    def log_since_start(self) -> str:
        with open(self.daemon.log_path, errors="replace") as f:
            f.seek(self._log_offset)
            return f.read()

    def wait_log(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log_since_start():
                return True
            time.sleep(0.05)
        return False


def wait_exists(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def table(
    plan: Plan, tally: Tally, examples: audit.Examples, models: audit.Models, temporaries: list[str], outside: list[str]
) -> str:
    """The run's figures, one per line, as docs/reliability.md shows them."""
    kills = ", ".join(f"{n} {w}" for w, n in tally.kills.items())
    restarts = ", ".join(f"{n} {s}" for s, n in tally.broker_restarts.items())
    rows = [
        ("seed", plan.seed),
        ("runs (daemon processes started)", tally.runs),
        (
            "daemon SIGKILLs",
            f"{tally.total_kills} ({kills}; {tally.missed_windows} targeted ones missed their "
            f"window while the feed ran, {tally.windows_after_feed} came after it and count as anywhere)",
        ),
        ("kills that left a temporary behind (inside a write)", tally.temporaries_left_by_kills),
        (
            "broker restarts",
            f"{sum(tally.broker_restarts.values())} ({restarts}; "
            f"{tally.broker_restarts_daemon_down} while the daemon was down)",
        ),
        ("published (ids the broker acknowledged)", examples.published),
        ("stored (distinct ids)", examples.stored),
        ("lost", len(examples.lost)),
        ("duplicated", len(examples.duplicated)),
        ("stored but never acknowledged", len(examples.unexpected)),
        (
            "versions published",
            f"{len(models.versions_published)} ({models.recovered} of them finished by the "
            f"next start after a kill between the version's rename and the log)",
        ),
        ("candidates refused by the accuracy gates", models.refused - models.refused_by_runtime),
        ("verification failures", len(models.failing) + models.refused_by_runtime),
        ("temporaries left in the state folder", len(temporaries)),
        ("temporaries left in TMPDIR (export processes)", f"{len(outside)} ({', '.join(outside)})" if outside else 0),
        ("duration", f"{tally.seconds:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
