"""The id ↔ path ↔ metadata table of a search index, in SQLite.

One table, ``items(id INTEGER PRIMARY KEY, path TEXT, metadata TEXT)``: the id is the
row of the vector in ``vectors.f32`` and the FAISS id; ``metadata`` is a JSON object.
A second table, ``hidden(id)``, lists removed ids that an index type without removal
(HNSW) still holds, so that searches skip them until a rebuild.  Reads and writes go
through one connection guarded by a lock, so one :class:`ItemTable` may serve several
threads (a web service).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["ItemTable"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS hidden (id INTEGER PRIMARY KEY);
"""


class ItemTable:
    """Paths and metadata of the indexed vectors, by id (a SQLite file).

    Parameters
    ----------
    path : str or Path
        The SQLite file; created with its tables when ``create``.
    create : bool, default False
        Create the file; otherwise it must exist and hold the tables.

    Raises
    ------
    DataError
        The file is missing, not SQLite, or lacks the tables.
    """

    def __init__(self, path, *, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"{self.path}: missing (the index folder is incomplete)")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if create:
                self._db.executescript(_SCHEMA)
            else:
                self._db.execute("SELECT id, path, metadata FROM items LIMIT 1").fetchall()
                self._db.execute("SELECT id FROM hidden LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a readable item table ({e})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args=()) -> list:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: {e}") from None

    def insert(self, ids, paths, metadata) -> None:
        """Add rows ``(id, path, metadata dict)`` in one transaction."""
        rows = [(int(i), str(p), json.dumps(m or {}, sort_keys=True, default=str))
                for i, p, m in zip(ids, paths, metadata)]
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany("INSERT INTO items (id, path, metadata) VALUES (?, ?, ?)", rows)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: {e}") from None

    def delete(self, ids, *, hide: bool) -> None:
        """Delete the rows of ``ids``; with ``hide``, list them in ``hidden`` too."""
        ids = [(int(i),) for i in ids]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM items WHERE id = ?", ids)
            if hide:
                self._db.executemany("INSERT OR IGNORE INTO hidden (id) VALUES (?)", ids)
            self._db.execute("COMMIT")

    def clear_hidden(self) -> None:
        self._run("DELETE FROM hidden")

    def hidden(self) -> np.ndarray:
        """Removed ids still in the FAISS index (int64)."""
        return np.array([r[0] for r in self._run("SELECT id FROM hidden ORDER BY id")], np.int64)

    def count(self) -> int:
        return int(self._run("SELECT COUNT(*) FROM items")[0][0])

    def ids(self) -> np.ndarray:
        """Every id, ascending (int64)."""
        return np.array([r[0] for r in self._run("SELECT id FROM items ORDER BY id")], np.int64)

    def ids_of_paths(self, paths) -> dict[str, list[int]]:
        """``{path: [ids]}`` for the given paths that are in the table."""
        found: dict[str, list[int]] = {}
        paths = [str(p) for p in paths]
        for s in range(0, len(paths), 500):
            part = paths[s:s + 500]
            marks = ",".join("?" * len(part))
            for i, p in self._run(f"SELECT id, path FROM items WHERE path IN ({marks})", part):
                found.setdefault(p, []).append(int(i))
        return found

    def lookup(self, ids) -> dict[int, tuple[str, dict]]:
        """``{id: (path, metadata)}`` for the given ids that are in the table."""
        ids = sorted({int(i) for i in ids})
        out: dict[int, tuple[str, dict]] = {}
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            marks = ",".join("?" * len(part))
            for i, p, m in self._run(f"SELECT id, path, metadata FROM items WHERE id IN ({marks})", part):
                out[int(i)] = (p, json.loads(m))
        return out

    def all_rows(self) -> list[tuple[int, str, dict]]:
        """Every ``(id, path, metadata)``, by id."""
        return [(int(i), p, json.loads(m))
                for i, p, m in self._run("SELECT id, path, metadata FROM items ORDER BY id")]
