"""The fixtures the test modules share: a Mosquitto per test on a free port, a private PostgreSQL for the session (a
database per test), the daemon as a real process, a service manager's notify socket, a signed registry, and one tiny
classifier trained for a module."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from faulty_link import FaultyLink
from helpers import DaemonProcess
from registry_helpers import public_key_file
from systemd_socket import SystemdSocket

from daemon.registry.signing import Signer
from daemon.registry.versions import Registry, registry_root
from daemon.store.location import StoreLocation
from daemon.tools.broker import Mosquitto
from daemon.tools.postgres import PostgresError, PrivatePostgres

# Under CI a test skipped for a reason set-up should have removed fails the run (tests/skip_gate.py).
pytest_plugins = ["skip_gate"]


@pytest.fixture
def broker(tmp_path: Path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture(scope="session")
def postgres_server():
    # Not under pytest's temporary folder: it is private to root, and the server runs as 'postgres'.
    workdir = Path(tempfile.mkdtemp(prefix="sprout-postgres-"))
    try:
        server = PrivatePostgres(workdir).start()
    except PostgresError as err:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(str(err))
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_store(postgres_server: PrivatePostgres) -> StoreLocation:
    """A new, empty PostgreSQL database on the session's server."""
    return StoreLocation(postgres_url=postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path: Path) -> StoreLocation:
    """Each store backend in turn: the tests that take it run against both."""
    if request.param == "sqlite":
        return StoreLocation(sqlite_path=tmp_path / "examples.db")
    return request.getfixturevalue("postgres_store")


@pytest.fixture
def daemon_factory(tmp_path: Path):
    started: list[DaemonProcess] = []

    def make(broker_url: str, **kwargs) -> DaemonProcess:
        d = DaemonProcess(broker_url, kwargs.pop("state", tmp_path / "state"), **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def systemd():
    """A service manager's notify socket; ``systemd.env()`` is what the daemon needs to speak to it."""
    # A path socket in a short folder: AF_UNIX paths end at 108 bytes, and pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="sprout-notify-", dir="/tmp"))
    s = SystemdSocket(str(folder / "notify"))
    yield s
    s.close()
    (folder / "notify").unlink(missing_ok=True)
    folder.rmdir()


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    """A new signing key in ``tmp_path/keys``, its public half beside it (``signer.path.with_suffix(".pub")``)."""
    return Signer.load_or_create(tmp_path / "keys" / "signing.key")


@pytest.fixture
def registry(tmp_path: Path, signer: Signer) -> Registry:
    """An empty registry of the model "leaves" where a daemon with state ``tmp_path/state`` keeps it, keeping the
    newest 3 versions."""
    return Registry(registry_root(tmp_path / "state"), "leaves", signer, keep_versions=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained on three colours, and labelled holdout images as an app would send them:
    (the model to convert, the images, their label indices, 32 calibration images)."""
    # Imported here: the learner and the converter bring torch, which most test modules never load.
    import numpy as np
    from learning_helpers import learn_all, make_learner, stream

    from daemon.export.converter import snapshot
    from edge.preprocess import load_rgb

    tmp = tmp_path_factory.mktemp("export")
    examples = stream([0, 1, 2], 40, seed=21, order="iid")
    learner, reader = make_learner(tmp, examples)
    learn_all(learner, reader)
    holdout = [e for e in examples if e.split == "holdout"]
    images = np.stack([load_rgb(e.image, 32) for e in holdout])
    labels = np.array([learner.labels.index(e.label) for e in holdout])
    calibration = [load_rgb(e.image, 32) for e in examples if e.split == "train"][:32]
    model = snapshot(learner.backbone, learner.head, learner.spec.preprocessing)
    return model, images, labels, calibration


# The device side's fixtures: the publisher's public key as a file, the real download API over the
# `registry` behind a link that can cut, slow or alter answers (tests/faulty_link.py), and a device folder.
@pytest.fixture
def public_key(signer: Signer) -> Path:
    return public_key_file(signer)


@pytest.fixture
def link(registry: Registry):
    m = FaultyLink(registry.root).start()
    yield m
    m.stop()


@pytest.fixture
def device(tmp_path: Path) -> Path:
    return tmp_path / "device"
