"""One start/stop protocol for every part the daemon runs: the feed, intake, the learner, the exporter, ...

A :class:`Part` starts when asked, stops by a deadline, says whether it is
alive and, once dead, what killed it. The daemon (daemon/service/daemon.py)
starts its parts in order, watches them all in one loop and stops them in
reverse order against one deadline: an absolute ``time.monotonic()`` instant
shared by the whole shutdown, so a part that takes long leaves the parts after
it less time, never more, and the stop as a whole stays within one bound.

``stop`` asks the part to stop (once: a second call only waits on), waits
until the deadline at most and says whether the part stopped in time. A part
that never started releases what it holds and says True. Stopping in short
slices, ``stop(now + 0.1)`` again and again, is how the daemon keeps a second
Ctrl-C able to cut the waiting short.

>>> import threading, time
>>> class Ticker:
...     name = "ticker"
...     def __init__(self):
...         self.error, self._done = None, threading.Event()
...         self._thread = threading.Thread(target=self._done.wait, daemon=True)
...     def start(self): self._thread.start()
...     def alive(self): return self._thread.is_alive()
...     def stop(self, deadline):
...         self._done.set()
...         self._thread.join(max(0.0, deadline - time.monotonic()))
...         return not self.alive()
>>> part: Part = Ticker()
>>> part.start(); part.alive()
True
>>> part.stop(time.monotonic() + 1.0), part.alive(), describe(part.error)
(True, False, 'no error recorded')
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Part(Protocol):
    name: str  # what the logs and the shutdown call it: "intake", "learner", ...

    @property
    def error(self) -> BaseException | None:
        """What killed it; None while it runs and after a clean stop."""
        ...

    def start(self) -> None:
        """Begin its work in the background; raises if it cannot (a port taken, say)."""

    def stop(self, deadline: float) -> bool:
        """Stop by ``deadline`` (a ``time.monotonic()`` instant); whether it has stopped by then."""
        ...

    def alive(self) -> bool:
        """Whether it still does its work; False once it ended, by a stop or by its ``error``."""
        ...


def left(deadline: float) -> float:
    """Seconds until ``deadline``, never negative: what a join or a wait may take."""
    return max(0.0, deadline - time.monotonic())


def describe(error: BaseException | None) -> str:
    """One line naming what killed a part, for the log."""
    if error is None:
        return "no error recorded"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
