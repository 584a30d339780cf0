"""Telling systemd how Sprout is doing: the sd_notify datagram protocol, written out in full.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines
sent to the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
the abstract namespace). It is small enough that a dependency would cost
more than it saves: the ``systemd-python`` bindings need libsystemd headers
to build, and the pure-Python packages on PyPI are either unmaintained or
lack the watchdog environment rules below. (systemd >= 254 also accepts
``vsock:`` addresses, for VMs; Sprout runs on the host, so they are not handled.)

Nothing here ever raises into the daemon: a full socket buffer or a
vanished systemd must not stop intake. Without ``$NOTIFY_SOCKET`` (a
terminal, a test, another service manager) every call is a no-op.

>>> n = Notifier.from_environment({})
>>> n.enabled, n.watchdog_s, n.send(READY=1)
(False, None, False)
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("sprout.notify")

# Read once and removed from the environment, as sd_notify(unset_environment=1) does: the
# verification subprocesses must not inherit them and speak for the service (NotifyAccess=main
# would drop their messages anyway, but a child could otherwise also believe it owns the watchdog).
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None):
        self.address = address
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._socket: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take NOTIFY_SOCKET and the watchdog settings out of ``environ`` (default: os.environ)."""
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, None) for name in _VARIABLES}
        return cls(values["NOTIFY_SOCKET"] or None, watchdog_usec(values))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it went out. Never raises."""
        if self.address is None:
            return False
        # A newline inside a value would start a new assignment: keep each value on its line.
        message = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), _socket_address(self.address))
            return True
        except OSError as err:
            if not self._warned:  # once: a socket that is gone stays gone, and the log must not flood
                log.warning("cannot notify the service manager at %s: %s", self.address, err)
                self._warned = True
            return False

    # The messages Sprout sends, by name (see sd_notify(3)).

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        # systemd >= 253 wants the monotonic time with RELOADING=1 (to match it to the reload job);
        # older ones ignore the extra line.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_usec(env: Mapping[str, str | None]) -> int | None:
    """The watchdog interval in microseconds if it is meant for this process, else None.

    sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and when WATCHDOG_PID is
    set it must be our pid (a service manager that starts a wrapper names the real daemon).

    >>> watchdog_usec({"WATCHDOG_USEC": "60000000"}), watchdog_usec({"WATCHDOG_USEC": "x"})
    (60000000, None)
    >>> watchdog_usec({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"})  # someone else's
    """
    raw = env.get("WATCHDOG_USEC")
    if not raw or not raw.isdigit() or int(raw) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(raw)


def _socket_address(address: str) -> str | bytes:
    # '@' marks Linux's abstract namespace, where the name starts with a NUL byte instead.
    return b"\0" + address[1:].encode() if address.startswith("@") else address
