"""The daemon under a service manager: sd_notify over a real datagram socket, real signals, a real config reload.

The tests play systemd's part: they bind the AF_UNIX datagram socket that
``$NOTIFY_SOCKET`` names, set ``$WATCHDOG_USEC``, start ``sprout run`` as a
child process against a Mosquitto of their own, and read what it reports.
Stalls are real too: another connection holding a SQLite write lock blocks a
part of the daemon exactly as a backup tool or a stray ``sqlite3`` shell
holding a transaction open would.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from helpers import LEARNING, publish_examples, stored_ids, wait_for
from systemd_socket import SystemdSocket

from daemon.service.daemon import SHUTDOWN_BOUND_S
from daemon.service.systemd import Notifier, watchdog_usec


@contextmanager
def write_lock(db_path: Path):
    """Hold SQLite's write lock on ``db_path`` from another connection: readers go on (WAL), writers wait."""
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.rollback()
        db.close()


def publish(url: str, prefix: str, n: int) -> None:
    ids = [f"{prefix}-{i}" for i in range(n)]
    publish_examples(url, "leaves", ids, [("rust", "blight", "healthy")[i % 3] for i in range(n)])


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# -- the protocol itself -------------------------------------------------------------------------


def test_notifier_speaks_to_path_and_abstract_sockets_and_never_raises(tmp_path):
    abstract = SystemdSocket(f"@sprout-test-{uuid.uuid4().hex}")
    try:
        env = {**abstract.env(watchdog_s=4), "WATCHDOG_PID": str(os.getpid()), "KEEP": "1"}
        n = Notifier.from_environment(env)
        assert env == {"KEEP": "1"}  # taken out: children (the verification subprocesses) must not inherit them
        assert n.watchdog_s == 4.0
        assert n.ready("up") and n.watchdog() and n.reloading() and n.stopping("bye\nnow")
        abstract.wait("STOPPING", "1", timeout_s=5)
        received = [m for _, m in abstract.messages]
        assert received[0] == {"READY": "1", "STATUS": "up"}
        assert received[1] == {"WATCHDOG": "1"}
        assert received[2]["RELOADING"] == "1" and received[2]["MONOTONIC_USEC"].isdigit()
        assert received[3] == {"STOPPING": "1", "STATUS": "bye now"}  # a newline cannot forge another assignment
    finally:
        abstract.close()
    # The socket has gone away (systemd restarted, a test ended): a warning, never an exception.
    assert n.watchdog() is False
    assert Notifier.from_environment({}).send(READY=1) is False  # no NOTIFY_SOCKET: nothing to do
    # sd_watchdog_enabled(3): a WATCHDOG_PID that is not ours means the watchdog is someone else's.
    assert watchdog_usec({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_usec({"WATCHDOG_USEC": "0"}) is None and watchdog_usec({"WATCHDOG_USEC": "-5"}) is None


# -- start-up, reporting, stop --------------------------------------------------------------------


def test_ready_after_subscribing_then_status_and_watchdog_and_stopping_on_sigterm(broker, daemon_factory, systemd):
    d = daemon_factory(broker.url, env={**LEARNING, **systemd.env(watchdog_s=2.0)}).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    # Subscribed when READY=1 came: the broker already routes to Sprout's session. Before the subscription
    # exists the broker answers "no matching subscribers" and publish_examples fails.
    publish(broker.url, "first", 1)
    assert d.health()[0] == 200
    ready = next(m for _, m in systemd.messages if m.get("READY") == "1")
    assert "stored since start" in ready["STATUS"] and "learned" in ready["STATUS"]
    publish(broker.url, "more", 20)
    wait_for(
        lambda: any(s.startswith("21 stored") and "backlog 0" in s for s in systemd.statuses()),
        60,
        "a STATUS line counting 21 stored, all learned",
    )
    steady = time.monotonic()  # the learner's first steps (torch warming up) are behind us
    time.sleep(4)
    pings = systemd.times("WATCHDOG", since=steady)
    # Every WatchdogSec/2 = 1 s (on the main loop's 0.1 s tick); systemd would kill the service after a gap of 2 s.
    assert len(pings) >= 3, pings
    assert max(gaps([steady, *pings, time.monotonic()])) < 2.0, gaps(pings)
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(SHUTDOWN_BOUND_S) == 0
    stopping = systemd.wait("STOPPING", "1", since=sent, timeout_s=5)  # sent before it exited: only read late
    assert not systemd.times("WATCHDOG", since=stopping + 0.01)  # no pings once shutdown began
    assert "stopped in" in d.log()


def test_sigterm_while_examples_flow_and_the_learner_learns_exits_0_within_the_bound(broker, daemon_factory, systemd):
    d = daemon_factory(broker.url, env={**LEARNING, **systemd.env()}).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    n = 1500
    ids = [f"flow-{i:05d}" for i in range(n)]
    labels = [("rust", "blight", "healthy")[i % 3] for i in range(n)]
    feeder = threading.Thread(target=publish_examples, args=(broker.url, "leaves", ids, labels, 500.0), daemon=True)
    feeder.start()
    wait_for(lambda: len(stored_ids(d.state)) > 200, 20, "examples flowing in")
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.proc.wait(SHUTDOWN_BOUND_S + 5)
    took = time.monotonic() - sent
    assert feeder.is_alive(), "the stream ended before the stop; make it longer"
    assert code == 0, d.log()[-2000:]
    assert took < SHUTDOWN_BOUND_S, took
    systemd.wait("STOPPING", "1", since=sent, timeout_s=5)  # sent before it exited: only read late
    log = d.log()
    assert "stopping: committing" in log and "did not finish in time" not in log
    # The learner checkpointed on the way out, and nothing the broker accepted is lost.
    assert (d.state / "checkpoints" / "learner.pt").exists()
    feeder.join(30)
    d.start(wait_ready=False)
    wait_for(lambda: len(stored_ids(d.state)) == n, 60, f"all {n} after the stop and a restart")
    assert d.stop() == 0


def export_processes(parent: int) -> list[int]:
    """Pids of the export processes (daemon/export/child.py) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"daemon.export.child" in cmdline:
            found.append(int(entry.name))
    return found


def test_sigterm_during_an_export_kills_its_process_and_exits_0_at_once(broker, daemon_factory, systemd, tmp_path):
    """A conversion cannot be interrupted from Python: it runs in a child, which the stop kills, leaving nothing."""
    env = {
        **LEARNING,
        **systemd.env(),
        "SPROUT_EXPORT__ENABLED": "true",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "50",
        "SPROUT_EXPORT__EVERY_SECONDS": "3600",
        "TMPDIR": str(tmp_path),
    }
    d = daemon_factory(broker.url, env=env).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    ids = [f"export-{i:03d}" for i in range(120)]
    publish_examples(broker.url, "leaves", ids, [("rust", "blight", "healthy")[i % 3] for i in range(120)])
    # The child starts Python, imports torch and litert-torch, converts and verifies: seconds, never instant.
    children = wait_for(lambda: export_processes(d.proc.pid), 60, "an export process to start", interval_s=0.01)
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    code = d.proc.wait(SHUTDOWN_BOUND_S + 5)
    log = d.log()
    assert code == 0, log[-2000:]
    assert time.monotonic() - sent < SHUTDOWN_BOUND_S
    assert f"export process {children[0]} killed" in log, log[-3000:]
    assert "published version" not in log and "Traceback" not in log
    assert not Path(f"/proc/{children[0]}").exists()  # reaped, not left running beside a next daemon
    assert not list(tmp_path.glob("sprout-export-*"))  # its temporaries went with it
    assert sorted(stored_ids(d.state)) == ids  # everything the broker accepted was committed
    # The dropped export is redone after the next start.
    d.start(wait_ready=False)
    wait_for(lambda: "published version 1 " in d.log(), 120, "the export redone after a restart")
    assert d.stop() == 0


def test_an_export_process_dies_with_a_killed_daemon(broker, daemon_factory, systemd):
    """SIGKILL leaves no export process behind to publish beside the daemon that systemd starts next."""
    env = {
        **LEARNING,
        **systemd.env(),
        "SPROUT_EXPORT__ENABLED": "true",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "50",
        "SPROUT_EXPORT__EVERY_SECONDS": "3600",
    }
    d = daemon_factory(broker.url, env=env).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    publish_examples(
        broker.url, "leaves", [f"orphan-{i:03d}" for i in range(60)], [("rust", "blight")[i % 2] for i in range(60)]
    )
    children = wait_for(lambda: export_processes(d.proc.pid), 60, "an export process to start", interval_s=0.01)
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    wait_for(
        lambda: not Path(f"/proc/{children[0]}").exists() or _zombie(children[0]),
        10,
        "the export process to die with the daemon",
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# -- the watchdog only while every part makes progress --------------------------------------------


def test_a_stalled_learner_stops_the_watchdog_while_intake_goes_on(broker, daemon_factory, systemd):
    # The learner's embedding cache is its own SQLite file (head mode). A connection that holds its write
    # lock makes the learner's next step wait in SQLite's busy handler: alive, but making no progress.
    # The cache waits 5 s (Python's sqlite3 default) before the step fails, so the lock is held for 4.
    d = daemon_factory(broker.url, env={**LEARNING, **systemd.env(watchdog_s=1.0)}).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    publish(broker.url, "warm", 30)
    wait_for(
        lambda: any(s.startswith("30 stored") and "backlog 0" in s for s in systemd.statuses()),
        60,
        "the learner to catch up",
    )
    steady = time.monotonic()
    time.sleep(1.5)
    assert max(gaps(systemd.times("WATCHDOG", since=steady))) < 1.0  # healthy: a ping every 0.5 s

    with write_lock(d.state / "embeddings.db"):
        locked = time.monotonic()
        unlock = locked + 4.0  # before the cache's 5 s busy wait ends
        publish(broker.url, "stuck", 20)  # new work: the learner embeds it and waits to cache it
        # Intake is unaffected: it stores them while the learner waits (any time before the lock goes).
        wait_for(lambda: len(stored_ids(d.state)) == 50, unlock - time.monotonic(), "intake to store during the stall")
        time.sleep(max(0.0, unlock - time.monotonic()))
        assert d.proc.poll() is None and d.health()[0] == 200  # alive and healthy by /healthz's standard
        released = time.monotonic()
    systemd.wait("WATCHDOG", "1", since=released, timeout_s=10)  # pings resume once the step goes on

    pings = systemd.times("WATCHDOG", since=locked - 1.0)
    silent = max(gaps(pings))
    assert silent > 1.0, f"systemd (WatchdogSec=1s) would have restarted Sprout; largest gap {silent:.2f}s"
    # The main loop ran throughout: it kept reporting, and said what was stalled.
    during = systemd.times("STATUS", since=locked, until=released)
    assert max(gaps([locked, *during, released])) < 3.5  # a STATUS every 2 s, one of them late on a busy machine
    assert any("STALLED" in s and "learner" in s for s in systemd.statuses(since=locked))
    log = d.log()
    assert log.count("watchdog: not pinging: the learner has made no progress") == 1  # said once, not every ping
    assert "every part makes progress again" in log
    assert d.stop() == 0


def test_a_stalled_intake_stops_the_watchdog(broker, daemon_factory, systemd):
    # Intake's commits wait on SQLite's busy handler (30 s) while another connection holds the store's
    # write lock: examples arrive and nothing is committed or acked.
    d = daemon_factory(broker.url, env=systemd.env(watchdog_s=1.0)).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=30)
    publish(broker.url, "before", 10)
    steady = time.monotonic()
    time.sleep(1.5)
    assert max(gaps(systemd.times("WATCHDOG", since=steady))) < 1.0
    with write_lock(d.state / "examples.db"):
        locked = time.monotonic()
        publish(broker.url, "held", 10)  # the broker acks them: it holds them for Sprout's session
        # Five times the watchdog's 1 s, well inside intake's 30 s busy wait: the stall is seen even when busy.
        time.sleep(max(0.0, locked + 5.0 - time.monotonic()))
        assert len(stored_ids(d.state)) == 10 and d.proc.poll() is None
        released = time.monotonic()
    systemd.wait("WATCHDOG", "1", since=released, timeout_s=10)
    assert max(gaps(systemd.times("WATCHDOG", since=locked - 1.0))) > 1.0
    assert any("STALLED" in s and "intake has committed nothing" in s for s in systemd.statuses(since=locked))
    wait_for(lambda: len(stored_ids(d.state)) == 20, 10, "the held examples, committed once the lock went")
    assert d.stop() == 0


def test_a_second_sigint_cuts_the_wait_for_a_stuck_learner_short(broker, daemon_factory):
    d = daemon_factory(broker.url, env=LEARNING).start()
    publish(broker.url, "warm", 10)
    wait_for(lambda: (d.state / "embeddings.db").exists(), 60, "the learner's cache")
    with write_lock(d.state / "embeddings.db"):
        locked = time.monotonic()
        publish(broker.url, "stuck", 10)
        time.sleep(0.8)
        d.signal(signal.SIGINT)
        wait_for(lambda: "waiting for the learner" in d.log(), 5, "shutdown to wait for the learner")
        time.sleep(0.5)
        assert d.proc.poll() is None  # a first SIGINT waits for the step to end (here: up to 5 s)
        forced = time.monotonic()
        d.signal(signal.SIGINT)
        code = d.proc.wait(10)
        took = time.monotonic() - forced
        assert time.monotonic() - locked < 5.0, "the learner's busy wait ended before the test could force"
    assert code == 0
    assert took < 3.0, took  # far below the 5 s a first SIGINT waits (loose: a shared 2-core machine)
    log = d.log()
    assert "the learner did not finish in time" in log and "(forced)" in log


# -- reload (SIGHUP) ------------------------------------------------------------------------------


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(broker, daemon_factory, systemd, tmp_path):
    config = tmp_path / "sprout.toml"
    base = "[mqtt]\nkeepalive_s = 30\n[registry]\nkeep_versions = 10\n"
    config.write_text(base + '[logging]\nlevel = "INFO"\n')
    d = daemon_factory(broker.url, config=config, env={**LEARNING, **systemd.env()}).start(wait_ready=False)
    systemd.wait("READY", "1", timeout_s=60)
    assert " DEBUG " not in d.log()

    # Valid: three reloadable changes and one that needs a restart.
    config.write_text(
        "[mqtt]\nkeepalive_s = 10\n[registry]\nkeep_versions = 3\n[training]\nreplay_ratio = 1.5\n"
        '[logging]\nlevel = "DEBUG"\n'
    )
    sent = time.monotonic()
    d.signal(signal.SIGHUP)
    reloading = systemd.wait("RELOADING", "1", since=sent, timeout_s=10)
    systemd.wait("READY", "1", since=reloading, timeout_s=10)
    wait_for(lambda: " DEBUG sprout.daemon: status:" in d.log(), 10, "DEBUG lines after the reload")
    log = d.log()
    assert "reload: logging.level 'INFO' -> 'DEBUG'" in log
    assert "reload: registry.keep_versions 10 -> 3" in log
    assert "reload: mqtt.keepalive_s needs a restart to take effect" in log
    assert "reload: training.replay_ratio 4.0 -> 1.5" in log
    wait_for(lambda: "the learner uses the new training settings" in d.log(), 10, "the learner to take them")

    # Invalid: refused whole, naming the field; the daemon runs on with the configuration it had.
    config.write_text(base + '[training]\nreplay_ratio = 1.5\n[logging]\nlevel = "INFO"\n[export]\nmax_drop_pts = -1\n')
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log(), 10, "the refusal")
    refusal = next(line for line in d.log().splitlines() if "reload refused" in line)
    assert "export.max_drop_pts" in refusal and "greater than or equal to 0" in refusal
    mark = len(d.log())
    # A STATUS line (every 2 s) is logged at DEBUG only if DEBUG is still the level.
    wait_for(lambda: " DEBUG sprout.daemon: status:" in d.log()[mark:], 10, "a DEBUG status line after the refusal")
    assert d.proc.poll() is None and d.health()[0] == 200
    publish(broker.url, "after", 5)
    wait_for(lambda: len(stored_ids(d.state)) == 5, 10, "intake working after the refused reload")

    # A TOML error is refused the same way.
    config.write_text("[logging\n")
    d.signal(signal.SIGHUP)
    wait_for(lambda: "not valid TOML" in d.log(), 10, "the TOML error")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_the_deploy_guide_lists_exactly_what_a_reload_applies():
    from daemon.service.reload import RELOADABLE

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    section = doc.split("## 6. Reload", 1)[1].split("\n## ", 1)[0]
    listed = {}
    for row in re.findall(r"^\| `(\w+)` \| (.*) \|$", section, re.M):
        listed[row[0]] = frozenset(re.findall(r"`(\w+)`", row[1]))
    assert listed == RELOADABLE


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_daemon_goes_on(broker, daemon_factory):
    d = daemon_factory(broker.url).start()
    d.signal(signal.SIGUSR1)
    wait_for(lambda: "Current thread" in d.log(), 10, "the stacks in the log")
    assert re.search(r'File ".*daemon/ingest/intake\.py", line \d+ in run', d.log())  # intake's thread, say
    assert d.health()[0] == 200
    publish_examples(broker.url, "leaves", ["after-usr1"], ["rust"])
    wait_for(lambda: stored_ids(d.state) == ["after-usr1"], 20, "an example stored after the dump")
    assert d.stop() == 0
