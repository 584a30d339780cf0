"""Decode stored images for the learner: in its own thread, or in a pool of decoder processes.

Pillow decodes, resizes and crops ~600 images a second per core (224 px
JPEGs of ~30 KB). On a 2-core box the backbone, not decoding, limits the
learner (~70 examples/s at 128 px in head mode), so decoding stays in the
learner's thread. On a GPU, a step of 64 images takes a few milliseconds and
one core's decoding would cap the learner near 600 images/s: there a pool of
``training.decode_workers`` processes decodes beside it.

Workers return uint8 RGB (H, W, 3) at the input size, a quarter of the bytes
of normalised float32; normalisation happens in torch on the learner's
device (``Inputs.network_input``, daemon/learning/inputs.py), the same float32 arithmetic as a device's.
The workers are spawned (not forked: the learner's process runs torch's
threads) and import only Pillow and numpy. A worker that dies (killed, out of
memory) breaks the pool: that batch is decoded in the learner's thread, the
pool is started afresh, and after ``MAX_RESTARTS`` breaks decoding stays in
the thread for good, with an error in the log.

Decoding beside the step is what takes it off the critical path: the
learner submits the next step's images (read ahead from the store) before it
runs this step, and collects them when that next step comes
(``Learner.learn_many(batch, upcoming)``). A step of 64 new and 256 replayed
224 px images is ~0.5 s of one core's decoding, and well under 0.1 s of a
GPU's step.

Pixels never cross a pipe, only one flag per image does: workers write into
shared memory. That is twice as fast (docs/benchmarks.md), and it is what
makes a killed worker safe: a result of a few flags is smaller than PIPE_BUF,
which POSIX writes atomically, so a worker killed while answering cannot
leave the pool waiting for the rest of a result (docs/reliability.md,
"A killed decoder"). Without room in shared memory, or with the slots all
taken, images are decoded in the learner's thread instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from daemon.common.parent_death import die_with_parent
from edge.preprocess import load_rgb

log = logging.getLogger("sprout.learner")

MAX_RESTARTS = 3
# Images per task sent to a worker: large enough that scheduling (~100 us a task) stays small beside
# decoding (~0.7 ms an image at 224 px), small enough to spread a batch of 64 over 8 workers.
CHUNK = 8


def auto_workers(device_type: str, cores: int | None = None) -> int:
    """``decode_workers = "auto"``: none on a CPU (the backbone is the limit), else every core but two, up to 16.

    Two cores stay with intake (the MQTT thread and SQLite commits) and the learner's own thread.
    """
    if device_type == "cpu":
        return 0
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(16, cores - 2))


def _decode_here(size: int, images: Sequence[bytes]) -> list[np.ndarray | None]:
    return [load_rgb(data, size) for data in images]


# -- in a worker process -----------------------------------------------------------------------

_slab: shared_memory.SharedMemory | None = None
_pixels: np.ndarray | None = None


def _start_worker(parent: int, slab: tuple[str, int, int]) -> None:
    """Worker initializer: die with the learner's process, and map the pool's shared pixels.

    Spawned workers share the learner's resource tracker, which already knows the segment: only the
    learner's process unlinks it (at close), or the tracker once that process and its workers are gone.
    """
    global _slab, _pixels
    die_with_parent(parent, 1)
    name, slots, size = slab
    _slab = shared_memory.SharedMemory(name=name)
    _pixels = np.ndarray((slots, size, size, 3), np.uint8, _slab.buf)


def _decode_into(size: int, images: Sequence[bytes], slots: Sequence[int]) -> list[bool]:
    """Decode into the shared slots; only one flag per image goes back through the pipe (see the module's
    docstring: a result this small is written atomically, so a worker killed while writing it loses all
    of it, never half)."""
    pixels = _pixels
    assert pixels is not None  # mapped by _start_worker, the pool's initializer
    ok = []
    for data, slot in zip(images, slots, strict=True):
        rgb = load_rgb(data, size)
        if rgb is not None:
            pixels[slot] = rgb
        ok.append(rgb is not None)
    return ok


# -- in the learner's process ------------------------------------------------------------------


class _Slab:
    """Shared memory holding ``slots`` decoded images, handed out slot by slot."""

    def __init__(self, slots: int, size: int):
        self.slots, self.size = slots, size
        nbytes = slots * size * size * 3
        # tmpfs allocates pages as they are written: a segment larger than /dev/shm's free space is
        # created, and a worker writing into it later dies of SIGBUS. Refuse it here instead.
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize < nbytes:
            raise OSError(f"/dev/shm has {shm.f_bavail * shm.f_frsize // 2**20} MB free")
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.pixels = np.ndarray((slots, size, size, 3), np.uint8, self.shm.buf)
        self.free = list(range(slots - 1, -1, -1))

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def give(self, slots: Sequence[int]) -> None:
        self.free.extend(slots)

    def close(self) -> None:
        del self.pixels  # no view may outlive the mapping
        self.shm.close()
        self.shm.unlink()


@dataclass(frozen=True)
class _Sent:
    """Images handed to the workers: a future per chunk, the pool that has them, the slots they decode into."""

    futures: list[Future[list[bool]]]
    executor: ProcessPoolExecutor
    slab: _Slab
    slots: list[int]


class Decoding:
    """Images on their way through the pool; ``result()`` waits for them (or, when not sent, decodes them)."""

    def __init__(self, pool: DecodePool, images: Sequence[bytes], sent: _Sent | None):
        self._pool = pool
        self._images = images
        self._sent = sent
        self._result: list[np.ndarray | None] | None = None

    def result(self) -> list[np.ndarray | None]:
        if self._result is None:
            self._result = self._pool._collect(self._images, self._sent)
            if self._sent is not None:
                self._sent.slab.give(self._sent.slots)  # copied out, or their pool's workers are gone: free again
            self._sent = None
        return self._result


class DecodePool:
    """``rgb(images)``: uint8 (size, size, 3) per image, None for one that does not decode.

    ``submit(images)`` starts decoding and returns at once, so that the workers decode the next step's
    images while the learner's thread runs this one (``Learner`` reads ahead this way).

    Workers write pixels into ``slots`` images' worth of shared memory (150 KB each at 224 px); only a
    flag per image crosses the pipe. A submit larger than the free slots is decoded in the learner's
    thread when its result is asked for (counted in ``short``); a host without room in /dev/shm decodes
    everything there.
    """

    def __init__(self, input_size: int, workers: int, slots: int):
        self.size = input_size
        self.workers = workers
        self.restarts = 0
        self.fallbacks = 0  # batches decoded in the learner's thread after the pool broke
        self.short = 0  # images decoded in the learner's thread because every slot was taken
        self._pool: ProcessPoolExecutor | None = None
        self._slab: _Slab | None = None
        if workers <= 0:
            return
        if slots < CHUNK:
            raise ValueError(f"a pool of decoder processes needs at least {CHUNK} shared slots, got {slots}")
        try:
            self._slab = _Slab(slots, input_size)
        except OSError as err:
            log.warning(
                "no shared memory for decoded images (%s): decoding stays in the learner's thread, "
                "slower on a GPU; is /dev/shm mounted with %d MB free?",
                err,
                slots * input_size * input_size * 3 // 2**20,
            )
            return
        self._start(self._slab)

    def _start(self, slab: _Slab) -> None:
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(), (slab.shm.name, slab.slots, slab.size)),
        )

    @property
    def in_processes(self) -> bool:
        return self._pool is not None

    def rgb(self, images: Sequence[bytes]) -> list[np.ndarray | None]:
        """Decode and wait. More images than free slots (a holdout evaluation beside a read-ahead) go in
        pieces that fit them."""
        slab = self._slab  # set whenever a pool runs
        if self._pool is None or slab is None or len(images) <= 1:
            return self.submit(images).result()
        free = len(slab.free)
        if len(images) <= free or free < CHUNK:
            return self.submit(images).result()
        out: list[np.ndarray | None] = []
        for i in range(0, len(images), free):
            out += self.submit(images[i : i + free]).result()
        return out

    def submit(self, images: Sequence[bytes]) -> Decoding:
        executor, slab = self._pool, self._slab  # a pool runs only with its slab
        if executor is None or slab is None or len(images) <= 1:
            return Decoding(self, images, None)
        slots = slab.take(len(images))
        if slots is None:
            self.short += len(images)
            return Decoding(self, images, None)
        try:
            futures = [
                executor.submit(_decode_into, self.size, images[i : i + CHUNK], slots[i : i + CHUNK])
                for i in range(0, len(images), CHUNK)
            ]
        except BrokenProcessPool as err:
            slab.give(slots)
            self._broken(executor, slab, err)
            return Decoding(self, images, None)
        return Decoding(self, images, _Sent(futures, executor, slab, slots))

    def _collect(self, images: Sequence[bytes], sent: _Sent | None) -> list[np.ndarray | None]:
        if sent is None:
            return _decode_here(self.size, images)
        try:
            done = [item for f in sent.futures for item in f.result()]
        except BrokenProcessPool as err:
            self._broken(sent.executor, sent.slab, err)
            return _decode_here(self.size, images)
        block = sent.slab.pixels[sent.slots]  # one copy out of the slots (fancy indexing copies)
        return [block[i] if ok else None for i, ok in enumerate(done)]

    def _broken(self, executor: ProcessPoolExecutor, slab: _Slab, err: BaseException) -> None:
        """A worker died: the caller decodes in its thread; the pool starts afresh unless that happened already.

        Images submitted before the break (a read-ahead) find their pool broken too: they are decoded in
        the thread and counted, but restart nothing more.

        The broken pool's workers are waited for (the executor terminates and joins them; milliseconds),
        so that none still writes into the slots the next pool hands out.
        """
        self.fallbacks += 1
        if executor is not self._pool:
            return
        executor.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        if self.restarts < MAX_RESTARTS:
            self.restarts += 1
            log.warning(
                "a decoder process died (%s): this batch decodes in the learner's thread, and the "
                "pool of %d starts afresh (restart %d of %d)",
                err,
                self.workers,
                self.restarts,
                MAX_RESTARTS,
            )
            self._start(slab)
        else:
            log.error(
                "decoder processes died %d times: decoding stays in the learner's thread (slower on "
                "a GPU); see the kernel log for why they die (out of memory?)",
                self.restarts + 1,
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._slab is not None:
            self._slab.close()
            self._slab = None
