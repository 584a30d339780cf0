"""Photos as files in store.blob_dir: durable before the ack, read back by every reader, pruned with their rows,
on SQLite and PostgreSQL alike."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.ingest.wire import Example
from daemon.store.blobs import BlobFolder, blob_key
from daemon.store.errors import StateDirError, StoreError
from daemon.store.examples import Store
from daemon.store.location import StoreLocation
from daemon.store.reader import StoreReader, open_reader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def blob_location(store_location: StoreLocation, tmp_path: Path) -> StoreLocation:
    return dataclasses.replace(store_location, blob_dir=tmp_path / "photos")


def photo(i: int, split: str = "train", size: int = 5000, fill: int | None = None) -> Example:
    data = b"\xff\xd8" + bytes([(i if fill is None else fill) % 251]) * size
    return Example(f"p-{i}", ("rust", "blight")[i % 2], split, "image/jpeg", 8, 8, data, float(i))


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_photos_are_files_named_by_example_and_every_reader_reads_them(blob_location: StoreLocation):
    store = Store(blob_location)
    sent = [photo(i) for i in range(12)]
    assert store.commit(sent).stored == 12
    root = blob_location.blob_dir
    assert root is not None
    on_disk = files(root)
    assert on_disk == {blob_key(e.example_id): e.image for e in sent}  # one file each, whole, no temporary left
    rows = open_reader(blob_location).query("SELECT length(image), blob_bytes FROM examples ORDER BY seq")
    assert rows == [(0, len(e.image)) for e in sent]  # the database holds none of the photos' bytes
    reader = StoreReader(blob_location)
    assert [(e.label, e.image) for e in reader.after(0, 100)] == [(e.label, e.image) for e in sent]
    assert [e.image for e in reader.by_seq([3, 1])] == [sent[2].image, sent[0].image]
    # A redelivery carrying other bytes is a duplicate: the stored photo stays the one first acked.
    again = store.commit([photo(0, fill=99), photo(12)])
    assert (again.stored, again.duplicates) == (1, 1)
    assert BlobFolder(root).read(blob_key("p-0")) == sent[0].image
    assert store.stats()["total"] == 13


def test_retention_removes_the_pruned_rows_files_and_counts_their_bytes(blob_location: StoreLocation):
    cap = 2 * 2**20
    store = Store(blob_location)
    root = blob_location.blob_dir
    assert root is not None
    n = 0
    for _ in range(20):  # 20 commits of 100 ten-kB photos: ~20 MB offered to a 2 MB store
        store.commit([photo(n + k, "holdout" if (n + k) % 10 == 0 else "train", size=10_000) for k in range(100)])
        n += 100
        store.prune(cap)
        on_disk = files(root)
        assert store.used_bytes() >= sum(len(b) for b in on_disk.values())  # the files count against the cap
    assert store.pruned > 1500 and store.used <= cap
    stored = {r[0] for r in store._db.query("SELECT example_id FROM examples")}
    assert set(files(root)) == {blob_key(i) for i in stored}  # no file outlives its row, none is missing
    assert f"p-{n - 1}" in stored and "p-1" not in stored and len(stored) + store.pruned == n


def test_a_row_whose_file_retention_already_unlinked_is_skipped_and_counted(blob_location: StoreLocation):
    store = Store(blob_location)
    store.commit([photo(i) for i in range(4)])
    assert blob_location.blob_dir is not None
    BlobFolder(blob_location.blob_dir).remove([blob_key("p-1")])
    reader = StoreReader(blob_location)
    assert [e.seq for e in reader.after(0, 10)] == [1, 3, 4] and reader.photos_gone == 1
    assert [e.seq for e in reader.by_seq([2, 3])] == [3]


def test_a_reader_without_the_folder_and_a_folder_that_cannot_be_written_say_which_setting(
    blob_location: StoreLocation, tmp_path: Path
):
    Store(blob_location).commit([photo(1)])
    reader = StoreReader(dataclasses.replace(blob_location, blob_dir=None))
    with pytest.raises(StoreError, match="store.blob_dir is not set here"):
        reader.after(0, 10)
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StateDirError, match=r"store.blob_dir = .*a-file/photos: cannot write there"):
        Store(dataclasses.replace(blob_location, blob_dir=tmp_path / "a-file" / "photos"))


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from daemon.ingest.wire import Example
    from daemon.store.examples import Store
    from daemon.store.location import StoreLocation

    url, sqlite, blobs = sys.argv[1:4]
    store = Store(StoreLocation(postgres_url=url or None, sqlite_path=Path(sqlite) if sqlite else None,
                                blob_dir=Path(blobs)))
    n = 0
    while True:
        batch = [Example(f"k-{n + i}", "rust", "train", "image/jpeg", 8, 8, bytes([(n + i) % 251]) * 30_000, 0.0)
                 for i in range(20)]
        store.commit(batch)
        n += 20
        print(n, flush=True)  # acked: every one of them must be found after the kill
    """
)


def test_a_writer_killed_mid_commit_loses_no_acked_photo(blob_location: StoreLocation):
    assert blob_location.blob_dir is not None
    args = [blob_location.postgres_url or "", str(blob_location.sqlite_path or ""), str(blob_location.blob_dir)]
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], cwd=REPO, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert child.stdout is not None
    acked = 0
    for line in child.stdout:
        acked = int(line)
        if acked >= 200:
            break
    child.send_signal(signal.SIGKILL)  # wherever it is: writing a photo, fsyncing, inside the transaction
    child.wait()
    reader = StoreReader(blob_location)
    back = {e.seq: e for e in reader.after(0, 100_000)}
    ids: dict[int, str] = dict(reader._db.query("SELECT seq, example_id FROM examples"))
    assert len(back) == len(ids) >= acked and reader.photos_gone == 0
    for seq, e in back.items():
        n = int(ids[seq][2:])
        assert e.image == bytes([n % 251]) * 30_000  # whole: no row names a file it does not have in full


def test_the_setting_is_absolute_and_an_empty_one_keeps_photos_in_the_rows(tmp_path: Path, monkeypatch):
    from daemon.common.settings import Settings

    monkeypatch.chdir(tmp_path)
    assert Settings.load(None, {"store": {"blob_dir": "photos"}}).store.blob_dir == tmp_path / "photos"
    monkeypatch.setenv("SPROUT_STORE__BLOB_DIR", "")  # an environment file's unset variable
    settings = Settings.load(None)
    assert settings.store.blob_dir is None and StoreLocation.of_settings(settings).blob_dir is None
