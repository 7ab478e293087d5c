"""Decoder processes: a native decoder that crashes (FFmpeg or libsndfile segfault, abort, OOM
kill) costs one clip, never the prep process.

Clips are always decoded in spawned child processes ("lanes"; spawn, not fork: torch threads
exist), each taking clips over its own pipe and answering them in order.  When a lane dies, the
oldest clip it had not answered is the suspect: it alone was being decoded.  The suspect is
decoded again as the first and only clip of a fresh lane.  If that lane dies too, the clip is
recorded as failed with how the process died; if it decodes, the first death had another cause
(a kill from outside, the OOM killer choosing this process for another's memory) and nothing
is lost.  Clips the dead lane had been given but not started go back to the front of the queue.
Results are keyed by clip position, so what lands in a shard never depends on which lane
decoded what, how many lanes there are, or whether a lane died.

A decoder that hangs (an FFmpeg loop on a malformed container) is a crash too: a lane that has
not answered its oldest clip within ``timeout_s`` (``--decode-timeout``) is killed, and the clip
is handled exactly like one that crashed its decoder (again alone, then failed.csv).

A crash is handed out only once some other clip has decoded after it (or nothing else is left
to decode): when every clip crashes, even alone, the machine is to blame (memory, limits), and
prep stops with WorkerDied before any innocent clip is recorded as failed.

A background thread feeds the lanes and collects their results, so decoding continues while
the caller writes and uploads a shard.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait

from .clip import ClipJob, ClipResult, init_worker, process_clip

log = logging.getLogger(__name__)

CRASH_REASON = "the decoder process died ({how}) on this file"
HANG_HOW = "no answer within {timeout:g} s (--decode-timeout): hung, killed"
DEFAULT_TIMEOUT_S = 300.0  # a 10 s clip decodes in ~20 ms, an hour-long video in seconds
LANE_DEPTH = 2  # clips given to a lane ahead, so it never waits for the parent between clips
MAX_START_DEATHS = 3  # lanes dying before taking a clip, in a row: the machine, not a file
MAX_CRASHES_IN_A_ROW = 8  # clips crashing even alone, none decoding in between: likewise
_READY = "ready"


class WorkerDied(RuntimeError):
    """Decoder processes keep dying for a reason no single file explains; shards done are kept."""


def describe_exit(exitcode: int | None) -> str:
    """'signal 11 SIGSEGV' or 'exit code 1': how a child process ended."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"signal {-exitcode} {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def lane_main(conn: Connection) -> None:
    """Body of a decoder process: clip jobs in, results out, until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    init_worker()
    conn.send(_READY)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone (it ends lanes with SIGTERM otherwise)
            return
        try:
            conn.send(process_clip(job))
        except Exception:  # a bug, not bad audio (process_clip reports that): the parent raises
            conn.send(("error", job.position, traceback.format_exc()))


class _Lane:
    """One decoder process and the clips it has been given but not answered, oldest first."""

    def __init__(self, ctx: multiprocessing.context.SpawnContext, alone: ClipJob | None) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=lane_main, args=(child,), daemon=True)
        self.process.start()
        child.close()  # the child holds the only other end: its death reads as EOF here
        self.ready = False
        self.given: deque[ClipJob] = deque()
        self.alone = alone  # a suspect this fresh lane decodes alone, before anything else
        self.busy_since: float | None = None  # when its oldest given clip started decoding
        self.hung = False  # killed for not answering in time

    def give(self, job: ClipJob) -> None:
        self.conn.send(job)
        if not self.given:
            self.busy_since = time.monotonic()
        self.given.append(job)

    def answered(self) -> ClipJob:
        """The oldest clip was answered: the next one (if any) starts decoding now."""
        job = self.given.popleft()
        self.busy_since = time.monotonic() if self.given else None
        return job

    def exit_status(self) -> str:
        """How the (dead) process ended."""
        self.process.join(timeout=10)
        if self.process.exitcode is None:  # closed its pipe yet alive: make sure it is gone
            self.process.kill()
            self.process.join()
        self.conn.close()
        return describe_exit(self.process.exitcode)

    def ask_to_stop(self) -> None:
        """SIGTERM: a lane holds no state worth an orderly exit (which takes a second or two)."""
        if self.process.exitcode is None:
            self.process.terminate()

    def wait_stopped(self) -> None:
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class DecoderPool:
    """``workers`` decoder processes; submit clip jobs, then take their results by position."""

    def __init__(
        self,
        workers: int,
        describe: Callable[[ClipJob], str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"--decode-timeout must be > 0 seconds, got {timeout_s}")
        # how log lines name a clip; the caller may set a better one ("shard-000003 key ...")
        self.describe = describe or (lambda job: f"clip {job.position} (file {job.path})")
        self.timeout_s = timeout_s
        self.crashes = 0  # clips recorded as failed because they crashed (or hung) a decoder
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = workers
        self._todo: deque[ClipJob] = deque()
        self._done: dict[int, ClipResult] = {}
        self._error: BaseException | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._start_deaths = 0
        self._crashed: list[ClipResult] = []  # crashes not handed out yet (see the docstring)
        self._lanes: list[_Lane] = []
        self._thread = threading.Thread(target=self._run, name="prep-decoders", daemon=True)
        self._thread.start()

    def submit(self, jobs: Iterable[ClipJob]) -> None:
        """Queue clips for decoding (in this order)."""
        with self._cond:
            self._todo.extend(jobs)
        self._wake_w.send_bytes(b"")

    def results(self, jobs: Iterable[ClipJob]) -> Iterator[ClipResult]:
        """The results of submitted ``jobs`` in their order, each as soon as it is decoded."""
        for job in jobs:
            yield self.result(job.position)

    def result(self, position: int) -> ClipResult:
        """The result of the submitted clip at ``position``; raises what stopped the pool."""
        with self._cond:
            while position not in self._done and self._error is None:
                self._cond.wait()
            if position in self._done:
                return self._done.pop(position)
            raise self._error

    def close(self) -> None:
        """Stop the decoder processes (clips still queued are dropped)."""
        if self._closing:
            return
        self._closing = True
        self._wake_w.send_bytes(b"")
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the feeding thread: owns the lanes -------------------------------------------------

    def _run(self) -> None:
        try:
            self._lanes = [_Lane(self._ctx, None) for _ in range(self._workers)]
            while not self._closing:
                self._feed()
                if self._crashed and self._idle():  # no clip left that could decode after them
                    self._release_crashes()
                self._collect()
        except BaseException as exc:  # handed to the caller waiting in result()
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:  # all at once, then wait
            for lane in self._lanes:
                lane.ask_to_stop()
            for lane in self._lanes:
                lane.wait_stopped()

    def _feed(self) -> None:
        """Give each ready lane clips up to LANE_DEPTH; a suspect's lane gets only the suspect."""
        with self._cond:
            for lane in self._lanes:
                if not lane.ready:
                    continue
                # a lane killed since the last look fails the send (broken pipe): what it was
                # not given stays queued, and _collect handles its death through its sentinel
                if lane.alone is not None:
                    if not lane.given:
                        with contextlib.suppress(OSError):
                            lane.give(lane.alone)
                    continue
                while len(lane.given) < LANE_DEPTH and self._todo:
                    job = self._todo.popleft()
                    try:
                        lane.give(job)
                    except OSError:
                        self._todo.appendleft(job)
                        break

    def _collect(self) -> None:
        """Wait for answers, deaths, a wake-up or a decoding deadline; handle what arrived."""
        by_fd = {}
        for lane in self._lanes:
            by_fd[lane.conn] = lane
            by_fd[lane.process.sentinel] = lane
        ready = wait([self._wake_r, *by_fd], timeout=self._kill_overdue())
        while self._wake_r.poll():
            self._wake_r.recv_bytes()
        for lane in {id(by_fd[r]): by_fd[r] for r in ready if r in by_fd}.values():
            try:
                while lane.conn.poll():
                    self._answer(lane, lane.conn.recv())
                if lane.process.is_alive():
                    continue
                while lane.conn.poll(1):  # it died: take what it sent before, up to the EOF
                    self._answer(lane, lane.conn.recv())
            except (EOFError, OSError):  # OSError: it died in the middle of a message
                pass
            self._lost(lane)

    def _kill_overdue(self) -> float | None:
        """SIGKILL lanes whose oldest clip is past its deadline (their death is then handled
        like a crash); seconds until the next deadline, None if no lane is decoding."""
        now, wait_s = time.monotonic(), None
        for lane in self._lanes:
            if lane.busy_since is None or lane.hung:
                continue
            left = lane.busy_since + self.timeout_s - now
            if left <= 0 and lane.process.exitcode is None:
                lane.hung = True
                lane.process.kill()
            elif left > 0:
                wait_s = left if wait_s is None else min(wait_s, left)
        return wait_s

    def _answer(self, lane: _Lane, msg: object) -> None:
        if msg == _READY:
            lane.ready = True
            self._start_deaths = 0
            return
        job = lane.answered()
        if isinstance(msg, tuple):  # ("error", position, traceback)
            raise RuntimeError(
                f"decoding {self.describe(job)} raised an unexpected error; this is a bug in "
                f"prep, not a bad file: report it with that file\n{msg[2]}"
            )
        if msg.position != job.position:
            raise RuntimeError(f"decoder answered clip {msg.position} for clip {job.position}")
        if lane.alone is job:
            lane.alone = None
            log.info("%s decodes fine alone: the earlier death was not its own", self.describe(job))
        self._release_crashes()  # a clip decoded: this machine can decode, those files cannot
        self._publish(msg)

    def _publish(self, result: ClipResult) -> None:
        with self._cond:
            self._done[result.position] = result
            self._cond.notify_all()

    def _release_crashes(self) -> None:
        for result in self._crashed:
            self._publish(result)
        self._crashed.clear()

    def _idle(self) -> bool:
        """Nothing queued and no lane holding a clip."""
        with self._cond:
            return not self._todo and all(not x.given and x.alone is None for x in self._lanes)

    def _lost(self, lane: _Lane) -> None:
        """A lane died: blame nobody yet, confirm a suspect alone, or record a crash."""
        how = lane.exit_status()
        if lane.hung:
            how = HANG_HOW.format(timeout=self.timeout_s)
        self._lanes.remove(lane)
        if not lane.ready:
            self._start_deaths += 1
            if self._start_deaths >= MAX_START_DEATHS:
                raise WorkerDied(
                    f"{self._start_deaths} decoder processes in a row died ({how}) before they "
                    "could take a clip: no file is to blame; check free memory and process "
                    "limits (cgroup, ulimit) on this machine, and, when prep is called from a "
                    'Python script, that the call sits under `if __name__ == "__main__":` '
                    "(decoder processes are spawned and re-import that script)"
                )
            log.warning("a decoder process died while starting (%s); starting another", how)
            self._lanes.append(_Lane(self._ctx, lane.alone))
            return
        if not lane.given:  # a suspect it was to decode alone (not given yet) passes on
            log.warning("an idle decoder process died (%s); starting another", how)
            self._lanes.append(_Lane(self._ctx, lane.alone))
            return
        suspect, *unstarted = lane.given
        with self._cond:  # not started: back to the front of the queue, in order
            self._todo.extendleft(reversed(unstarted))
        if lane.alone is not suspect:
            log.warning(
                "a decoder process died (%s) on %s; decoding it again alone in a new process",
                how,
                self.describe(suspect),
            )
            self._lanes.append(_Lane(self._ctx, suspect))
            return
        self._crashed.append(ClipResult(suspect.position, None, 0.0, CRASH_REASON.format(how=how)))
        if len(self._crashed) >= MAX_CRASHES_IN_A_ROW:
            raise WorkerDied(
                f"{len(self._crashed)} clips in a row crashed their decoder process even alone "
                f"({how}) and none decoded in between: that is this machine (memory, limits), "
                "not that many bad files; check free memory and process limits"
            )
        self.crashes += 1
        log.warning(
            "the decoder process died again (%s) decoding %s alone: recorded as failed",
            how,
            self.describe(suspect),
        )
        self._lanes.append(_Lane(self._ctx, None))
