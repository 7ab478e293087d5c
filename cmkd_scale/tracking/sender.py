"""Background delivery of tracking records: a bounded queue, batching, back-off after failures.

The training thread only enqueues (``submit`` never blocks); this thread batches metrics into
one ``log_batch`` per flush interval, and when the server fails it keeps the records in a
bounded buffer, warns once, and retries with exponential back-off (a cheap health check
first) instead of on every step. Everything is also in the run's journal, so what this buffer
has to drop is recovered by the upload command. No MLflow here: the remote end is any object
with the ``Remote`` methods below.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

Point = tuple[str, float, int, int]  # key, value, timestamp ms, step
Op = tuple[str, Any]  # ("metrics", [Point]) | ("params", dict) | ("tags", dict)
# | ("inputs", [dict]) | ("model", dict) | ("artifact", (path, artifact_path))
# | ("status", (status, end_ms))


class Remote(Protocol):
    """What the sender needs from one run on one tracking server."""

    uri: str
    run_id: str | None

    def reachable(self) -> bool: ...
    def send(self, op: Op) -> None: ...
    def is_rejection(self, exc: Exception) -> bool: ...


class Sender(threading.Thread):
    """Drains the queue on its own thread; see the module docstring for the policy."""

    def __init__(
        self,
        remote: Remote,
        open_run: Callable[[], None],
        *,
        journal_hint: str,
        flush_every_s: float = 5.0,
        queue_size: int = 10_000,
        max_pending_points: int = 200_000,
        batch_points: int = 1000,
        first_backoff_s: float = 5.0,
        max_backoff_s: float = 120.0,
    ) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.remote = remote
        self._open_run = open_run
        self._journal_hint = journal_hint
        self._queue: queue.Queue[Op] = queue.Queue(maxsize=queue_size)
        self._pending: deque[Op] = deque()
        self._pending_points = 0
        self._flush_every_s = flush_every_s
        self._max_pending_points = max_pending_points
        self._batch_points = batch_points
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self.offline = False
        self.dropped = 0  # records that only the journal holds (queue full, buffer full, rejected)
        self.sent_points = 0
        self._refused: set[str] = set()

    # ----------------------------------------------------------- training-thread side

    def submit(self, op: Op) -> bool:
        """Enqueue without blocking; False (and counted as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(op)
            return True
        except queue.Full:
            self.dropped += len(op[1]) if op[0] == "metrics" else 1
            return False

    def flush(self, timeout_s: float) -> bool:
        """Try to send everything queued so far; True when nothing is left unsent."""
        return self._control("flush", timeout_s)

    def stop(self, timeout_s: float) -> bool:
        """Final flush, then end the thread; True when nothing is left unsent."""
        done = self._control("stop", timeout_s)
        self.join(timeout=1.0)
        return done

    def mark_offline(self) -> None:
        """Start in the offline state (the first connection already failed and warned)."""
        self.offline = True
        self._backoff_s = self._first_backoff_s
        self._retry_at = time.monotonic() + self._backoff_s

    @property
    def unsent(self) -> int:
        """Records not on the server: buffered now plus dropped earlier."""
        return len(self._pending) + self.dropped

    def _control(self, kind: str, timeout_s: float) -> bool:
        if not self.is_alive():
            return self.unsent == 0
        done = threading.Event()
        try:
            self._queue.put((kind, done), timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s) and self.unsent == 0

    # ----------------------------------------------------------- sender-thread side

    def run(self) -> None:
        next_flush = time.monotonic() + self._flush_every_s
        while True:
            try:
                op = self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                op = None
            if op is not None and op[0] in ("flush", "stop"):
                self._drain_queue()
                self._deliver(force=True)
                op[1].set()
                if op[0] == "stop":
                    return
                continue
            if op is not None:
                self._buffer(op)
            due = time.monotonic() >= next_flush or self._pending_points >= self._batch_points
            if due:
                self._deliver(force=False)
                next_flush = time.monotonic() + self._flush_every_s

    def _drain_queue(self) -> None:
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op[0] in ("flush", "stop"):  # a second control op: answer it after this one
                self._queue.put(op)
                return
            self._buffer(op)

    def _buffer(self, op: Op) -> None:
        self._pending.append(op)
        if op[0] == "metrics":
            self._pending_points += len(op[1])
        while self._pending_points > self._max_pending_points:
            oldest = next(o for o in self._pending if o[0] == "metrics")
            self._pending.remove(oldest)
            self._pending_points -= len(oldest[1])
            if self.dropped == 0:
                log.warning(
                    "MLflow buffer full (%d points): oldest metrics are kept only in %s; "
                    "send them later with the upload command",
                    self._max_pending_points,
                    self._journal_hint,
                )
            self.dropped += len(oldest[1])

    def _deliver(self, *, force: bool) -> None:
        """Send the buffer in order; on a connection failure keep it and back off."""
        if not self._pending and self.remote.run_id is not None:
            return
        if self.offline and not force and time.monotonic() < self._retry_at:
            return
        try:
            if self.offline and not self.remote.reachable():
                raise ConnectionError(f"{self.remote.uri} does not answer its health check")
            if self.remote.run_id is None:
                self._open_run()
            while self._pending:
                self._send_front()
        except Exception as exc:
            self._failed(exc)
            return
        if self.offline:
            log.warning("MLflow at %s is reachable again; buffered records sent", self.remote.uri)
            self.offline = False
            self._backoff_s = 0.0

    def _send_front(self) -> None:
        op = self._pending[0]
        if op[0] == "metrics":  # merge consecutive metric ops into one log_batch
            points: list[Point] = []
            count = 0
            for queued in self._pending:
                if queued[0] != "metrics" or len(points) + len(queued[1]) > self._batch_points:
                    break
                points.extend(queued[1])
                count += 1
            if count == 0:  # a single op larger than one batch
                points, count = list(op[1]), 1
            self._send(("metrics", points), len(points))
            for _ in range(count):
                self._pending_points -= len(self._pending.popleft()[1])
            return
        self._send(op, 1)
        self._pending.popleft()

    def _send(self, op: Op, size: int) -> None:
        try:
            self.remote.send(op)
        except Exception as exc:
            if not self.remote.is_rejection(exc):
                raise
            # the server refused this record (bad value, not a connection problem): retrying
            # cannot help, so skip it; the journal still has it
            level = logging.DEBUG if op[0] in self._refused else logging.WARNING
            self._refused.add(op[0])  # warn once per kind, not on every flush
            log.log(
                level, "MLflow refused a %s record (kept in %s): %s", op[0], self._journal_hint, exc
            )
            self.dropped += size
            return
        if op[0] == "metrics":
            self.sent_points += size

    def _failed(self, exc: Exception) -> None:
        self._backoff_s = min(
            self._max_backoff_s, self._backoff_s * 2 if self._backoff_s else self._first_backoff_s
        )
        self._retry_at = time.monotonic() + self._backoff_s
        if not self.offline:
            log.warning(
                "MLflow at %s is unreachable (%s). Training continues; every record is kept in "
                "%s and retried every <= %.0f s (or sent later by `python -m cmkd_scale.tracking "
                "upload`).",
                self.remote.uri,
                str(exc).splitlines()[0][:300],
                self._journal_hint,
                self._max_backoff_s,
            )
        else:
            log.debug("MLflow still unreachable: %s", exc)
        self.offline = True
