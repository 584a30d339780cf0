"""The unit file, as systemd itself reads it: valid, hardened, and wired to the daemon's notify protocol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import colour_jpeg, wait_for

from daemon.export.verification import default_tflite_runtime_python
from daemon.tools.broker import free_port
from daemon.tools.feeder import Publisher

REPO = Path(__file__).resolve().parents[1]

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "sprout.service"
EXPOSURE_LIMIT = 2.5

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def local_unit(tmp_path: Path) -> Path:
    """The unit with PATH leading to this checkout's sprout, so that it runs from here."""
    text = UNIT.read_text()
    assert "Environment=PATH=/opt/sprout/.venv/bin:" in text
    unit = tmp_path / "sprout.service"
    unit.write_text(text.replace("PATH=/opt/sprout/.venv/bin:", f"PATH={Path(sys.executable).parent}:"))
    return unit


@needs_systemd_analyze
@pytest.mark.parametrize(
    "unit, command",
    [(UNIT, "/usr/bin/env sprout run "), (UNIT.with_name("sprout-trainer.service"), "/usr/bin/env torchrun ")],
    ids=["sprout", "sprout-trainer"],
)
def test_the_unit_as_shipped_verifies_in_any_checkout(unit: Path, command: str):
    """The operator's `systemd-analyze verify systemd/<unit>` before installing: clean."""
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert directives(unit.read_text())["ExecStart"][0].startswith(command)


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_systemd_analyze
def test_unit_verifies_cleanly(tmp_path: Path):
    out = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60
    )
    # verify only warns (exit 0) on unknown keys and typos: the stderr must be empty.
    assert out.returncode == 0 and out.stderr == "", out.stderr


@needs_systemd_analyze
def test_unit_exposure_score_is_at_most_2_5(tmp_path: Path):
    # --offline=true (systemd >= 250) reads the file as it is instead of asking a running systemd.
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    found = re.search(r"Overall exposure level for sprout\.service: (\d+\.\d+)", out.stdout)
    assert found, out.stdout[-2000:]
    failing = [line for line in out.stdout.splitlines() if line.startswith("✗")]
    assert float(found.group(1)) <= EXPOSURE_LIMIT, "\n".join(failing)


def deploy_doc_dropins() -> dict[str, str]:
    """The drop-ins docs/deploy.md tells operators to write: file name -> content."""
    doc = (UNIT.parents[1] / "docs" / "deploy.md").read_text()
    found = re.findall(r"^( *)```ini\n\1# /etc/systemd/system/sprout\.service\.d/(\S+)\n(.*?)^\1```", doc, re.M | re.S)
    return {name: textwrap.dedent(body) for _, name, body in found}


@needs_systemd_analyze
def test_every_drop_in_in_the_deploy_guide_verifies_and_keeps_the_score(tmp_path: Path):
    dropins = deploy_doc_dropins()
    assert {"gpu.conf", "secrets.conf", "signing-key.conf", "watchdog.conf", "networks.conf"} <= dropins.keys()
    for name, body in dropins.items():
        folder = tmp_path / name.removesuffix(".conf")
        folder.mkdir()
        unit = local_unit(folder)
        (folder / "sprout.service.d").mkdir()
        (folder / "sprout.service.d" / name).write_text(body)
        out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stderr == "", f"{name}: {out.stderr}"
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        found = re.search(r"Overall exposure level for sprout\.service: (\d+\.\d+)", out.stdout)
        assert found, f"{name}: {out.stdout[-2000:]}"
        score = float(found.group(1))
        assert score <= EXPOSURE_LIMIT, f"{name}: {score}"


def test_unit_does_not_restart_on_a_bad_config():
    text = UNIT.read_text()
    assert "RestartPreventExitStatus=78" in text
    assert "Restart=on-failure" in text


def test_unit_speaks_the_daemons_notify_protocol():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]  # READY=1, STATUS=, WATCHDOG=1 from the daemon
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the daemon reloads on SIGHUP
    watchdog = d["WatchdogSec"][0]
    assert watchdog.isdigit() and int(watchdog) >= 60, "the learner's holdout evaluation needs tens of seconds"
    # The daemon bounds its own shutdown at 20 s; systemd must wait longer before its SIGKILL.
    from daemon.service.daemon import SHUTDOWN_BOUND_S

    assert int(d["TimeoutStopSec"][0]) > SHUTDOWN_BOUND_S
    # The exporter runs the tflite-runtime virtualenv's python and writes temporaries: nothing may forbid that.
    assert "MemoryDenyWriteExecute" not in d and "NoExecPaths" not in d
    assert d["PrivateTmp"] == ["yes"] and d["ProtectSystem"] == ["strict"] and d["StateDirectory"] == ["sprout"]


