"""The learner's decoding: a pool of decoder processes gives what the learner's thread gives, and survives a dead worker."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LEARNING, colour_jpeg, last_checkpoint, metrics, publish_colours, wait_for
from learning_helpers import drive, make_learner, stream

from daemon.common.settings import ModelSettings, TrainingSettings
from daemon.learning import checkpoint
from daemon.learning.decoding import DecodePool, auto_workers
from daemon.learning.learner import Learner
from daemon.store.reader import StoredExample
from edge.preprocess import load_rgb


def images(n: int) -> list[bytes]:
    return [colour_jpeg(i % 3, 1000 + i) for i in range(n)]


def test_the_pool_decodes_what_the_thread_decodes_in_order_and_flags_bad_images():
    data = images(21)
    data[5] = b"\xff\xd8\xff\xe0 not a jpeg"
    pool = DecodePool(32, workers=2, slots=64)
    try:
        assert pool.in_processes
        got = pool.rgb(data)
        assert pool.short == 0 and len(pool._slab.free) == 64
    finally:
        pool.close()
    want = [load_rgb(d, 32) for d in data]
    assert got[5] is None and want[5] is None
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True) if w is not None)
    assert all(g.dtype == np.uint8 and g.shape == (32, 32, 3) for g in got if g is not None)


def test_a_dead_worker_costs_one_batch_in_the_thread_and_the_pool_starts_afresh():
    pool = DecodePool(32, workers=2, slots=32)
    try:
        pool.rgb(images(16))  # the workers are up
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        got = pool.rgb(images(16))
        assert all(g is not None for g in got) and len(got) == 16
        assert (pool.fallbacks, pool.restarts) == (1, 1) and pool.in_processes
        assert all(g is not None for g in pool.rgb(images(16)))  # the new pool decodes
        assert pool.fallbacks == 1
    finally:
        pool.close()


def test_workers_are_off_on_a_cpu_and_leave_two_cores_on_a_gpu():
    assert auto_workers("cpu", cores=64) == 0
    assert auto_workers("cuda", cores=16) == 14
    assert auto_workers("cuda", cores=2) == 1
    assert auto_workers("cuda", cores=96) == 16


def test_the_learner_input_is_the_normalised_image_and_decoder_processes_change_nothing(tmp_path):
    """uint8 to the device, normalised there: the same float32 values as (pixels / 255 - mean) / std in numpy."""
    learner, reader = make_learner(tmp_path, stream([0, 1], 5, seed=51))
    rgb = np.stack([load_rgb(d, 32) for d in images(4)])
    x = learner.inputs.network_input(rgb)
    mean = np.asarray(learner.spec.preprocessing.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(learner.spec.preprocessing.std, np.float32).reshape(3, 1, 1)
    want = (rgb.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, torch.from_numpy(want))

    # One learner decoding in its thread, one in two processes: the same embeddings, the same step.
    examples = [StoredExample(i + 1, f"class-{i % 2}", "train", d) for i, d in enumerate(images(8))]
    in_processes = Learner(
        ModelSettings(backbone="tiny", input_size=32),
        TrainingSettings(mode="head", device="cpu", decode_workers=2),
        tmp_path / "p",
        reader,
    )
    try:
        assert in_processes.inputs.decode_pool.in_processes and not learner.inputs.decode_pool.in_processes
        a, ok_a = learner.inputs.embeddings(examples, grad=False)
        b, ok_b = in_processes.inputs.embeddings(examples, grad=False)
    finally:
        in_processes.close()
    assert ok_a == ok_b == [True] * 8 and torch.equal(a, b)


def test_images_submitted_before_a_worker_died_are_decoded_in_the_thread_and_restart_the_pool_once():
    """A read-ahead is in flight when a worker dies: it and the next step's images both find the pool broken."""
    big = [colour_jpeg(i % 3, 2000 + i, size=224) for i in range(200)]
    pool = DecodePool(224, workers=2, slots=400)
    try:
        pool.rgb(images(16))  # the workers are up
        first, second = pool.submit(big), pool.submit(big)
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        assert all(g is not None for g in first.result()) and len(first.result()) == 200
        assert all(g is not None for g in second.result())
        assert (pool.fallbacks, pool.restarts) == (2, 1) and pool.in_processes  # the second one restarted nothing
        assert all(g is not None for g in pool.rgb(images(16)))
    finally:
        pool.close()


