"""The service manager's end of sd_notify, as the tests play it: a bound AF_UNIX datagram socket that records every
message the daemon sends, with the time it came."""

from __future__ import annotations

import socket
import threading
import time

from helpers import wait_for


class SystemdSocket:
    """The service manager's end of sd_notify: a bound datagram socket and every message it received, timed."""

    def __init__(self, address: str):
        self.address = address  # as NOTIFY_SOCKET names it: a path, or @name for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def env(self, watchdog_s: float | None = None) -> dict[str, str]:
        out = {"NOTIFY_SOCKET": self.address}
        if watchdog_s is not None:
            out["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        return out

    def times(self, key: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, m in list(self.messages) if key in m and since <= t <= until]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [m["STATUS"] for t, m in list(self.messages) if "STATUS" in m and t >= since]

    def wait(self, key: str, value: str | None = None, since: float = 0.0, timeout_s: float = 30.0) -> float:
        """When the first message with ``key`` (= ``value``) at or after ``since`` arrived."""

        def arrived():
            return next(
                (t for t, m in list(self.messages) if t >= since and key in m and value in (None, m[key])), None
            )

        return wait_for(arrived, timeout_s, f"{key}={value or '*'} on the notify socket")

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._reader.join(2)
