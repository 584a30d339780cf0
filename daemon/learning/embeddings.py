"""The head mode's embedding cache: each example's backbone output computed once, kept on disk.

In head mode the backbone is frozen, so an example's embedding never
changes: replay and holdout evaluation read it back instead of running the
network again (the difference between ~100 and ~100,000 examples/s on a CPU).
Kept as float16 in its own SQLite file; it is only a cache (a lost write is
recomputed), and it is emptied when the backbone, its weights or the input
size change.

It follows the store's retention (``forget_pruned``): the vector of an
example retention deleted is deleted too, or the cache would grow by a few kB
per example for ever, past any ``store.max_mb``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np


class EmbeddingCache:
    def __init__(self, path: Path, key: str, embedding_size: int):
        self.path = path
        self.size = embedding_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # a cache: losing the last writes only costs recomputation
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS embeddings (seq INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'network'").fetchone()
            if row is None or row[0] != key:
                self._db.execute("DELETE FROM embeddings")
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('network', ?)", (key,))

    def get(self, seqs: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for seq, blob in self._db.execute(f"SELECT seq, vector FROM embeddings WHERE seq IN ({marks})", chunk):
                out[seq] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return out

    def put(self, vectors: dict[int, np.ndarray]) -> None:
        rows = [(seq, np.asarray(v, dtype=np.float16).tobytes()) for seq, v in vectors.items()]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings (seq, vector) VALUES (?, ?)", rows)

    def forget_pruned(self, frontiers: dict[str, int], stored_between: Callable[[int, int], list[int]]) -> int:
        """Delete the vectors of examples the store no longer holds; returns how many.

        ``frontiers``: per split, the oldest seq still stored (``StoreReader.retention_frontiers``);
        ``stored_between(low, high)``: the stored seqs in [low, high). Below the lower frontier every
        example is gone: one range delete. Between the two, an example is gone when it is not stored;
        each seq of that stretch is looked at once (the cache remembers how far it has looked), so a
        call costs about what retention deleted since the last one.
        """
        low, high = min(frontiers.values()), max(frontiers.values())
        row = self._db.execute("SELECT value FROM meta WHERE key = 'checked_through'").fetchone()
        start = max(low, int(row[0]) if row else 0)
        with self._db:
            removed = self._db.execute("DELETE FROM embeddings WHERE seq < ?", (low,)).rowcount
            if start < high:
                kept = stored_between(start, high)
                self._db.execute("CREATE TEMP TABLE IF NOT EXISTS kept (seq INTEGER PRIMARY KEY)")
                self._db.executemany("INSERT INTO kept (seq) VALUES (?)", ((s,) for s in kept))
                removed += self._db.execute(
                    "DELETE FROM embeddings WHERE seq >= ? AND seq < ? AND seq NOT IN (SELECT seq FROM kept)",
                    (start, high),
                ).rowcount
                self._db.execute("DELETE FROM kept")
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('checked_through', ?)", (str(max(start, high)),)
            )
        return removed

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        self._db.close()