def test_workers_killed_at_any_moment_never_hang_the_learner():
    """Regression: with 8 decoded 224 px images (1.2 MB) per result through the executor's pipe, a worker
    killed half-way through writing one left ProcessPoolExecutor's manager thread in recv() for ever
    (CPython 3.11; a hung CI run, and 31 of 40 trials of this shape). Only flags cross the pipe now."""
    big = [colour_jpeg(i % 3, 4000 + i, size=256) for i in range(96)]
    rng = np.random.default_rng(7)
    pool = DecodePool(224, workers=2, slots=192)
    hung = None
    try:
        for trial in range(12):
            pool.rgb(images(16))  # the workers are up (unless the last trial's kills spent MAX_RESTARTS)
            if not pool.in_processes:  # a pool as a new learner would make it
                pool.close()
                pool = DecodePool(224, workers=2, slots=192)
                pool.rgb(images(16))
            first, second = pool.submit(big), pool.submit(big)
            time.sleep(float(rng.uniform(0, 0.15)))  # before, during or after the workers' results
            for pid in list(pool._pool._processes):
                os.kill(pid, signal.SIGKILL)
            got: list = []
            waiter = threading.Thread(
                target=lambda got=got, first=first, second=second: got.extend([first.result(), second.result()]),
                daemon=True,
            )
            waiter.start()
            waiter.join(60)
            if waiter.is_alive():
                hung = trial
                # Free the stuck manager thread so that the failure is reported and the run can exit:
                # with no writer left, its recv() ends.
                pool._pool._result_queue._writer.close()
                break
            assert all(len(r) == 96 and all(g is not None for g in r) for r in got)
            assert len(pool._slab.free) == 192  # every slot back: the killed workers are gone
    finally:
        pool.close()
    assert hung is None, f"trial {hung}: the pool hung after its workers were killed"


def weights(learner: Learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*learner.head.parameters(), *learner.backbone.parameters()]]


def test_reading_ahead_decodes_the_next_step_beside_this_one_and_learns_exactly_the_same(tmp_path):
    """Full fine-tuning, no replay: with the next step's images decoded in the pool during this step, every
    weight ends bit for bit where decoding in the thread, step by step, takes it."""
    examples = stream([0, 1, 2], 8, seed=61)
    ahead, reader = make_learner(tmp_path / "a", examples, mode="full", replay_ratio=0.0, decode_workers=2)
    try:
        assert ahead.reads_ahead
        expected = drive(ahead, reader, 4, read_ahead=True)
    finally:
        ahead.close()
    in_thread, reader = make_learner(tmp_path / "t", examples, mode="full", replay_ratio=0.0)
    assert not in_thread.reads_ahead
    drive(in_thread, reader, 4, read_ahead=False)
    assert ahead.trained == in_thread.trained == sum(e.split == "train" for e in examples)
    assert expected > 0 and ahead.inputs.read_ahead_decoded == expected and in_thread.inputs.read_ahead_decoded == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(ahead), weights(in_thread), strict=True))
    assert ahead.prequential.state() == in_thread.prequential.state()


def test_reading_ahead_with_replay_learns_every_example_once_and_decodes_replay_beside_the_step(tmp_path):
    examples = stream([0, 1], 12, seed=62)
    learner, reader = make_learner(tmp_path, examples, mode="full", replay_ratio=2.0, decode_workers=2)
    try:
        drive(learner, reader, 4, read_ahead=True)
    finally:
        learner.close()
    train = sum(e.split == "train" for e in examples)
    assert learner.trained == train and learner.high_water_mark == len(examples)
    assert learner.replayed > 0 and learner.inputs.undecodable == 0
    # Every new example but the first step's came decoded, and replayed ones with them.
    assert learner.inputs.read_ahead_decoded > train - 4