def test_memory_deny_write_execute_stays_off_because_torch_needs_writable_code():
    # MemoryDenyWriteExecute= forbids making written memory executable. The kernel's own switch for the same
    # rule (PR_SET_MDWE, Linux >= 6.3) shows what it would do: torch's CPU kernels (oneDNN) are generated
    # at run time and fail. Should this start passing, the unit can turn the setting on.
    probe = (
        "import ctypes, sys\n"
        "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
        "import torch\n"
        "torch.nn.Conv2d(3, 16, 3)(torch.randn(8, 3, 64, 64))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if out.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert out.returncode != 0 and "could not create a primitive" in out.stderr, out.stderr[-1000:]
    assert "MemoryDenyWriteExecute" not in directives(UNIT.read_text())


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named syscall sets (@system-service, ...), as this systemd defines them."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def unit_syscall_allowlist() -> set[str]:
    """The calls the unit's SystemCallFilter= lines allow: the first line allows, '~' lines take away."""
    groups = syscall_groups()

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed: set[str] = set()
    for value in directives(UNIT.read_text())["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed


def proc_mount_options() -> str:
    """The /proc the unit gives the service: ProtectProc= is hidepid=, ProcSubset=pid is subset=pid."""
    d = directives(UNIT.read_text())
    options = [f"hidepid={d.get('ProtectProc', ['default'])[-1]}"]
    if d.get("ProcSubset", ["all"])[-1] == "pid":
        options.append("subset=pid")
    return ",".join(options)


# Run inside fresh mount and PID namespaces: $1 (a folder of the test's) becomes the only writable
# place besides a private /tmp, at /srv, every other mount read-only (ProtectSystem=strict, PrivateTmp=,
# StateDirectory=), and /proc is mounted as ProtectProc= and ProcSubset= make it. $2 is this checkout
# (the unit's /opt/sprout): when it lives under /tmp, as a CI clone may, it is carried over the private
# /tmp, read-only like the rest.
SANDBOX = """
set -e
writable=$1; repo=$2; shift 2
mount --make-rprivate /
mount --bind "$writable" /srv
case "$repo" in /tmp/*) mount --bind "$repo" /mnt; carried=1 ;; esac
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "${{carried:-}}" ]; then
    mkdir -p "$repo"
    mount --bind /mnt "$repo"
    mount -o remount,bind,ro "$repo"
fi
findmnt -rn -o TARGET | grep -Ev '^/(proc|sys|dev|srv|tmp)(/|$)' | while read -r m; do
    mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount -t proc -o {proc} proc /proc
exec "$@"
"""


def sandbox_prefix(writable: Path) -> list[str]:
    """A command prefix that runs the rest in the unit's file-system view; [] where this machine does not allow it."""
    prefix = [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "sh",
        "-c",
        SANDBOX.format(proc=proc_mount_options()),
        "sandbox",
        str(writable),
        str(UNIT.parents[1]),
    ]
    probe = [*prefix, "sh", "-c", "touch /srv/.probe /tmp/.probe && ! touch /etc/.probe 2>/dev/null"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode != 0:
        return []
    (writable / ".probe").unlink()
    return prefix


@pytest.mark.slow
@needs_systemd_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_daemon_learns_exports_reloads_and_stops_inside_the_units_sandbox(broker, tmp_path: Path):
    """As much of the unit's sandbox as can be had without systemd as PID 1, around the real daemon:

    - the system-call filter: strace fails every call outside SystemCallFilter= with EPERM, as
      SystemCallErrorNumber=EPERM does, in the daemon and its verification subprocesses (both interpreters);
    - where this machine lets a test make namespaces: a read-only file system but for the state directory
      and a private /tmp (the exporter's temporaries), and /proc as ProtectProc= and ProcSubset= mount it.
    """
    if not default_tflite_runtime_python().exists():
        pytest.skip("needs the tflite-runtime virtualenv (scripts/setup.sh)")
    d = directives(UNIT.read_text())
    assert d["SystemCallErrorNumber"] == ["EPERM"]
    allowed = ",".join(f"?{name}" for name in sorted(unit_syscall_allowlist()))  # '?': names this arch lacks
    writable = tmp_path / "writable"
    writable.mkdir()
    prefix = sandbox_prefix(writable)
    inside = Path("/srv") if prefix else writable  # the writable folder as the daemon sees it
    log_path = tmp_path / "daemon.log"
    env = {
        **os.environ,
        "HOME": str(inside / "cache"),
        "SPROUT_TRAINING__ENABLED": "true",
        "SPROUT_MODEL__BACKBONE": "tiny",
        "SPROUT_MODEL__INPUT_SIZE": "32",
        "SPROUT_TRAINING__BATCH_SIZE": "8",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "100",
        "SPROUT_EXPORT__VERIFY_EXAMPLES": "10",
    }
    sprout = [
        sys.executable,
        "-m",
        "daemon.cli",
        "run",
        "--broker",
        broker.url,
        "--state",
        str(inside / "state"),
        "--model",
        "leaves",
        "--http",
        f"127.0.0.1:{free_port()}",
    ]
    strace = [
        "strace",
        "-f",
        "-qq",
        "-o",
        str(inside / "syscalls"),
        "-e",
        f"trace=!{allowed}",
        "-e",
        f"inject=!{allowed}:error=EPERM",
    ]
    with log_path.open("w") as log:
        sandbox = subprocess.Popen([*prefix, *strace, *sprout], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "ready:" in log_path.read_text() or sandbox.poll() is not None, 120, "the daemon to be ready")
        assert sandbox.poll() is None, log_path.read_text()[-3000:]
        pids = subprocess.run(["pgrep", "-f", "--", f"--state {inside / 'state'}"], capture_output=True, text=True)
        daemon_pid = max(int(p) for p in pids.stdout.split())  # the last started of unshare, strace and the daemon
        with Publisher(broker.url) as pub:
            for i in range(150):
                pub.publish("sprout/leaves/examples", colour_jpeg(i % 3, i), f"colour-{i % 3}", "image/jpeg", f"c-{i}")
            assert pub.wait_all_acked(30)
        wait_for(
            lambda: "published version 1" in log_path.read_text() or sandbox.poll() is not None,
            300,
            "a verified, published model",
        )
        assert sandbox.poll() is None, log_path.read_text()[-3000:]
        os.kill(daemon_pid, signal.SIGHUP)
        wait_for(lambda: "reload:" in log_path.read_text(), 10, "the reload")
        os.kill(daemon_pid, signal.SIGTERM)
        assert sandbox.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
    logged = log_path.read_text()
    assert "tflite-runtime" in logged and "Traceback" not in logged
    assert (writable / "state" / "registry" / "leaves" / "latest").exists()
    # Refused and survived, on this machine: sched_setaffinity (torch probing CPUs), mbind (a NUMA hint on
    # large allocations), fchown (SQLite matching a new WAL file's owner, only when running as root).
    # Anything new refused deserves a look, even when the run survived it.
    trace = (writable / "syscalls").read_text()
    # "PID call(args) = -1 EPERM (...) (INJECTED)", or "PID <... call resumed>..." for a call another
    # process's line interrupted (concurrent verification subprocesses).
    refused = {
        match.group(1)
        for line in trace.splitlines()
        if "(INJECTED)" in line and (match := re.match(r"\s*\d+\s+(?:<\.\.\.\s+)?(\w+)", line))
    }
    assert refused <= {"sched_setaffinity", "mbind", "fchown", "set_mempolicy", "setpriority"}, refused


_LOG_SOME = """
import logging
from daemon.common.logs import configure
configure("INFO")
log = logging.getLogger("sprout.test")
log.info("learning")
log.warning("backlog growing")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("export failed")
"""


def test_under_journald_every_line_carries_its_syslog_priority(tmp_path: Path):
    """journald files each line at the priority of its <N> prefix: `journalctl -p warning` must find the
    warning and the whole traceback, and no line may carry Sprout's own timestamp (journald stamps it)."""
    journal = tmp_path / "journal-stream"
    with open(journal, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", _LOG_SOME], stderr=stream, env=env, cwd=REPO, timeout=60, check=True)
    lines = journal.read_text().splitlines()
    assert lines[:2] == ["<6>INFO sprout.test: learning", "<4>WARNING sprout.test: backlog growing"]
    assert lines[2] == "<3>ERROR sprout.test: export failed"
    traceback = lines[3:]
    assert (
        traceback[0] == "<3>Traceback (most recent call last):"
        and traceback[-1] == "<3>ZeroDivisionError: division by zero"
    )
    assert all(line.startswith("<3>") for line in traceback)

    # A child whose stderr is not the journal stream (a pipe, a file) inherits JOURNAL_STREAM all the
    # same: it writes plain stamped lines, no prefix that would show as "<4>" in a file.
    elsewhere = tmp_path / "redirected.log"
    with open(elsewhere, "wb") as stream:
        subprocess.run([sys.executable, "-c", _LOG_SOME], stderr=stream, env=env, cwd=REPO, timeout=60, check=True)
    first = elsewhere.read_text().splitlines()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sprout.test: learning", first), first
