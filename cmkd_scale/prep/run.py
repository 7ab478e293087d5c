"""Build this task's shards: locate audio, process clips in parallel, write shards atomically.

A shard is complete once its ``.meta.json`` exists (written last); a rerun skips complete
shards and rebuilds the rest from scratch, so a run killed at any point finishes with the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cmkd_scale import sha256_of

from ..diskspace import explain_storage_errors
from .clip import ClipJob, ClipResult
from .config import DEFAULT_SHARD_SIZE, PrepConfig
from .decoders import DecoderPool, WorkerDied
from .locate import AudioIndex
from .manifest import MANIFEST_FILE, finalize
from .plan import PLAN_FILE, Plan, PlanError, canonical_json, make_plan, task_shards
from .progress import Progress
from .segments import Segment
from .shards import ShardWriter, multi_hot, sample_json, shard_name
from .storage import Output

log = logging.getLogger(__name__)
# what a shard needs on disk, per clip, for the full-disk message (10 s of 16 kHz FLAC ~0.2 MB)
_CLIP_BYTES = 200_000

SHARD_FORMAT = "cmkd_scale.prep-shard/1"
__all__ = ["DEFAULT_SHARD_SIZE", "SHARD_FORMAT", "run_prep", "run_task"]


@dataclass
class ShardWork:
    """Everything the main process knows about one pending shard before its clips are decoded."""

    j: int
    jobs: list[ClipJob]
    missing: list[int]  # positions of segments without audio


class _EmptyShard(Exception):
    """Raised inside the spool to discard an empty tar."""


def _segment_row(plan: Plan, pos: int) -> dict:
    """A missing.csv/failed.csv row; ``input`` (the input position) orders them in finalize."""
    seg: Segment = plan.segments[pos]
    return {
        "source": seg.source,
        "line": seg.line,
        "ytid": seg.ytid,
        "start": seg.start,
        "end": seg.end,
        "key": seg.key,
        "input": plan.input_position(pos),
    }


def pending_shards(out: Output, shards: list[int], fingerprint: str) -> list[int]:
    """The shards without a completion marker of this plan (one listing of --out)."""
    present = set(out.names())
    pending = []
    for j in shards:
        name = f"{shard_name(j)}.meta.json"
        if (
            name not in present
            or json.loads(out.read_bytes(name)).get("fingerprint") != fingerprint
        ):
            pending.append(j)
    return pending


def _remove_stale_temps(out: Output, shards: list[int]) -> None:
    """Temp files of our pending shards are leftovers of a killed run (we own those shards)."""
    prefixes = tuple(f".{shard_name(j)}." for j in shards)
    stale = [n for n in out.names() if n.startswith(prefixes) and n.endswith(".tmp")]
    for name in stale:
        out.remove(name)
    if stale:
        log.info("removed %d temporary files left by a killed run", len(stale))


def _claim_plan(out: Output, plan: Plan) -> None:
    """Write plan.json, or check that the one already in --out describes the same inputs."""
    data = canonical_json(plan.to_json())
    if out.exists(PLAN_FILE):
        old = json.loads(out.read_bytes(PLAN_FILE))
        if old.get("fingerprint") != plan.fingerprint:
            raise PlanError(
                f"{out.url} already holds shards of other inputs or settings "
                f"(plan {old.get('fingerprint')}, now {plan.fingerprint}; "
                f"sources {[s['name'] for s in old.get('sources', [])]}): "
                "use a new --out or delete that one"
            )
        if out.read_bytes(PLAN_FILE) == data:
            return
    out.write_bytes(PLAN_FILE, data)


def _locate(plan: Plan, index: AudioIndex, shards: list[int]) -> Iterator[ShardWork]:
    """Each pending shard's clip jobs and missing segments, made only when it is next."""
    for j in shards:
        jobs, missing = [], []
        for pos in plan.shard_range(j):
            seg = plan.segments[pos]
            path = index.find_named(seg.lookup) if seg.lookup else index.find(seg)
            if path is None:
                missing.append(pos)
            else:  # end None: the whole file (decode_segment cuts nothing before inf)
                end = math.inf if seg.end is None else seg.end
                jobs.append(ClipJob(pos, path, seg.start, end))
        yield ShardWork(j, jobs, missing)