def test_the_learners_thread_tops_up_a_short_read_ahead_and_learns_every_example_once(tmp_path):
    from daemon.common.settings import Settings
    from daemon.learning.training import Training
    from daemon.store.examples import Store

    examples = stream([0, 1], 10, seed=63)
    store = Store(tmp_path / "examples.db")
    store.commit(examples)
    store.close()
    settings = Settings.load(
        None,
        {
            "state_dir": str(tmp_path),
            "model": {"backbone": "tiny", "input_size": 32},
            "training": {"device": "cpu", "batch_size": 4, "decode_workers": 2},
        },
    )
    training = Training(settings.model, settings.training, settings.state_dir)
    try:
        assert training.learner.reads_ahead
        batch = training._next_batch(4)
        assert [e.seq for e in batch] == [1, 2, 3, 4]
        short = training.reader.after(4, 4)[:2]  # only two more were stored when this step read ahead
        training.learn(batch, short)
        training._upcoming = (4, short)
        assert [e.seq for e in training._next_batch(4)] == [5, 6, 7, 8]  # the two read, then two more
        training._upcoming = (3, training.reader.after(3, 4))  # read for another position: not used
        assert [e.seq for e in training._next_batch(4)] == [5, 6, 7, 8]
        training.start()
        deadline = time.monotonic() + 30
        while training.learner.high_water_mark < len(examples) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert training.stop(time.monotonic() + 10)
    assert training.error is None
    assert training.learner.trained == sum(e.split == "train" for e in examples)
    assert training.learner.inputs.read_ahead_decoded > 0


def test_shared_slots_come_back_after_each_result_and_a_request_too_large_is_decoded_in_the_thread():
    pool = DecodePool(32, workers=2, slots=24)
    segment = Path("/dev/shm") / pool._slab.shm.name
    try:
        assert segment.exists()
        ahead = pool.submit(images(16))  # a read-ahead holds 16 slots...
        assert len(pool._slab.free) == 8
        beside = pool.submit(images(12)).result()  # ...so 12 more at once are decoded in the thread
        assert pool.short == 12 and all(g is not None for g in beside)
        pieces = pool.rgb(images(12))  # waiting for them, in pieces of the 8 free slots
        assert pool.short == 12 and all(np.array_equal(a, b) for a, b in zip(pieces, beside, strict=True))
        first = ahead.result()
        assert len(pool._slab.free) == 24 and ahead.result() is first  # freed once, kept
        again = pool.rgb(images(16))
        assert pool.short == 12  # the slots were free again
        # Copies, not views of the slots: a later decode into the same slots changes nothing here.
        pool.rgb(images(16)[::-1])
        assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))
    finally:
        pool.close()
    assert not segment.exists()  # unlinked at close


def test_a_dead_workers_slots_come_back_once_its_pool_is_gone():
    pool = DecodePool(224, workers=2, slots=256)
    try:
        pool.rgb(images(16))
        old = pool._pool
        decoding = pool.submit([colour_jpeg(i % 3, 3000 + i, size=224) for i in range(200)])
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        assert all(g is not None for g in decoding.result())
        # The broken pool's workers were joined before its 200 slots were handed back.
        assert old._processes is None and pool._pool is not old
        assert pool.restarts == 1 and len(pool._slab.free) == 256
        assert all(g is not None for g in pool.rgb(images(200)))  # the new workers map the same memory
    finally:
        pool.close()


def test_decoder_processes_and_their_shared_memory_go_with_a_killed_learner(tmp_path):
    """SIGKILL leaves no orphaned decoder and no segment in /dev/shm (outside systemd's cgroup kill too)."""
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from daemon.learning.decoding import DecodePool\n"
        "from helpers import colour_jpeg\n"
        "pool = DecodePool(32, workers=2, slots=16)\n"
        "pool.rgb([colour_jpeg(i % 3, 1000 + i) for i in range(16)])\n"
        "print(pool._slab.shm.name, *pool._pool._processes, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    tests = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tests.parent,
        env={**os.environ, "PYTHONPATH": f"{tests.parent}:{tests}"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    name, *workers = proc.stdout.split()
    assert len(workers) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        (Path("/dev/shm") / name).exists() or any(Path(f"/proc/{pid}").exists() for pid in workers)
    ):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a decoder outlived its learner"
    assert not (Path("/dev/shm") / name).exists(), "the shared pixels outlived the learner"


