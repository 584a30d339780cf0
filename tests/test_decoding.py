"""The learner's decoding: a pool of decoder processes gives what the learner's thread gives, and survives a dead worker."""

from __future__ import annotations

import os
import signal

import numpy as np
import torch

from daemon.decoding import DecodePool, auto_workers
from daemon.imaging import load_rgb
from daemon.learner import Learner
from daemon.settings import ModelSettings, TrainingSettings
from daemon.store import StoredExample
from test_learner import colour_jpeg, make_learner, stream


def images(n: int) -> list[bytes]:
    return [colour_jpeg(i % 3, 1000 + i) for i in range(n)]


def test_the_pool_decodes_what_the_thread_decodes_in_order_and_flags_bad_images():
    data = images(21)
    data[5] = b"\xff\xd8\xff\xe0 not a jpeg"
    pool = DecodePool(32, workers=2)
    try:
        assert pool.in_processes
        got = pool.rgb(data)
    finally:
        pool.close()
    want = [load_rgb(d, 32) for d in data]
    assert got[5] is None and want[5] is None
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True) if w is not None)
    assert all(g.dtype == np.uint8 and g.shape == (32, 32, 3) for g in got if g is not None)


def test_a_dead_worker_costs_one_batch_in_the_thread_and_the_pool_starts_afresh():
    pool = DecodePool(32, workers=2)
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
    x = learner._network_input(rgb)
    mean = np.asarray(learner.spec.preprocessing.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(learner.spec.preprocessing.std, np.float32).reshape(3, 1, 1)
    want = (rgb.astype(np.float32).transpose(0, 3, 1, 2) / 255.0 - mean) / std
    assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, torch.from_numpy(want))

    # One learner decoding in its thread, one in two processes: the same embeddings, the same step.
    examples = [StoredExample(i + 1, f"class-{i % 2}", "train", d) for i, d in enumerate(images(8))]
    in_processes = Learner(ModelSettings(backbone="tiny", input_size=32),
                           TrainingSettings(mode="head", device="cpu", decode_workers=2), tmp_path / "p", reader)
    try:
        assert in_processes.decode_pool.in_processes and not learner.decode_pool.in_processes
        a, ok_a = learner._embeddings(examples, grad=False)
        b, ok_b = in_processes._embeddings(examples, grad=False)
    finally:
        in_processes.close()
    assert ok_a == ok_b == [True] * 8 and torch.equal(a, b)
