"""The live metric store: SQLite in WAL mode, one long table of (step, stage, name, value, time).

WAL lets reports and `compare` read a run while training writes it. Rows are buffered in memory and
committed every `flush_seconds`: log() itself only copies two lists, the insert (mostly the name
index's cost) is paid in one transaction per flush, and a crash loses at most the
last `flush_seconds` of metrics. SQLite turns NaN into NULL; readers here turn
it back (inf and -inf are stored as they are). At the end of a run `compact` snapshots
everything to metrics.parquet, the portable copy.
"""

from __future__ import annotations

import math
import sqlite3
from fnmatch import fnmatchcase
from pathlib import Path
from time import monotonic
from time import time as wall_time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from glasslab.track.atomic import write_bytes_atomic
from glasslab.track.layout import METRICS_DB, METRICS_PARQUET

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("stage", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("time", pa.float64()),
    ]
)


class MetricStore:
    """Append-only metrics for one run; also usable read-only from another process while a run writes."""

    def __init__(self, path: Path, *, flush_every: int = 10_000, flush_seconds: float = 2.0):
        self.path = Path(path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        # timeout: wait for a concurrent commit instead of failing with "database is locked".
        self._conn = sqlite3.connect(self.path, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode cannot corrupt the database; a power cut may drop the last commits only.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._conn:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS metrics (step INTEGER, stage TEXT, name TEXT, value REAL, time REAL)"
            )
            self._conn.execute("CREATE INDEX IF NOT EXISTS metrics_name ON metrics(name)")
        # One entry per log() call: (step, stage, time, names, values). Rows are expanded at commit time,
        # which keeps log() to two list copies.
        self._pending: list[tuple[int, str, float, list[str], list[float]]] = []
        self._pending_rows = 0
        self._last_flush = monotonic()

    def log(self, step: int, stage: str, values: dict[str, float], time: float | None = None) -> None:
        """Buffer one step's values (tensors and numpy scalars are converted with float() now, so later
        in-place updates do not leak in). Hot path: no I/O except the periodic commit."""
        t = wall_time() if time is None else float(time)
        self._pending.append((int(step), stage, t, list(values), list(map(float, values.values()))))
        self._pending_rows += len(values)
        if self._pending_rows >= self.flush_every or monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit buffered rows so other readers see them."""
        if self._pending:
            rows = (
                (step, stage, name, value, t)
                for step, stage, t, names, values in self._pending
                for name, value in zip(names, values)
            )
            with self._conn:
                self._conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", rows)
            self._pending.clear()
            self._pending_rows = 0
        self._last_flush = monotonic()

    def close(self) -> None:
        self.flush()
        self._conn.close()

    def __enter__(self) -> MetricStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Readers see committed rows; this object's own buffer is flushed first so a writer reads its writes.

    def names(self) -> list[str]:
        self.flush()
        return [row[0] for row in self._conn.execute("SELECT DISTINCT name FROM metrics ORDER BY name")]

    def read(self, names: list[str] | None = None, pattern: str | None = None, stage: str | None = None) -> pa.Table:
        """Rows whose name is in `names` or matches the glob `pattern` (all rows if both are None),
        optionally of one stage, in canonical order (see `sort_metrics`)."""
        self.flush()
        query, params = "SELECT step, stage, name, value, time FROM metrics", []
        wanted = _select_names(self.names() if pattern is not None else [], names, pattern)
        clauses = []
        if wanted is not None:
            clauses.append(f"name IN ({', '.join('?' * len(wanted))})")
            params += wanted
        if stage is not None:
            clauses.append("stage = ?")
            params.append(stage)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        rows = self._conn.execute(query + " ORDER BY rowid", params).fetchall()
        columns = list(zip(*rows)) if rows else [[] for _ in SCHEMA]
        table = pa.table(dict(zip(SCHEMA.names, columns)), schema=SCHEMA)
        table = table.set_column(3, "value", pc.fill_null(table["value"], math.nan))  # NaN was stored as NULL
        return sort_metrics(table)

    def last(self, name: str) -> float | None:
        """The most recently logged value of `name`, or None if it was never logged."""
        self.flush()
        row = self._conn.execute(
            "SELECT value FROM metrics WHERE name = ? ORDER BY rowid DESC LIMIT 1", (name,)
        ).fetchone()
        if row is None:
            return None
        return math.nan if row[0] is None else row[0]

    def series(self, name: str, stage: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps int64, values float64) of one metric, ready to plot."""
        table = self.read([name], stage=stage)
        return table["step"].to_numpy(), table["value"].to_numpy()

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop rows of `stage` logged after `step`: a run resumed from an older checkpoint will log them again."""
        self.flush()
        with self._conn:
            self._conn.execute("DELETE FROM metrics WHERE stage = ? AND step > ?", (stage, int(step)))

    def compact(self, parquet_path: Path) -> None:
        """Snapshot every row to parquet (atomically), the format reports and other tools read."""
        sink = pa.BufferOutputStream()
        pq.write_table(self.read(), sink)
        write_bytes_atomic(Path(parquet_path), sink.getvalue().to_pybytes())


def sort_metrics(table: pa.Table) -> pa.Table:
    """Canonical row order: stages in order of first appearance, then step, then name (stable, so repeated
    rows keep their logging order). Parquet and SQLite reads of the same run give identical tables."""
    if table.num_rows == 0:
        return table
    rank = pc.index_in(table["stage"], value_set=pc.unique(table["stage"]))
    keys = [("stage_rank", "ascending"), ("step", "ascending"), ("name", "ascending")]
    return table.append_column("stage_rank", rank).sort_by(keys).drop_columns(["stage_rank"])


def read_metrics(
    run_path: Path, names: list[str] | None = None, pattern: str | None = None, stage: str | None = None
) -> pa.Table:
    """A run's metrics from metrics.db (live) if present, else metrics.parquet, else an empty table."""
    db, parquet = Path(run_path) / METRICS_DB, Path(run_path) / METRICS_PARQUET
    if db.exists():
        with MetricStore(db) as store:
            return store.read(names, pattern, stage)
    if not parquet.exists():
        return SCHEMA.empty_table()
    table = pq.read_table(parquet, schema=SCHEMA)
    wanted = _select_names(pc.unique(table["name"]).to_pylist(), names, pattern)
    if wanted is not None:
        table = table.filter(pc.is_in(table["name"], value_set=pa.array(wanted, pa.string())))
    if stage is not None:
        table = table.filter(pc.equal(table["stage"], stage))
    return table


def last_values(table: pa.Table) -> dict[str, float]:
    """The last value of every metric in a table (in canonical order: latest stage, highest step)."""
    return dict(zip(table["name"].to_pylist(), table["value"].to_pylist()))


def _select_names(available: list[str], names: list[str] | None, pattern: str | None) -> list[str] | None:
    """Names to keep, or None for all. Globs are matched in Python so SQLite and parquet agree exactly."""
    if names is None and pattern is None:
        return None
    wanted = set(names or ())
    if pattern is not None:
        wanted.update(n for n in available if fnmatchcase(n, pattern))
    return sorted(wanted)
