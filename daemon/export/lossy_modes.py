"""Which export modes rest, and for how many more exports, after their candidate lost too much accuracy.

When int8 loses more than ``export.max_drop_pts`` against the float model,
it loses about as much at the next export: quantisation loss is a property
of the network and its activation ranges, which a few hundred new examples
barely move (the suite's run: int8 refused at every export, 2.0-4.3 points
down). Converting and verifying it anyway doubled each export's time before
fp16 shipped. So a mode refused for its accuracy drop is skipped for
``export.skip_lossy_mode_for`` exports, then tried again. The last mode of
``export.quantization`` is never skipped: something must be tried.

Kept in ``<state>/export-cache/lossy-modes.json``, written by rename: each
export is its own process (daemon/export/child.py), and a restart keeps the
count. A file that cannot be read means no mode rests.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.common.files import replacing
from daemon.export.published_scores import CACHE


class LossyModes:
    def __init__(self, root: Path):
        self.path = root / CACHE / "lossy-modes.json"
        self.rest: dict[str, int] = {}  # mode -> exports it still skips
        try:
            doc = json.loads(self.path.read_text())
            self.rest = {str(k): int(v) for k, v in doc.items() if int(v) > 0}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # none yet, or unreadable: no mode rests

    def resting(self, mode: str) -> int:
        """Exports ``mode`` still skips, this one included; 0 when it is to be tried."""
        return self.rest.get(mode, 0)

    def skipped(self, mode: str) -> None:
        self.rest[mode] = self.rest.get(mode, 0) - 1
        if self.rest[mode] <= 0:
            del self.rest[mode]

    def refused_for_accuracy(self, mode: str, exports: int) -> None:
        if exports > 0:
            self.rest[mode] = exports

    def tried(self, mode: str) -> None:
        self.rest.pop(mode, None)

    def save(self) -> None:
        with replacing(self.path, "w") as f:
            json.dump(self.rest, f)
