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

Decoding beside the step is what takes it off the critical path: the
learner submits the next step's images (read ahead from the store) before it
runs this step, and collects them when that next step comes
(``Learner.learn(batch, upcoming)``). A step of 64 new and 256 replayed
224 px images is ~0.5 s of one core's decoding, and well under 0.1 s of a
GPU's step.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
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


class Decoding:
    """Images on their way through the pool; ``result()`` waits for them (or, without a pool, decodes them)."""

    def __init__(self, pool: DecodePool, images: Sequence[bytes], futures: list[Future] | None,
                 executor: ProcessPoolExecutor | None):
        self._pool = pool
        self._images = images
        self._futures = futures
        self._executor = executor
        self._result: list[np.ndarray | None] | None = None

    def result(self) -> list[np.ndarray | None]:
        if self._result is None:
            self._result = self._pool._collect(self._images, self._futures, self._executor)
        return self._result


class DecodePool:
    """``rgb(images)``: uint8 (size, size, 3) per image, None for one that does not decode.

    ``submit(images)`` starts decoding and returns at once, so that the workers decode the next step's
    images while the learner's thread runs this one (``Learner`` reads ahead this way).
    """

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
        return self.submit(images).result()

    def submit(self, images: Sequence[bytes]) -> Decoding:
        if self._pool is None or len(images) <= 1:
            return Decoding(self, images, None, None)
        executor = self._pool
        try:
            futures = [executor.submit(_decode_chunk, self.size, images[i : i + CHUNK])
                       for i in range(0, len(images), CHUNK)]
        except BrokenProcessPool as err:
            self._broken(executor, err)
            return Decoding(self, images, None, None)
        return Decoding(self, images, futures, executor)

    def _collect(self, images: Sequence[bytes], futures: list[Future] | None,
                 executor: ProcessPoolExecutor | None) -> list[np.ndarray | None]:
        if futures is None:
            return _decode_chunk(self.size, images)
        try:
            return [rgb for f in futures for rgb in f.result()]
        except BrokenProcessPool as err:
            self._broken(executor, err)
            return _decode_chunk(self.size, images)

    def _broken(self, executor: ProcessPoolExecutor | None, err: BaseException) -> None:
        """A worker died: the caller decodes in its thread; the pool starts afresh unless that happened already.

        Images submitted before the break (a read-ahead) find their pool broken too: they are decoded in
        the thread and counted, but restart nothing more.
        """
        self.fallbacks += 1
        if executor is not self._pool:
            return
        executor.shutdown(wait=False, cancel_futures=True)
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