def _processed(
    works: Iterator[ShardWork], pool: DecoderPool
) -> Iterator[tuple[ShardWork, Iterator[ClipResult]]]:
    """Each shard with its clip results in job order; the pool works up to 2 shards ahead."""
    queued: deque[ShardWork] = deque()
    for work in works:
        pool.submit(work.jobs)
        queued.append(work)
        if len(queued) > 2:
            done = queued.popleft()
            yield done, pool.results(done.jobs)
    while queued:
        done = queued.popleft()
        yield done, pool.results(done.jobs)


def _describe(plan: Plan, index: AudioIndex) -> Callable[[ClipJob], str]:
    """How log lines name a clip: its shard, key and audio file."""

    def describe(job: ClipJob) -> str:
        seg = plan.segments[job.position]
        shard = shard_name(job.position // plan.shard_size)
        return f"{shard} key {seg.key} (file {index.relative(job.path)})"

    return describe


def _write_shard(
    out: Output,
    plan: Plan,
    work: ShardWork,
    results: Iterator[ClipResult],
    index: AudioIndex,
    progress: Progress,
) -> None:
    """Consume this shard's clip results, publish tar + idx, then the meta (completion marker)."""
    name = shard_name(work.j)
    samples, failed = [], []
    digest, size = None, 0
    if work.missing:
        progress.update(missing=len(work.missing))
    with contextlib.suppress(_EmptyShard), out.spool(f"{name}.tar") as f:
        writer = ShardWriter(f)
        for job, res in zip(work.jobs, results, strict=True):
            if res.position != job.position:  # would mean results are out of order: a bug
                raise RuntimeError(f"clip result {res.position} arrived for job {job.position}")
            seg = plan.segments[job.position]
            if res.flac is None:
                failed.append(
                    {
                        **_segment_row(plan, job.position),
                        "audio": index.relative(job.path),
                        "reason": res.error,
                    }
                )
                progress.update(failed=1)
                continue
            writer.add_sample(
                seg.key,
                {
                    "flac": res.flac,
                    "json": sample_json(seg, res.duration, index.relative(job.path)),
                    "labels": multi_hot(seg.labels, len(plan.classes)),
                },
            )
            samples.append([seg.key, list(seg.labels)])
            progress.update(clips=1)
        idx_bytes = writer.close()
        if not samples:  # nothing good in this range: publish no tar (DALI cannot read one)
            raise _EmptyShard
        f.flush()
        f.seek(0)
        digest, size = sha256_of(f)
    if samples:  # the tar is published; its index next, the meta (completion marker) last
        out.write_bytes(f"{name}.idx", idx_bytes)
    r = plan.shard_range(work.j)
    meta = {
        "format": SHARD_FORMAT,
        "fingerprint": plan.fingerprint,
        "shard": work.j,
        "name": f"{name}.tar",
        "index": f"{name}.idx",
        "segments": [r.start, r.stop],
        "num_samples": len(samples),
        "bytes": size,
        "sha256": digest,
        "samples": samples,
        "missing": [_segment_row(plan, pos) for pos in work.missing],
        "failed": failed,
    }
    out.write_bytes(f"{name}.meta.json", canonical_json(meta))


def run_task(config: PrepConfig) -> tuple[Plan, Output, list[int]]:
    """Build the shards of task ``config.task_id``; returns the plan, the output and shards
    built."""
    plan = make_plan(config)
    mine = task_shards(plan.num_shards, config.num_tasks, config.task_id)
    output = Output(config.out)
    _claim_plan(output, plan)
    pending = pending_shards(output, mine, plan.fingerprint)
    log.info(
        "plan %s: %d %s segments -> %d shards of %d (%s); task %d/%d owns %d shards, "
        "%d already complete",
        plan.fingerprint,
        len(plan.segments),
        config.format,
        plan.num_shards,
        config.shard_size,
        "input order" if config.keep_order else f"order seed {config.order_seed}",
        config.task_id,
        config.num_tasks,
        len(mine),
        len(mine) - len(pending),
    )
    if not pending:
        log.info(
            "nothing to do: all %d shards of this task are complete in %s", len(mine), config.out
        )
        return plan, output, []
    _remove_stale_temps(output, pending)
    total = sum(len(plan.shard_range(j)) for j in pending)
    work = None
    # Decoding always runs in child processes, also for one worker: a decoder crash costs the
    # clip that caused it (recorded in failed.csv), never this process.  They start (under a
    # second each) while the audio folder is indexed.
    try:
        with DecoderPool(config.workers, timeout_s=config.decode_timeout_s) as pool:
            index = AudioIndex.scan(config.audio_dir, by_path=config.format == "csv")
            pool.describe = _describe(plan, index)
            progress = Progress(total, config.progress_every_s)
            for work, results in _processed(_locate(plan, index, pending), pool):
                name = shard_name(work.j)
                with explain_storage_errors(  # a full disk: one message, finished shards kept
                    f"prep: shard {name}",
                    f"{output.url.rstrip('/')}/{name}.tar",
                    needed=plan.shard_size * _CLIP_BYTES,
                    hint="Free some space and rerun the same command: finished shards are kept",
                ):
                    _write_shard(output, plan, work, results, index, progress)
    except WorkerDied as exc:
        name = shard_name(work.j) if work is not None else "the first shard"
        raise WorkerDied(
            f"while {name} was being built: {exc}; completed shards are kept: rerun the same "
            "command to continue"
        ) from exc
    if pool.crashes:
        log.warning("files that crashed their decoder process: %d (in failed.csv)", pool.crashes)
    progress.log(final=True)
    return plan, output, pending


def run_prep(
    config: PrepConfig | list[Path] | None = None,
    class_labels: Path | None = None,
    audio_dir: Path | None = None,
    out: str | None = None,
    **options: object,
) -> dict:
    """Raw dataset -> shards.  With one task, also finalize and return the manifest;
    with several, return this task's summary (run ``finalize`` once all tasks are done).

    Call it with a ``PrepConfig``.  The older form ``run_prep(segments, class_labels,
    audio_dir, out, **options)`` (options named as PrepConfig's fields) builds that config.
    """
    if not isinstance(config, PrepConfig):
        given = {"class_labels": class_labels, "audio_dir": audio_dir}
        config = PrepConfig(
            segments=config,
            **{k: v for k, v in given.items() if v is not None},
            **({"out": out} if out is not None else {}),
            **options,
        )
    elif class_labels is not None or audio_dir is not None or out is not None or options:
        raise TypeError("run_prep(config): pass every option inside the PrepConfig")
    plan, output, built = run_task(config)
    if config.num_tasks == 1:
        if not built and output.exists(MANIFEST_FILE):
            manifest = json.loads(output.read_bytes(MANIFEST_FILE))
            if manifest.get("fingerprint") == plan.fingerprint:
                log.info("nothing to do: %s is already finalized", config.out)
                return manifest
        return finalize(config.out)
    log.info(
        "task %d/%d done (%d shards built); after all tasks: python -m cmkd_scale.prep finalize "
        "--out %s",
        config.task_id,
        config.num_tasks,
        len(built),
        config.out,
    )
    return {
        "task_id": config.task_id,
        "num_tasks": config.num_tasks,
        "shards_built": built,
        "num_shards": plan.num_shards,
        "fingerprint": plan.fingerprint,
    }
