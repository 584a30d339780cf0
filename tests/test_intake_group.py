"""Intake as a group: `sprout run --role intake` members share one feed through an MQTT shared subscription and
commit to one PostgreSQL store. A member SIGKILLed mid-feed and started again, as systemd would, loses no acked
example, and none is stored twice (docs/scale.md says what Mosquitto does with the dead member's messages)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess, metrics, publish_colours, wait_for

from daemon.common.settings import ConfigError, Settings
from daemon.store.location import StoreLocation
from daemon.store.reader import open_reader


def member(broker_url: str, store: StoreLocation, state: Path, name: str) -> DaemonProcess:
    return DaemonProcess(
        broker_url,
        state,
        env={
            "SPROUT_ROLE": "intake",
            "SPROUT_STORE__URL": str(store.postgres_url),
            # Two members on one host: each its own stable id, so each its own session at the broker.
            "SPROUT_MQTT__CLIENT_ID": f"sprout-leaves-intake-{name}",
        },
    )


def stored(store: StoreLocation) -> tuple[int, int]:
    db = open_reader(store)
    try:
        row = db.one("SELECT COUNT(*), COUNT(DISTINCT example_id) FROM examples")
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        db.close()


def stored_by(m: DaemonProcess) -> float:
    return metrics(m.http_port).get(("sprout_examples_stored_total", ()), 0.0)


@pytest.mark.slow
def test_two_intake_members_share_the_feed_and_one_killed_mid_feed_loses_nothing(broker, postgres_store, tmp_path):
    first = member(broker.url, postgres_store, tmp_path / "a", "a").start()
    second = member(broker.url, postgres_store, tmp_path / "b", "b").start()
    assert "learner" not in first.health()[1]  # an intake member loads no learner
    n = 600
    feeder = threading.Thread(target=publish_colours, args=(broker.url, n, 60.0), daemon=True)
    feeder.start()  # 10 s of feed, every message acked by the broker before the thread ends
    wait_for(lambda: stored(postgres_store)[0] > 100, 30, "the first examples stored")
    assert stored_by(first) > 0 and stored_by(second) > 0  # the group shares the feed
    first.kill()
    time.sleep(2)  # the feed goes on: Mosquitto queues the dead member's share in its session
    first.start()
    feeder.join(60)
    assert not feeder.is_alive()
    wait_for(lambda: stored(postgres_store)[0] >= n, 60, f"all {n} acked examples stored")
    time.sleep(1)  # anything stored twice would show now
    assert stored(postgres_store) == (n, n)  # none lost, none twice
    assert stored_by(first) > 0  # the restarted member took its session's queue
    assert first.stop() == 0 and second.stop() == 0
    assert "role intake" in first.log_path.read_text()


def test_an_intake_member_needs_a_shared_store_and_joins_the_group():
    with pytest.raises(ConfigError, match="role = 'intake' .* set store.url"):
        Settings.load(None, {"role": "intake"})
    s = Settings.load(None, {"role": "intake", "store": {"url": "postgresql://sprout@db.lan/sprout"}})
    assert s.mqtt.subscription(s.model.name) == "$share/sprout-intake/sprout/plant-disease/examples"
    assert s.client_id.startswith("sprout-plant-disease-intake-") and not s.training.enabled
    own = Settings.load(
        None, {"role": "intake", "store": {"url": "postgresql://s@db/s"}, "mqtt": {"share_group": "north"}}
    )
    assert own.mqtt.subscription("m") == "$share/north/sprout/m/examples"
