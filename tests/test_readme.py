"""The README as a newcomer reads it: its example messages reach the daemon, its commands exist, it stays short."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helpers import SPROUT, TFLITE_VENV, colour_jpeg, jpeg, wait_for

README = Path(__file__).parent.parent / "README.md"


def block_after(marker: str) -> str:
    """The shell block that follows ``<!-- readme-test: marker -->``, with its continuation lines joined."""
    text = README.read_text()
    found = re.search(rf"<!-- readme-test: {marker} -->\n```sh\n(.*?)```", text, re.S)
    assert found, f"README has no block marked {marker}"
    return found.group(1).replace("\\\n", " ")


def test_the_readmes_example_messages_are_stored_as_sent(broker, daemon_factory, tmp_path: Path):
    """The mosquitto_pub lines a feed in any language would copy: MQTT v5 properties, and the JSON fallback."""
    from daemon.store.reader import open_reader

    d = daemon_factory(broker.url, model="plant-disease").start()
    (tmp_path / "leaf.jpg").write_bytes(jpeg(7, size=64))
    script = block_after("send").replace("-p 1883", f"-p {broker.port}")
    assert script.count("mosquitto_pub") == 2
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr

    def stored() -> list[tuple[str, str]]:
        db = open_reader(d.state / "examples.db")
        try:
            return db.query("SELECT label, content_type FROM examples")
        finally:
            db.close()

    # The same image and label twice, without an example_id: the id is a hash of both, so it is stored once.
    wait_for(lambda: stored() == [("leaf_rust", "image/jpeg")], 20, f"the README's example (log: {d.log_path})")
    db = open_reader(d.state / "examples.db")
    try:
        assert db.scalar("SELECT COUNT(*) FROM rejections") == 0  # neither line was refused
    finally:
        db.close()
    assert d.stop() == 0


def test_every_command_in_the_readmes_table_exists():
    table = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(sprout(?:-edge)? [a-z-]+)(?: ([a-z|\\]+))?", table, re.M)
    assert len(rows) >= 10
    for command, subcommands in rows:
        program, name = command.split(" ", 1)
        binary = [*SPROUT] if program == "sprout" else [str(TFLITE_VENV / "bin" / "sprout-edge")]
        for sub in [s for s in subcommands.replace("\\", "").split("|") if s] or [None]:
            args = [*binary, name, *([sub] if sub else []), "--help"]
            out = subprocess.run(args, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (args, out.stderr)


def test_no_paragraph_of_the_readme_runs_past_about_120_words():
    paragraphs = re.split(r"\n\s*\n", README.read_text())
    prose = [p for p in paragraphs if not p.lstrip().startswith(("```", "|", "<!--", "- ", "#"))]
    long = [(len(p.split()), p[:60]) for p in prose if len(p.split()) > 125]
    assert not long, long


def test_your_own_photos_end_to_end_as_the_readme_walks_it(broker, tmp_path: Path):
    """The walkthrough, from a folder of one's own: `sprout run` on its default state (./var, relative, in a
    folder of the user's), `sprout store import`, the status page, `sprout-edge sync` and `classify`."""
    import json
    import os
    import urllib.request

    from daemon.registry.versions import Registry, registry_root
    from daemon.tools.broker import free_port

    for c, name in enumerate(["healthy", "leaf_rust", "leaf_spot"]):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(100):
            (folder / f"IMG_{i:04d}.jpg").write_bytes(colour_jpeg(c, 1000 * c + i))
    http = f"127.0.0.1:{free_port()}"
    # The defaults, but a tiny network and the test's own broker and port: this machine may run another Sprout.
    env = {
        **os.environ,
        "SPROUT_MODEL__BACKBONE": "tiny",
        "SPROUT_MODEL__INPUT_SIZE": "32",
        "SPROUT_TRAINING__BATCH_SIZE": "8",
        "SPROUT_TRAINING__LEARNING_RATE": "0.1",
        "SPROUT_TRAINING__CHECKPOINT_EVERY_S": "0.5",
    }
    log = open(tmp_path / "run.log", "w")
    daemon = subprocess.Popen(
        [*SPROUT, "run", "--model", "leaves", "--broker", broker.url, "--http", http],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _status(f"http://{http}/healthz") == 200, 60, "the daemon to start")
        imported = subprocess.run(
            [*SPROUT, "store", "import", "--model", "leaves", "photos/"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert imported.returncode == 0, imported.stderr
        assert json.loads(imported.stdout)["stored"] == 300
        state = tmp_path / "var"  # the README's default, resolved against where the user stands
        manifest = wait_for(
            lambda: Registry.open_readonly(registry_root(state), "leaves").latest(),
            180,
            f"the first model (log: {log.name})",
        )
        assert sorted(manifest["labels"]) == ["healthy", "leaf_rust", "leaf_spot"]
        with urllib.request.urlopen(f"http://{http}/", timeout=10) as page:
            assert "leaf_rust" in page.read().decode()
        edge = str(TFLITE_VENV / "bin" / "sprout-edge")
        synced = subprocess.run(
            [
                edge,
                "sync",
                "--url",
                f"http://{http}",
                "--model",
                "leaves",
                "--dir",
                "./phone",
                "--public-key",
                "var/signing/signing.pub",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert synced.returncode == 0, synced.stderr
        (tmp_path / "new-leaf.jpg").write_bytes(colour_jpeg(1, 99_999))
        classified = subprocess.run(
            [edge, "classify", "--dir", "./phone", "new-leaf.jpg", "--top", "3", "--json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert classified.returncode == 0, classified.stderr
        assert json.loads(classified.stdout)["results"][0]["top"][0]["label"] == "leaf_rust"
    finally:
        daemon.terminate()
        code = daemon.wait(60)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]


def _status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0
