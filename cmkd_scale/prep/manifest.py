"""``finalize``: per-shard ``.meta.json`` files -> manifest.json, weights.npy, missing/failed CSVs.

The manifest holds no timestamps or host names, so any split of the work into tasks and
workers gives byte-identical outputs.
"""

from __future__ import annotations

import csv
import io
import json
import logging

import numpy as np

from .audio_io import SAMPLE_RATE
from .plan import PLAN_FILE, canonical_json
from .shards import shard_name
from .storage import Output
from .weights import class_counts, sample_weights

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cmkd_scale.shards/1"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npy"
MISSING_COLUMNS = ["source", "line", "ytid", "start", "end", "key"]
FAILED_COLUMNS = [*MISSING_COLUMNS, "audio", "reason"]
BAD_LINE_COLUMNS = ["source", "line", "reason"]


class FinalizeError(RuntimeError):
    """Shards are missing or belong to another plan; the message names them."""


def _csv_bytes(columns: list[str], rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def read_plan(out: Output) -> dict:
    if not out.exists(PLAN_FILE):
        raise FinalizeError(f"{out.url} has no {PLAN_FILE}: run `python -m cmkd_scale.prep` first")
    return json.loads(out.read_bytes(PLAN_FILE))


def read_metas(out: Output, plan: dict) -> list[dict]:
    """Every shard's meta in shard order; refuses when any shard is not complete."""
    present = set(out.names())
    metas, absent, foreign = [], [], []
    for j in range(plan["num_shards"]):
        name = f"{shard_name(j)}.meta.json"
        if name not in present:
            absent.append(j)
            continue
        meta = json.loads(out.read_bytes(name))
        if meta.get("fingerprint") != plan["fingerprint"]:
            foreign.append(j)
        metas.append(meta)
    if absent or foreign:

        def show(ids: list[int]) -> str:
            names = ", ".join(shard_name(j) for j in ids[:20])
            return names + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")

        problems = []
        if absent:
            problems.append(
                f"{len(absent)} of {plan['num_shards']} shards not complete: {show(absent)}"
            )
        if foreign:
            problems.append(f"{len(foreign)} shards from another plan: {show(foreign)}")
        raise FinalizeError(
            f"cannot finalize {out.url}: "
            + "; ".join(problems)
            + " (rerun the prep task(s) that own them with the same arguments)"
        )
    return metas


def finalize(out_url: str) -> dict:
    """Write the global manifest, weights, missing.csv, failed.csv and bad_lines.csv."""
    out = Output(out_url, create=False)
    plan = read_plan(out)
    metas = read_metas(out, plan)
    num_classes = plan["num_classes"]
    shards, labels, missing, failed = [], [], [], []
    for meta in metas:
        missing.extend(meta["missing"])
        failed.extend(meta["failed"])
        if meta["num_samples"] == 0:
            continue
        for name in (meta["name"], meta["index"]):
            if not out.exists(name):
                raise FinalizeError(
                    f"{out.url}/{name} is missing though its meta says complete: "
                    f"delete {shard_name(meta['shard'])}.meta.json and rerun prep"
                )
        shards.append(
            {
                "name": meta["name"],
                "index": meta["index"],
                "num_samples": meta["num_samples"],
                "bytes": meta["bytes"],
                "sha256": meta["sha256"],
                "first_sample": len(labels),
            }
        )
        labels.extend(sample_labels for _, sample_labels in meta["samples"])
    # in input order (CSV by CSV, line by line), whatever order the shards were written in
    missing.sort(key=lambda row: row["input"])
    failed.sort(key=lambda row: row["input"])
    weights = sample_weights(labels, num_classes)
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_samples": len(labels),
        "num_classes": num_classes,
        "sample_rate": SAMPLE_RATE,
        "input_format": plan["settings"]["input_format"],
        "order_seed": plan["settings"]["order_seed"],
        "classes": plan["classes"],
        "class_counts": class_counts(labels, num_classes).tolist(),
        "shards": shards,
        "weights": WEIGHTS_FILE,
        "sources": plan["sources"],
        "settings": plan["settings"],
        "fingerprint": plan["fingerprint"],
        "num_segments": plan["num_segments"],
        "num_missing": len(missing),
        "num_failed": len(failed),
        "num_bad_lines": len(plan["bad_lines"]),
        "num_duplicates": plan["num_duplicates"],
    }
    out.write_bytes(WEIGHTS_FILE, _npy_bytes(weights))
    out.write_bytes("missing.csv", _csv_bytes(MISSING_COLUMNS, missing))
    out.write_bytes("failed.csv", _csv_bytes(FAILED_COLUMNS, failed))
    out.write_bytes("bad_lines.csv", _csv_bytes(BAD_LINE_COLUMNS, plan["bad_lines"]))
    out.write_bytes(MANIFEST_FILE, canonical_json(manifest))
    stale = out.remove_temps()  # all shards are complete: no writer is left to own these
    if stale:
        log.info("removed %d temporary files left by killed runs", len(stale))
    log.info(
        "finalized %s: %d samples in %d shards, %d missing, %d failed, %d bad lines skipped",
        out.url,
        len(labels),
        len(shards),
        len(missing),
        len(failed),
        len(plan["bad_lines"]),
    )
    return manifest
