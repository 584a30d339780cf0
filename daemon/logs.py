"""Log set-up: plain lines for terminals, no duplicate timestamp under journald, JSON lines on request."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLines())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald stamps every line itself.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho logs every packet at DEBUG; keep it quiet unless asked for.
    logging.getLogger("sprout.paho").setLevel(max(logging.getLevelName(level), logging.INFO))
    # torchao (pulled in by litert-torch's quantizer) warns on import about GPU kernels and Triton that a
    # CPU export never uses: noise in every export's log, so only its errors pass.
    logging.getLogger("torchao").setLevel(max(logging.getLevelName(level), logging.ERROR))
