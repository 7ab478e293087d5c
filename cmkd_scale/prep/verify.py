"""``verify``: re-read every shard against the manifest and say precisely what is wrong."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import soundfile as sf

from cmkd_scale import sha256_of

from .manifest import MANIFEST_FILE, MANIFEST_FORMAT
from .progress import Progress
from .shards import MEMBER_EXTS, index_from_tar
from .storage import Output
from .weights import class_counts, sample_weights

log = logging.getLogger(__name__)


def _check_sample(
    key: str, members: dict[str, bytes], num_classes: int, sample_rate: int, decode: bool
) -> tuple[list[str], list[int] | None]:
    """Problems of one sample, and its labels when they could be read."""
    problems: list[str] = []
    if list(members) != list(MEMBER_EXTS):
        problems.append(f"members {list(members)}, expected {list(MEMBER_EXTS)} in that order")
    labels = None
    if "json" in members:
        try:
            record = json.loads(members["json"])
            labels = [int(x) for x in record["labels"]]
            if record.get("key") != key:
                problems.append(f"json key {record.get('key')!r} differs from the member name")
            if not labels or not all(0 <= x < num_classes for x in labels):
                problems.append(f"json labels {labels} are empty or outside [0, {num_classes})")
                labels = None
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"json unreadable: {exc}")
    if "labels" in members:
        raw = members["labels"]
        if len(raw) != 4 * num_classes:
            problems.append(f"labels member has {len(raw)} bytes, expected {4 * num_classes}")
        elif labels is not None:
            hot = np.flatnonzero(np.frombuffer(raw, dtype="<f4")).tolist()
            if hot != sorted(set(labels)):
                problems.append(f"labels member marks {hot}, json says {labels}")
    if decode and "flac" in members:
        try:
            wave, sr = sf.read(io.BytesIO(members["flac"]), dtype="int16", always_2d=True)
            if sr != sample_rate or wave.shape[1] != 1 or len(wave) == 0:
                problems.append(f"flac is {sr} Hz x {wave.shape[1]} ch, {len(wave)} frames")
        except Exception as exc:
            problems.append(f"flac does not decode: {exc}")
    return problems, labels


def _check_shard(out: Output, entry: dict, manifest: dict, decode: bool) -> tuple[list[str], list]:
    """Problems of one shard, and the labels of its samples in order."""
    name, problems, labels = entry["name"], [], []
    if not out.exists(name):
        return [f"{name}: file missing"], labels
    with out.open(name) as f:
        digest, size = sha256_of(f)
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
        if digest != entry["sha256"]:
            problems.append(
                f"{name}: sha256 {digest} differs from the manifest's {entry['sha256']}"
            )
        try:
            expected_idx = index_from_tar(f)
        except tarfile.TarError as exc:
            return [*problems, f"{name}: not a readable tar ({exc})"], labels
        if not out.exists(entry["index"]):
            problems.append(f"{entry['index']}: file missing")
        elif out.read_bytes(entry["index"]) != expected_idx:
            problems.append(f"{entry['index']}: does not match the offsets in {name}")
        f.seek(0)
        samples: list[tuple[str, dict[str, bytes]]] = []
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not member.isreg() or "/" in member.name:
                    problems.append(f"{name}: unexpected member {member.name!r}")
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
    if len(samples) != entry["num_samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['num_samples']}")
    for key, members in samples:
        sample_problems, sample_labels = _check_sample(
            key, members, manifest["num_classes"], manifest["sample_rate"], decode
        )
        problems.extend(f"{name}: key {key}: {p}" for p in sample_problems)
        labels.append((key, sample_labels))
    return problems, labels


def verify(out_url: str, *, decode: bool = True, progress_every_s: float = 10.0) -> list[str]:
    """All problems found in ``out_url`` (empty list: the shards match the manifest)."""
    out = Output(out_url, create=False)
    if not out.exists(MANIFEST_FILE):
        return [f"{MANIFEST_FILE}: missing (run prep, or `prep finalize`, first)"]
    manifest = json.loads(out.read_bytes(MANIFEST_FILE))
    if manifest.get("format") != MANIFEST_FORMAT:
        return [f"{MANIFEST_FILE}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"]
    problems: list[str] = []
    all_labels: list = []
    seen_keys: set[str] = set()
    progress = Progress(manifest["num_samples"], progress_every_s, what="verify")
    for entry in manifest["shards"]:
        if entry["first_sample"] != len(all_labels):
            problems.append(
                f"{entry['name']}: first_sample {entry['first_sample']}, expected {len(all_labels)}"
            )
        shard_problems, labels = _check_shard(out, entry, manifest, decode)
        problems.extend(shard_problems)
        for key, _ in labels:
            if key in seen_keys:
                problems.append(f"{entry['name']}: key {key}: appears in an earlier sample too")
            seen_keys.add(key)
        all_labels.extend(labels)
        progress.update(clips=len(labels))
    if len(all_labels) != manifest["num_samples"]:
        problems.append(
            f"{MANIFEST_FILE}: num_samples {manifest['num_samples']}, shards hold {len(all_labels)}"
        )
    if all(lab is not None for _, lab in all_labels):
        lab_lists = [lab for _, lab in all_labels]
        counts = class_counts(lab_lists, manifest["num_classes"]).tolist()
        if counts != manifest["class_counts"]:
            problems.append(f"{MANIFEST_FILE}: class_counts differ from the shards' labels")
        try:
            weights = np.load(io.BytesIO(out.read_bytes(manifest["weights"])), allow_pickle=False)
        except (OSError, ValueError, FileNotFoundError) as exc:
            problems.append(f"{manifest['weights']}: unreadable ({exc})")
        else:
            if weights.shape != (len(lab_lists),) or weights.dtype != np.float64:
                problems.append(
                    f"{manifest['weights']}: {weights.dtype}{list(weights.shape)}, "
                    f"expected float64[{len(lab_lists)}]"
                )
            elif not np.array_equal(weights, sample_weights(lab_lists, manifest["num_classes"])):
                problems.append(f"{manifest['weights']}: values differ from the shards' labels")
    progress.log(final=True)
    return problems
