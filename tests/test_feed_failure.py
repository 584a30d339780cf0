"""A feed that can no longer receive is never reported healthy: /healthz, the watchdog's judge, the metrics and the
main loop all see it, and the daemon exits 70 so that its service manager restarts it.

The daemon runs in-process here, against a Mosquitto of the test's own, so that the test can break paho's network
thread from inside: once with an exception that escapes paho's callback (the thread ends, the socket still looks
connected), once with a failure inside Sprout's own callback (caught, logged, the feed marked failed).
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request

import pytest
from helpers import publish_examples, stored_ids, wait_for

from daemon.common.exits import Exit
from daemon.common.settings import Settings
from daemon.service.daemon import Daemon


@pytest.fixture
def daemon(broker, tmp_path):
    settings = Settings.load(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "mqtt": {"broker": broker.url, "client_id": "sprout-feed-failure"},
            "model": {"name": "leaves"},
            "server": {"http": "127.0.0.1:0"},
            "training": {"enabled": False},
        },
    )
    d = Daemon(settings)
    d.startup()
    wait_for(d.feed.subscribed.is_set, 10, "the feed to subscribe")
    yield d
    d.shutdown()


def get(d: Daemon, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{d.http_address}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def broker_connected(d: Daemon) -> float:
    text = get(d, "/metrics")[1].decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("sprout_broker_connected ")))


def publish(url: str, example_id: str) -> None:
    publish_examples(url, "leaves", [example_id], ["rust"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the kill, on purpose
def test_a_network_thread_killed_from_inside_is_seen_everywhere_and_exits_70(broker, daemon):
    d = daemon
    publish(broker.url, "before")
    wait_for(lambda: stored_ids(d.settings.state_dir) == ["before"], 10, "the first example")
    assert get(d, "/healthz")[0] == 200 and broker_connected(d) == 1.0

    def escapes(client, userdata, message):  # not Sprout's guarded callback: paho re-raises, its thread ends
        raise RuntimeError("killed from inside")

    network = d.feed._client._thread
    d.feed._client.on_message = escapes
    publish(broker.url, "kills")
    network.join(10)
    assert not network.is_alive()

    status, body = get(d, "/healthz")
    assert status == 503 and json.loads(body)["feed"] is False
    assert broker_connected(d) == 0.0
    assert "feed" in d.liveness.stalls(time.monotonic(), d.intake, d.training, d.exporting, d.feed)
    assert "FAILED (the MQTT network thread has ended)" in d.status_line()
    started = time.monotonic()
    assert d.main_loop(None) == Exit.SOFTWARE
    assert time.monotonic() - started < 2


def test_a_failure_inside_sprouts_own_callback_marks_the_feed_failed(broker, daemon, caplog):
    d = daemon

    class Broken(queue.Queue):
        def put(self, item, block=True, timeout=None):
            raise OSError("a defect past parsing")

    d.feed.deliveries = Broken()
    publish(broker.url, "breaks")
    wait_for(lambda: d.feed.problem(), 10, "the feed to be marked failed")
    assert "OSError: a defect past parsing" in d.feed.problem()
    assert d.feed._client._thread is not None  # the thread lives on: the exception never reached paho
    assert "MQTT callback on_message failed" in caplog.text
    assert get(d, "/healthz")[0] == 503
    metrics = get(d, "/metrics")[1].decode()
    assert "sprout_mqtt_callback_errors_total 1.0" in metrics
    assert 'sprout_part_healthy{part="feed"} 0.0' in metrics
    assert d.main_loop(None) == Exit.SOFTWARE
