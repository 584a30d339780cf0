"""The PostgreSQL store's own guarantees: versioned migrations applied once, a server that is away or restarts,
and the settings and commands that point at it. What both backends share is in tests/test_store.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest
from helpers import LEARNING, colour_jpeg, latest_published, publish_colours, wait_for

from daemon.common.settings import ConfigError, Settings
from daemon.store import schema
from daemon.store.errors import StateDirError, StoreError, StoreUnavailable
from daemon.store.examples import Store
from daemon.store.location import StoreLocation
from daemon.store.reader import StoreReader, open_reader, stats
from daemon.store.records import Example
from daemon.tools.broker import free_port
from daemon.tools.postgres import PrivatePostgres


def example(name: str) -> Example:
    return Example(name, "healthy", "train", "image/jpeg", 8, 8, b"\xff\xd8" * 40, 0.0)


def test_a_new_database_gets_each_migration_once_from_writers_opening_it_together(postgres_store: StoreLocation):
    opened: list[Store] = []
    failed: list[BaseException] = []

    def open_store() -> None:
        try:
            opened.append(Store(postgres_store))
        except BaseException as err:
            failed.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed and len(opened) == 4
    assert sorted(len(s.applied) for s in opened) == [0, 0, 0, len(schema.MIGRATIONS)]  # one of them applied them
    reader = open_reader(postgres_store)
    rows = reader.query("SELECT version, summary FROM schema_migrations ORDER BY version")
    assert rows == [(m.version, m.summary) for m in schema.MIGRATIONS]
    assert opened[0].schema_version == schema.SCHEMA_VERSION


def test_pending_migrations_and_a_newer_schema_are_refused_saying_what_to_do(postgres_store: StoreLocation):
    with pytest.raises(StateDirError, match=r"lacks schema migration\(s\) 1, 2, 3, 4: run `sprout store migrate`"):
        Store(postgres_store, migrate=False)
    with pytest.raises(StoreError, match="no example store here yet .* run `sprout store migrate` first"):
        open_reader(postgres_store)
    Store(postgres_store).close()
    Store(postgres_store, migrate=False).close()  # nothing pending now
    with psycopg.connect(str(postgres_store.postgres_url), autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, summary) VALUES (99, 'from a newer Sprout')")
    with pytest.raises(StateDirError, match=f"store schema 99, this Sprout reads {schema.SCHEMA_VERSION}: upgrade"):
        Store(postgres_store)


def test_a_user_without_rights_on_the_database_is_told_what_it_needs(postgres_server: PrivatePostgres):
    url = postgres_server.create_database("locked_out")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE ROLE visitor LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    visitor = StoreLocation(postgres_url=url.replace("postgres@", "visitor@"))
    with pytest.raises(StateDirError, match="cannot set up the example store: permission denied .* docs/scale.md"):
        Store(visitor)


@pytest.fixture
def own_server():
    """A server of the test's own, which it may stop and start."""
    workdir = Path(tempfile.mkdtemp(prefix="sprout-postgres-"))
    server = PrivatePostgres(workdir).start()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_a_server_that_restarts_costs_one_failed_commit_and_no_read(own_server: PrivatePostgres):
    location = StoreLocation(postgres_url=own_server.create_database("restarts"))
    store = Store(location)
    reader = StoreReader(location)
    store.commit([example("before")])
    own_server.stop()
    own_server.start()
    assert [e.label for e in reader.after(0, 10)] == ["healthy"]  # the reader connects again by itself
    # The commit in flight when the connection went fails: intake keeps its batch un-acked and tries again.
    with pytest.raises(psycopg.OperationalError):
        store.commit([example("after")])
    assert store.commit([example("after")]).stored == 1
    assert stats(open_reader(location))["total"] == 2


def test_a_server_that_is_not_there_is_named_with_what_to_check():
    away = StoreLocation(postgres_url=f"postgresql://sprout@127.0.0.1:{free_port()}/sprout")
    with pytest.raises(
        StoreUnavailable, match=r"cannot connect to the example store: .*Connection refused.* \(check store.url"
    ):
        Store(away)


