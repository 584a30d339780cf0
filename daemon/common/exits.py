"""Process exit codes, in one place: sysexits.h's, which systemd and shell scripts read.

``CONFIG`` (78) is the one that stops systemd's restart loop (``RestartPreventExitStatus=78`` in the
unit): restarting cannot fix a bad configuration, a state folder Sprout cannot use, or a store
written by a newer Sprout. ``SOFTWARE`` (70) is a part that died: ``Restart=on-failure`` brings the
daemon back. edge/ keeps its own few codes (it imports nothing of the daemon) with the same values.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    USAGE = 64  # a command used wrongly
    DATAERR = 65  # input that was read but not taken (files skipped by an import)
    NOINPUT = 66  # a file, folder or store that is not there
    UNAVAILABLE = 69  # a service that is needed is not (a broker, a port)
    SOFTWARE = 70  # a part of the daemon or an export failed; its traceback is in the log
    CANTCREAT = 73  # cannot create a file (a key, a folder)
    CONFIG = 78  # the configuration, or what it points at, cannot work: fix it, do not restart
