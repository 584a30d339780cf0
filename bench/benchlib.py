"""What the end-to-end benchmarks share: the daemon as a process, its subscription, its memory, the machine."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.tools.broker import free_port, mosquitto_binary  # noqa: E402
from daemon.tools.feeder import Publisher  # noqa: E402


class DaemonProcess:
    """``sprout run`` in its own process, configured through the environment as systemd would."""

    def __init__(self, broker_url: str, model: str, state: Path, env: dict[str, str], log: Path | None = None):
        self.http = f"127.0.0.1:{free_port()}"
        self._log = open(log or os.devnull, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.cli",
                "run",
                "--broker",
                broker_url,
                "--model",
                model,
                "--state",
                str(state),
                "--http",
                self.http,
            ],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def metrics(self) -> dict[str, float]:
        """The samples of /metrics by name, counters without their ``_total`` ({} if the scrape fails); a labelled
        sample's key carries its labels as exposed, e.g. ``sprout_exports{outcome="published"}``."""
        try:
            with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if m := re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line):
                out[m.group(1).removesuffix("_total") + (m.group(2) or "")] = float(m.group(3))
        return out

    def rss_mb(self) -> float:
        """Resident memory of the daemon's process (not its verification subprocesses), in MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def tree_rss_mb(self) -> float:
        """Resident memory of the daemon and every process under it (export process, verifiers), in MiB."""
        return sum(_vm_rss_mb(pid) for pid in [self.proc.pid, *_descendants(self.proc.pid)])

    def stop(self, timeout_s: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_subscribed(broker_url: str, topic: str, probe: bytes, timeout_s: float = 120.0) -> None:
    """Until a probe gets a success PUBACK: the daemon's session exists, so the broker keeps what follows."""
    deadline = time.monotonic() + timeout_s
    with Publisher(broker_url) as pub:
        while time.monotonic() < deadline:
            before = pub.report.acked
            pub.publish(topic, probe, "probe", "image/jpeg", f"probe-{time.monotonic_ns()}")
            pub.wait_all_acked(5)
            if pub.report.acked > before:
                return
            time.sleep(0.2)
    raise SystemExit(f"the daemon did not subscribe to {topic} within {timeout_s:.0f} s")


def machine() -> dict[str, str]:
    """The machine and the versions that decide the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("torch", "ai-edge-litert", "paho-mqtt"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    try:
        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=10).stdout
        versions["mosquitto"] = out.split("version", 1)[1].split()[0] if "version" in out else "unknown"
    except (OSError, subprocess.SubprocessError):
        versions["mosquitto"] = "not found"
    return {"cores": str(os.cpu_count()), "cpu": cpu, **versions}


def _vm_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # it ended meanwhile
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children of children included)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found
