"""The run directory's own record of everything tracked: a JSONL journal plus a state file.

The journal is written before anything is sent to MLflow, so a run's params, tags, metrics,
artifacts and final status survive a dead server; ``python -m cmkd_scale.tracking upload``
replays it. No MLflow here.

Layout under ``RUN_DIR/tracking/``:
    journal.jsonl   one JSON record per line: {"t": kind, "ts": ms, ...}
                    kinds: start, params, tags, metrics, artifact, inputs, model, status
    state.json      {"local_id", "experiment", "name", "uri", "remote": {uri: mlflow run id}}
    artifacts/      files the tracker wrote itself (config, CSV tables, plots, texts)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cmkd_scale.diskspace import explain_storage_errors

log = logging.getLogger(__name__)


class JournalError(ValueError):
    """The journal or state file cannot be read; the message names the file and line."""


def now_ms() -> int:
    return int(time.time() * 1000)


def tracking_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tracking"


class Journal:
    """Append-only JSONL record, safe to call from several threads of one process."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = tracking_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "journal.jsonl"
        self.artifacts = self.dir / "artifacts"
        self.artifacts.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (flushed to the OS at once, so a crash keeps it)."""
        record = {"t": kind, "ts": fields.pop("ts", None) or now_ms(), **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            if self._fh.closed:  # a call after finish(): nothing to record it in
                log.warning("tracking call after the run ended, not recorded: %s", line[:200])
                return record
            with explain_storage_errors(
                "tracking journal", self.path, needed=len(line) + 1, hint="Free some space"
            ):
                self._fh.write(line + "\n")
                self._fh.flush()
        return record

    def rotate(self) -> Path | None:
        """Move an existing journal aside (a fresh run reusing the dir); return the new name."""
        with self._lock:
            self._fh.close()
            moved = None
            if self.path.stat().st_size > 0:
                moved = self.path.with_name(f"journal-{now_ms()}.jsonl")
                self.path.rename(moved)
            self._fh = self.path.open("a", encoding="utf-8")
        return moved

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Records in order; a torn last line (crash mid-write) is skipped with a warning."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: torn last record skipped (%s)", path, number, exc)
                return
            raise JournalError(
                f"{path}:{number}: not a JSON record ({exc}); fix or delete that line"
            ) from exc
        if not isinstance(record, dict) or "t" not in record:
            raise JournalError(f"{path}:{number}: record has no 't' kind; fix or delete it")
        yield record


class RunState:
    """``state.json``: the run's local id and the MLflow run id it has on each server."""

    def __init__(self, run_dir: Path) -> None:
        self.path = tracking_dir(run_dir) / "state.json"
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise JournalError(
                    f"{self.path}: not valid JSON ({exc}); delete it to start a new local run"
                ) from exc
        self._lock = threading.Lock()

    @property
    def local_id(self) -> str | None:
        return self.data.get("local_id")

    def knows(self, run_id: str) -> bool:
        """True when ``run_id`` is this run's local id or its id on any server."""
        return run_id == self.local_id or run_id in self.data.get("remote", {}).values()

    def remote_id(self, uri: str) -> str | None:
        return self.data.get("remote", {}).get(uri)

    def reset(self, *, experiment: str, name: str, uri: str) -> None:
        """Begin a new local run (new local id, no remote runs yet)."""
        self.data = {
            "local_id": f"local-{uuid.uuid4().hex}",
            "experiment": experiment,
            "name": name,
            "uri": uri,
            "remote": {},
        }
        self.save()

    def set_remote(self, uri: str, run_id: str) -> None:
        with self._lock:
            self.data.setdefault("remote", {})[uri] = run_id
        self.save()

    def save(self) -> None:
        """Write atomically (temp file + rename), so a crash leaves the old or the new state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.data, indent=2), encoding="utf-8")
            tmp.replace(self.path)
