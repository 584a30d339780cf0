"""A private Mosquitto: started by the tests, the benchmarks and ``sprout demo`` when no broker answers.

It uses Debian's ``mosquitto`` binary with a config of its own, on a free
loopback port, with persistence on so that a restart keeps sessions.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# Settings Sprout relies on, explained in docs/broker.md.
BROKER_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
# Keep sessions and queued examples across a broker restart.
persistence true
persistence_location {data}/
# Seconds between saves of the in-memory state; a SIGKILLed broker loses at most this much.
autosave_interval {autosave_interval}
# Examples held per offline session. Past it Mosquitto silently drops the NEWEST ones,
# so size it for the longest outage: rate (examples/s) x outage (s).
max_queued_messages {max_queued_messages}
max_queued_bytes 0
# Un-acked messages in flight to one client; Sprout's commit batches can be no larger.
max_inflight_messages {max_inflight_messages}
log_dest file {data}/mosquitto.log
log_type error
log_type warning
log_type notice
"""
# Run as root, Mosquitto drops to the 'mosquitto' user, which cannot write our work folder.
AS_INVOKING_USER = "user {user}\n"


class BrokerError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def end_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout_s: float) -> None:
    """Send ``sig`` and wait for the process to exit; SIGKILL it past ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise BrokerError("mosquitto is not installed: run 'make setup' (it installs Debian's 'mosquitto' package)")
    return found


class Mosquitto:
    """One broker process; ``start`` again after ``stop`` reuses the same port, config and saved state."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        autosave_interval: int = 1,
        max_queued_messages: int = 1_000_000,
        max_inflight_messages: int = 1_000,
        extra_conf: str = "",
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            BROKER_CONF.format(
                port=self.port,
                data=self.workdir,
                autosave_interval=autosave_interval,
                max_queued_messages=max_queued_messages,
                max_inflight_messages=max_inflight_messages,
            )
            + (AS_INVOKING_USER.format(user=pwd.getpwuid(os.getuid()).pw_name) if os.getuid() == 0 else "")
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while not reachable("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} (see {self.workdir})")
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """SIGTERM saves the state to disk first; SIGKILL loses up to autosave_interval of it."""
        end_process(self.proc, sig, timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
