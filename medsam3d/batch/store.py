"""The batch's results database: SQLite, one transaction per study.

``OUTDIR/results.sqlite`` holds five tables:

- ``runs``: one row per invocation (engine, workers, counts, start and end);
- ``studies``: one row per case, its status (``done`` or ``failed``), the hash key its
  result was computed from, its record (JSON) and its files;
- ``lesions``: one row per object of a done study (volume, range, RECIST axes, centroid, flags);
- ``measurements``: one row per connected component (``component`` 0 is the whole object);
- ``failures``: every failure of every run, with its stage and one-line error;
- ``registrations``: each follow-up's registration onto its baseline, keyed by both studies'
  keys, so that a re-run does not register again what has not changed;
- ``file_hashes``: each input file's SHA-256 with its size and modification time, so that an
  unchanged file is not read again to decide whether its study is current;
- ``inflight``: the studies handed to a worker and not yet committed. A row left there when a
  run stops counts one stop against its study, so a study that crashes the batch each time it
  runs is recorded as failed instead of stopping every resume.

A study's rows are replaced in one transaction after its outputs are in place, and the
database runs in WAL mode with full synchronisation: a crash or a kill loses at most the
studies in flight and never leaves a half-written study behind.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, finished TEXT, engine TEXT, workers INTEGER, medsam3d_version TEXT,
    manifest TEXT, manifest_sha256 TEXT, total INTEGER, done INTEGER, skipped INTEGER, failed INTEGER);
CREATE TABLE IF NOT EXISTS studies (
    case_id TEXT PRIMARY KEY, patient_id TEXT NOT NULL, timepoint TEXT NOT NULL, sort_key TEXT NOT NULL,
    modality TEXT, row INTEGER, status TEXT NOT NULL CHECK (status IN ('done', 'failed')), key TEXT NOT NULL,
    run_id INTEGER REFERENCES runs(run_id), image TEXT, prompts TEXT, metadata TEXT, record TEXT, files TEXT,
    timings TEXT, error TEXT, stage TEXT, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lesions (
    case_id TEXT NOT NULL REFERENCES studies(case_id) ON DELETE CASCADE, label INTEGER NOT NULL, name TEXT,
    voxels INTEGER, volume_ml REAL, volume_ml_low REAL, volume_ml_high REAL, long_axis_mm REAL,
    short_axis_mm REAL, max_diameter_3d_mm REAL, centroid_r REAL, centroid_a REAL, centroid_s REAL,
    touches_border INTEGER, flags TEXT, PRIMARY KEY (case_id, label));
CREATE TABLE IF NOT EXISTS measurements (
    case_id TEXT NOT NULL REFERENCES studies(case_id) ON DELETE CASCADE, label INTEGER NOT NULL,
    component INTEGER NOT NULL, name TEXT, voxels INTEGER, volume_ml REAL, long_axis_mm REAL,
    short_axis_mm REAL, max_diameter_3d_mm REAL, sphericity REAL, data TEXT,
    PRIMARY KEY (case_id, label, component));
CREATE TABLE IF NOT EXISTS inflight (
    case_id TEXT PRIMARY KEY, key TEXT NOT NULL, stops INTEGER NOT NULL, started TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS registrations (pair TEXT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER REFERENCES runs(run_id), case_id TEXT NOT NULL,
    row INTEGER, stage TEXT, error TEXT NOT NULL, time TEXT NOT NULL);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def lesion_facts(obj: dict[str, Any]) -> dict[str, Any]:
    """The facts of one record object that the results and the follow-up use."""
    whole = (obj.get("measurements") or {}).get("whole") or {}
    return {"label": obj["label"], "name": obj["name"], "voxels": obj["voxels"], "volume_ml": obj["volume_ml"],
            "volume_ml_range": obj.get("volume_ml_range"), "long_axis_mm": whole.get("long_axis_mm"),
            "short_axis_mm": whole.get("short_axis_mm"), "max_diameter_3d_mm": whole.get("max_diameter_3d_mm"),
            "centroid_ras": whole.get("centroid_ras"), "touches_border": bool(obj.get("touches_border")),
            "flags": list(obj.get("flags") or [])}


class ResultStore:
    """The SQLite database of one output folder (see the module's description)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.conn.execute("BEGIN IMMEDIATE")
                return store.conn

            def __exit__(self, kind, value, tb):
                store.conn.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    # runs
    def start_run(self, *, engine: str, workers: int, version: str, manifest: str, manifest_sha256: str,
                  total: int) -> int:
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO runs (started, engine, workers, medsam3d_version, manifest, "
                               "manifest_sha256, total) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (_now(), engine, workers, version, manifest, manifest_sha256, total))
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, *, done: int, skipped: int, failed: int) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET finished = ?, done = ?, skipped = ?, failed = ? WHERE run_id = ?",
                         (_now(), done, skipped, failed, run_id))

    # studies
    def study(self, case_id: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM studies WHERE case_id = ?", (case_id,)).fetchone()

    def _study_row(self, conn, study, *, status: str, key: str, run_id: int, record: dict | None,
                   files: dict | None, timings: dict | None, error: str | None, stage: str | None,
                   modality: str | None) -> None:
        conn.execute("DELETE FROM inflight WHERE case_id = ?", (study.case_id,))
        conn.execute("DELETE FROM studies WHERE case_id = ?", (study.case_id,))  # cascades to its lesions
        conn.execute(
            "INSERT INTO studies (case_id, patient_id, timepoint, sort_key, modality, row, status, key, run_id, "
            "image, prompts, metadata, record, files, timings, error, stage, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (study.case_id, study.patient_id, study.timepoint, json.dumps(list(study.order)), modality, study.row,
             status, key, run_id, str(study.image), study.prompts.describe(), json.dumps(study.metadata),
             json.dumps(record, allow_nan=False) if record is not None else None,
             json.dumps(files) if files is not None else None, json.dumps(timings) if timings else None,
             error, stage, _now()))

    def refresh(self, study) -> None:
        """Bring a skipped study's manifest fields (patient, time point, row, metadata) up to date."""
        with self._transaction() as conn:
            conn.execute("UPDATE studies SET patient_id = ?, timepoint = ?, sort_key = ?, row = ?, metadata = ?, "
                         "image = ?, prompts = ?, modality = COALESCE(?, modality) WHERE case_id = ?",
                         (study.patient_id, study.timepoint, json.dumps(list(study.order)), study.row,
                          json.dumps(study.metadata), str(study.image), study.prompts.describe(), study.modality,
                          study.case_id))

    def crashes(self, case_id: str, key: str) -> int:
        """How many runs stopped while this study (with this key) was being computed."""
        row = self.conn.execute("SELECT key, stops FROM inflight WHERE case_id = ?", (case_id,)).fetchone()
        return int(row["stops"]) + 1 if row is not None and row["key"] == key else 0

    def start(self, case_id: str, key: str) -> None:
        """Note that a study was handed to a worker (cleared when its result is committed)."""
        stops = self.crashes(case_id, key)
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO inflight VALUES (?, ?, ?, ?)", (case_id, key, stops, _now()))

    def commit_done(self, study, *, key: str, run_id: int, record: dict[str, Any], files: dict[str, Any],
                    timings: dict[str, Any]) -> None:
        """Replace the study's rows by its result, its lesions and measurements, in one transaction."""
        modality = study.modality or (record.get("input") or {}).get("modality")
        with self._transaction() as conn:
            self._study_row(conn, study, status="done", key=key, run_id=run_id, record=record, files=files,
                            timings=timings, error=None, stage=None, modality=modality)
            for obj in record.get("objects", []):
                f = lesion_facts(obj)
                lo, hi = f["volume_ml_range"] or (None, None)
                r, a, s = f["centroid_ras"] or (None, None, None)
                conn.execute("INSERT INTO lesions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (study.case_id, f["label"], f["name"], f["voxels"], f["volume_ml"], lo, hi,
                              f["long_axis_mm"], f["short_axis_mm"], f["max_diameter_3d_mm"], r, a, s,
                              int(f["touches_border"]), json.dumps(f["flags"])))
                measurements = obj.get("measurements") or {}
                rows = ([measurements["whole"]] if measurements.get("whole") else []) + measurements.get("lesions", [])
                for m in rows:
                    conn.execute("INSERT OR REPLACE INTO measurements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (study.case_id, obj["label"], m["component"], obj["name"], m["voxels"],
                                  m["volume_ml"], m.get("long_axis_mm"), m.get("short_axis_mm"),
                                  m.get("max_diameter_3d_mm"), m.get("sphericity"), json.dumps(m)))

    def commit_failed(self, study, *, key: str, run_id: int, stage: str, error: str) -> None:
        """Record a failed study (its previous result, if any, is replaced) and log the failure."""
        with self._transaction() as conn:
            self._study_row(conn, study, status="failed", key=key, run_id=run_id, record=None, files=None,
                            timings=None, error=error, stage=stage, modality=study.modality)
            conn.execute("INSERT INTO failures (run_id, case_id, row, stage, error, time) VALUES (?, ?, ?, ?, ?, ?)",
                         (run_id, study.case_id, study.row, stage, error, _now()))

    def registration(self, pair: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT entry FROM registrations WHERE pair = ?", (pair,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def save_registrations(self, entries: dict[str, dict[str, Any]]) -> None:
        with self._transaction() as conn:
            for pair, entry in entries.items():
                conn.execute("INSERT OR REPLACE INTO registrations VALUES (?, ?)", (pair, json.dumps(entry)))

    def file_hash(self, path: str) -> tuple[int, int, str] | None:
        row = self.conn.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path = ?", (path,)).fetchone()
        return (row[0], row[1], row[2]) if row is not None else None

    def save_file_hashes(self, hashes: dict[str, tuple[int, int, str]]) -> None:
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                             [(path, *value) for path, value in hashes.items()])

    def studies(self) -> Iterator[sqlite3.Row]:
        return iter(self.conn.execute("SELECT * FROM studies ORDER BY patient_id, sort_key, case_id").fetchall())

    def case_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT case_id FROM studies")}

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY run_id")]

    def failures(self, run_id: int | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM failures", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def lesions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM lesions ORDER BY case_id, label")]
