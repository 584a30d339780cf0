"""Received images held in memory are bounded in bytes, not only in count: a burst of phone photos waits on the broker."""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request

import numpy as np
from helpers import stored_ids, wait_for
from PIL import Image

from daemon.ingest.feed import ByteBudget
from daemon.tools.feeder import Publisher


def test_the_budget_holds_the_network_thread_until_intake_gives_bytes_back():
    budget = ByteBudget(limit=1000)
    assert budget.take(600, lambda: True)
    taken = threading.Event()
    threading.Thread(target=lambda: budget.take(600, lambda: True) and taken.set(), daemon=True).start()
    assert not taken.wait(0.3)  # 1,200 bytes would be over the limit: it waits
    budget.give_back(600)
    assert taken.wait(2.0)
    assert budget.peak == 600 and budget.used == 600


def test_a_message_larger_than_the_budget_passes_alone_and_a_stop_ends_the_wait():
    budget = ByteBudget(limit=100)
    assert budget.take(5000, lambda: True)  # bigger than the limit, nothing else held: it must not wait forever
    stopping = time.monotonic() + 0.2
    assert budget.take(10, lambda: time.monotonic() < stopping) is False  # the daemon stops: give up waiting
    assert budget.used == 5000


def big_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_a_daemon_with_a_small_budget_stores_every_large_photo(broker, daemon_factory):
    """40 photos of ~300 KB through a 1 MB budget: the network thread waits for commits, nothing is lost."""
    d = daemon_factory(broker.url, env={"SPROUT_STORE__BACKLOG_MAX_MB": "1"}).start()
    images = [big_jpeg(i) for i in range(40)]
    assert sum(map(len, images)) > 7 * 1024 * 1024  # seven times the budget
    ids = [f"big-{i}" for i in range(40)]
    with Publisher(broker.url, window=64) as pub:
        for example_id, image in zip(ids, images, strict=True):
            assert pub.publish("sprout/leaves/examples", image, "rust", "image/jpeg", example_id)
        assert pub.wait_all_acked(30.0), pub.report
    wait_for(lambda: sorted(stored_ids(d.state)) == sorted(ids), 60, f"every photo stored (log: {d.log_path})")
    with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    peak = float(re.search(r"^sprout_intake_held_bytes_peak (\S+)$", metrics, re.M).group(1))
    assert 0 < peak <= 1024 * 1024 + max(map(len, images))  # the budget, plus the one that may pass alone
    assert d.stop() == 0