def test_shared_memory_larger_than_dev_shm_keeps_decoding_in_the_thread(caplog):
    import shutil as _shutil

    free = _shutil.disk_usage("/dev/shm").free
    too_many = free // (224 * 224 * 3) + 1
    pool = DecodePool(224, workers=1, slots=too_many)
    try:
        assert pool._slab is None and not pool.in_processes
        assert "no shared memory for decoded images" in caplog.text and "/dev/shm has" in caplog.text
        assert "decoding stays in the learner's thread" in caplog.text
        got = pool.rgb(images(4))
        assert all(np.array_equal(g, load_rgb(d, 224)) for g, d in zip(got, images(4), strict=True))
    finally:
        pool.close()


def test_a_pool_with_fewer_slots_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="at least 8 shared slots"):
        DecodePool(32, workers=1, slots=4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_learner_with_steps_smaller_than_a_chunk_still_gets_its_decoder_processes(tmp_path, batch_size):
    """Two steps of one or three images are fewer slots than a chunk: the learner asks for a chunk's worth."""
    examples = stream([0, 1], 6, seed=65)
    learner, reader = make_learner(
        tmp_path, examples, mode="full", replay_ratio=0.0, decode_workers=1, batch_size=batch_size
    )
    try:
        assert learner.inputs.decode_pool.in_processes and len(learner.inputs.decode_pool._slab.free) == 8
        drive(learner, reader, batch_size, read_ahead=True)
        assert learner.trained == sum(e.split == "train" for e in examples)
    finally:
        learner.close()


def test_a_read_ahead_that_no_step_uses_gives_its_shared_slots_back(tmp_path):
    examples = stream([0, 1], 10, seed=64)
    learner, reader = make_learner(tmp_path, examples, mode="full", replay_ratio=0.0, decode_workers=1)
    try:
        slots = len(learner.inputs.decode_pool._slab.free)
        batch = reader.after(0, 4)
        learner.learn_many(batch, reader.after(batch[-1].seq, 4))
        assert learner.inputs._ahead is not None and len(learner.inputs.decode_pool._slab.free) < slots
        learner.learn_many([])  # not the batch it was read for
        assert learner.inputs._ahead is None and len(learner.inputs.decode_pool._slab.free) == slots
    finally:
        learner.close()


def decoder_processes(daemon_pid: int) -> list[int]:
    """The daemon's spawned decoder workers (not its resource tracker or export process)."""
    from chaos.watch import children

    found = []
    for pid in children(daemon_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
def test_decoder_processes_killed_in_a_learning_daemon_cost_no_example(broker, daemon_factory):
    """The real daemon, full fine-tuning with two decoder processes, its workers SIGKILLed twice under a
    steady feed (as the kernel's OOM killer would): it keeps learning, every train example exactly once."""
    env = {**LEARNING, "SPROUT_TRAINING__MODE": "full", "SPROUT_TRAINING__DECODE_WORKERS": "2"}
    d = daemon_factory(broker.url, env=env).start()
    n = 480
    feeder = threading.Thread(target=publish_colours, args=(broker.url, n, 80.0), daemon=True)
    feeder.start()
    for kill in range(1, 3):
        # Listed after the previous restart was logged: the broken pool's workers were joined before it.
        workers = wait_for(lambda: decoder_processes(d.proc.pid), 30, "the daemon's decoder processes")
        time.sleep(0.5)  # mid-stream: the pool holds a read-ahead most of the time
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda k=kill: f"(restart {k} of 3)" in d.log(), 30, f"the pool's restart after kill {kill}")
    assert feeder.is_alive(), "the stream ended before the second kill; slow the feed"
    feeder.join(60)
    wait_for(lambda: (c := last_checkpoint(d)) and c.high_water_mark >= n and c, 60, "the learner to catch up")
    counts = metrics(d.http_port)
    assert d.stop() == 0
    final = checkpoint.load(d.state / "checkpoints")
    db = sqlite3.connect(d.state / "examples.db")
    train = db.execute("SELECT COUNT(*) FROM examples WHERE split = 'train'").fetchone()[0]
    assert final.trained == train and final.prequential["seen"] == train
    assert counts[("sprout_decoder_fallbacks_total", ())] >= 2  # each kill cost at least one batch in the thread
    assert counts[("sprout_images_decoded_ahead_total", ())] > 0
    assert d.log().count("a decoder process died") == 2 and "decoding stays in the learner's thread" not in d.log()
