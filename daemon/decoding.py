"""Decode stored images for the learner: in its own thread, or in a pool of decoder processes.

Pillow decodes, resizes and crops ~600 images a second per core (224 px
JPEGs of ~30 KB). On a 2-core box the backbone, not decoding, limits the
learner (~70 examples/s at 128 px in head mode), so decoding stays in the
learner's thread. On a GPU, a step of 64 images takes a few milliseconds and
one core's decoding would cap the learner near 600 images/s: there a pool of
``training.decode_workers`` processes decodes beside it.

Workers return uint8 RGB (H, W, 3) at the input size, a quarter of the bytes
of normalised float32; normalisation happens in torch on the learner's
device (``Learner._network_input``), the same float32 arithmetic as a device's.
The workers are spawned (not forked: the learner's process runs torch's
threads) and import only Pillow and numpy. A worker that dies (killed, out of
memory) breaks the pool: that batch is decoded in the learner's thread, the
pool is started afresh, and after ``MAX_RESTARTS`` breaks decoding stays in
the thread for good, with an error in the log.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from daemon.imaging import load_rgb

log = logging.getLogger("sprout.learner")

MAX_RESTARTS = 3
# Images per task sent to a worker: large enough that pickling and scheduling (~100 us a task)
# stay small beside decoding (~1.6 ms an image), small enough to spread a batch of 64 over 8 workers.
CHUNK = 8


def auto_workers(device_type: str, cores: int | None = None) -> int:
    """``decode_workers = "auto"``: none on a CPU (the backbone is the limit), else every core but two, up to 16.

    Two cores stay with intake (the MQTT thread and SQLite commits) and the learner's own thread.
    """
    if device_type == "cpu":
        return 0
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(16, cores - 2))


def _decode_chunk(size: int, images: Sequence[bytes]) -> list[np.ndarray | None]:
    return [load_rgb(data, size) for data in images]


class DecodePool:
    """``rgb(images)``: uint8 (size, size, 3) per image, None for one that does not decode."""

    def __init__(self, input_size: int, workers: int):
        self.size = input_size
        self.workers = workers
        self.restarts = 0
        self.fallbacks = 0  # batches decoded in the learner's thread after the pool broke
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self._start()

    def _start(self) -> None:
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    @property
    def in_processes(self) -> bool:
        return self._pool is not None

    def rgb(self, images: Sequence[bytes]) -> list[np.ndarray | None]:
        if self._pool is None or len(images) <= 1:
            return _decode_chunk(self.size, images)
        chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]
        try:
            futures = [self._pool.submit(_decode_chunk, self.size, chunk) for chunk in chunks]
            return [rgb for f in futures for rgb in f.result()]
        except BrokenProcessPool as err:
            self.fallbacks += 1
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            if self.restarts < MAX_RESTARTS:
                self.restarts += 1
                log.warning("a decoder process died (%s): this batch decodes in the learner's thread, and the "
                            "pool of %d starts afresh (restart %d of %d)", err, self.workers, self.restarts,
                            MAX_RESTARTS)
                self._start()
            else:
                log.error("decoder processes died %d times: decoding stays in the learner's thread (slower on "
                          "a GPU); see the kernel log for why they die (out of memory?)", self.restarts + 1)
            return _decode_chunk(self.size, images)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