def test_the_settings_refuse_a_password_in_the_url_and_a_url_that_is_no_database():
    ok = Settings.load(None, {"store": {"url": "postgresql://sprout@db.lan:5432/sprout"}})
    assert StoreLocation.of_settings(ok).postgres_url == "postgresql://sprout@db.lan:5432/sprout"
    assert StoreLocation.of_settings(Settings.load(None, {})).sqlite_path is not None  # the default: SQLite
    with pytest.raises(ConfigError, match="store.url.*store.password_file"):
        Settings.load(None, {"store": {"url": "postgresql://sprout:hunter2@db.lan/sprout"}})
    with pytest.raises(ConfigError, match="store.url.*postgresql://user@host:port/database"):
        Settings.load(None, {"store": {"url": "mysql://db.lan/sprout"}})


def test_sprout_store_migrate_then_stats_on_a_postgresql_store(postgres_store: StoreLocation, tmp_path: Path):
    env = {**os.environ, "SPROUT_STORE__URL": str(postgres_store.postgres_url)}
    state = ["--state", str(tmp_path / "state")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "daemon.cli", *args, *state]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    first, again = run("store", "migrate"), run("store", "migrate")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "store": postgres_store.postgres_url,
        "applied": [m.version for m in schema.MIGRATIONS],
        "schema_version": schema.SCHEMA_VERSION,
    }
    assert json.loads(again.stdout)["applied"] == []
    Store(postgres_store).commit([example("one"), example("two")])
    shown = run("store", "stats")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["total"] == 2
    assert not (tmp_path / "state" / "examples.db").exists()  # nothing went to the SQLite default
    env["SPROUT_STORE__URL"] = f"postgresql://sprout@127.0.0.1:{free_port()}/sprout"
    away = run("store", "migrate")
    assert away.returncode == 69 and "cannot connect to the example store" in away.stderr


@pytest.mark.slow
def test_the_daemon_on_a_postgresql_store_learns_the_feed_and_publishes(
    postgres_store: StoreLocation, broker, daemon_factory
):
    """The README's main path with store.url set: intake commits to PostgreSQL, the learner and the export
    process read it, and nothing is written to the SQLite default."""
    env = {
        **LEARNING,
        "SPROUT_STORE__URL": str(postgres_store.postgres_url),
        "SPROUT_EXPORT__ENABLED": "true",
        "SPROUT_EXPORT__EVERY_EXAMPLES": "100",
        "SPROUT_EXPORT__EVERY_SECONDS": "3600",
    }
    d = daemon_factory(broker.url, env=env).start()

    publish_colours(broker.url, 150, 300.0)
    wait_for(
        lambda: (m := latest_published(d.state)) and m["version"] >= 1,
        120,
        f"a first published version (log: {d.log_path})",
    )
    reader = open_reader(postgres_store)
    assert stats(reader)["total"] == 150
    assert reader.scalar("SELECT COUNT(DISTINCT example_id) FROM examples") == 150
    assert not (d.state / "examples.db").exists()
    status = d.health()[1]
    assert status.get("learner") is True and status.get("exporter") is True
    assert d.stop() == 0


def test_import_and_label_commands_work_on_a_postgresql_store(
    postgres_store: StoreLocation, tmp_path: Path, monkeypatch, capsys
):
    """An agronomist's folder and a label fix, through the commands, with store.url set."""
    from daemon.cli import main

    photos = tmp_path / "photos"
    for label, colour in (("leaf rust", 0), ("healthy", 1)):
        (photos / label).mkdir(parents=True)
        for i in range(3):
            (photos / label / f"{i}.jpg").write_bytes(colour_jpeg(colour, 10 * colour + i))
    monkeypatch.setenv("SPROUT_STORE__URL", str(postgres_store.postgres_url))
    flags = ["--state", str(tmp_path / "state"), "--model", "leaves"]
    assert main(["store", "import", str(photos), *flags]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["stored"] == 6
    assert main(["labels", "rename", "leaf rust", "leaf_rust", *flags]) == 0
    assert "renamed 'leaf rust' to 'leaf_rust'" in capsys.readouterr().out
    assert stats(open_reader(postgres_store))["per_label"] == {"healthy": 3, "leaf_rust": 3}
    assert not (tmp_path / "state" / "examples.db").exists()
