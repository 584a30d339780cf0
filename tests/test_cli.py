"""The CLI as a person meets it: one model per state folder, quiet pipes, help that says what to expect."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import SPROUT


def sprout(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPROUT, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_state_folder_knows_its_model_and_refuses_another_name(broker, daemon_factory, tmp_path: Path):
    d = daemon_factory(broker.url, model="hb").start()
    assert d.stop() == 0
    state = str(d.state)
    assert (d.state / "model.json").is_file()
    # The default name (plant-disease) on hb's folder: it would have published a version no hb device sees.
    for args in (["export"], ["models", "list"], ["store", "stats"]):
        out = sprout(*args, "--state", state)
        assert out.returncode == 78, (args, out.stderr)
        assert "'hb'" in out.stderr and "'plant-disease'" in out.stderr and "--model hb" in out.stderr, out.stderr
    assert not (d.state / "registry" / "plant-disease").exists()
    assert sprout("store", "stats", "--state", state, "--model", "hb").returncode == 0
    # The daemon itself, started under another name on the folder.
    other = sprout("run", "--state", state, "--model", "other", "--broker", broker.url, "--http", "127.0.0.1:0")
    assert other.returncode == 78 and "'hb'" in other.stderr and "'other'" in other.stderr, other.stderr


def test_a_folder_from_before_model_json_is_told_by_its_registry(tmp_path: Path):
    (tmp_path / "registry" / "hb").mkdir(parents=True)
    out = sprout("models", "list", "--state", str(tmp_path))
    assert out.returncode == 78 and "holds model 'hb'" in out.stderr, out.stderr


def test_check_config_into_a_reader_that_went_away_exits_quietly(tmp_path: Path):
    # `sprout check-config F | head -1`: the reader closes the pipe before (or while) sprout writes.
    proc = subprocess.Popen(
        [*SPROUT, "check-config", "sprout.example.toml"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and err == "", err


def test_run_help_says_what_it_does_the_signals_the_exit_codes_and_the_settings_order():
    out = sprout("run", "--help")
    assert out.returncode == 0
    for needle in (
        "Run the daemon in the foreground",
        "SIGTERM",
        "SIGHUP",
        "exit status",
        "70",
        "78",
        "SPROUT_* variables",
        "--config FILE",
        "--log-level",
        "--model",
    ):
        assert needle in out.stdout, needle


def test_every_command_on_a_models_state_takes_model_and_config():
    for args in (
        ["run"],
        ["export"],
        ["store", "stats"],
        ["store", "import"],
        ["models", "list"],
        ["models", "show"],
        ["models", "rollback"],
        ["labels", "list"],
    ):
        out = sprout(*args, "--help")
        assert out.returncode == 0, (args, out.stderr)
        assert "--model" in out.stdout and "--config" in out.stdout and "--state" in out.stdout, args
    for args in (["run"], ["export"], ["demo"], ["feed"]):
        assert "--log-level" in sprout(*args, "--help").stdout, args


def test_a_store_that_cannot_work_stops_the_restart_loop_and_a_dead_part_does_not(tmp_path: Path):
    """Exit codes by exception type (daemon/common/exits.py): 78 tells systemd not to restart (a state folder
    Sprout cannot use, a store from a newer Sprout), where a restart could not help."""
    import sqlite3

    garbage, newer = tmp_path / "garbage", tmp_path / "newer"
    garbage.mkdir()
    (garbage / "examples.db").write_bytes(b"not a database, " * 512)
    newer.mkdir()
    with sqlite3.connect(newer / "examples.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '999')")
    for state, says in ((garbage, "cannot open the example store"), (newer, "store schema 999")):
        out = sprout("run", "--state", str(state), "--broker", "mqtt://127.0.0.1:9", "--http", "127.0.0.1:0")
        assert out.returncode == 78 and says in out.stderr, out.stderr
