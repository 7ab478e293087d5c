"""Read a prep-made shard set: manifest.json, the per-shard DALI index files and weights.npy.

Everything goes through fsspec, so a shard set may live in a local folder, behind ``file://``,
``memory://`` (tests) or an object store URL. The index files give every member's byte offset
inside its tar, which is what lets the training loader read single samples by range.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "cmkd_scale.shards/1"
VERIFY_HINT = "check the shard set with `python -m cmkd_scale.prep verify --out {root}`"


class DataError(RuntimeError):
    """A shard set is missing, malformed or corrupt; the message names the file and the fix."""


def _split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """Return (filesystem, root folder, manifest path) for a shard dir, manifest or URL."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if path.endswith(".json"):
        return fs, posixpath.dirname(path), path
    return fs, path, posixpath.join(path, "manifest.json")


def read_manifest(url: str) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a shard set (a folder, the manifest itself, a URL)."""
    if not url:
        raise DataError("no shard set given: set data.train / data.eval to a prep output folder")
    fs, root, manifest_path = _split_url(url)
    if not fs.exists(manifest_path):
        raise DataError(
            f"{url}: no manifest at {manifest_path}; point to a folder written by "
            "`python -m cmkd_scale.prep` (a finished run writes manifest.json last)"
        )
    with fs.open(manifest_path, "rb") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest_path} is not valid JSON ({exc}); rerun prep") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(
            f"{manifest_path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
            "rerun `python -m cmkd_scale.prep` with this version of cmkd_scale"
        )
    for key in ("num_samples", "num_classes", "classes", "shards"):
        if key not in manifest:
            raise DataError(f"{manifest_path}: key '{key}' missing; rerun prep")
    counted = sum(int(s["num_samples"]) for s in manifest["shards"])
    if counted != manifest["num_samples"]:
        raise DataError(
            f"{manifest_path}: shards hold {counted} samples but num_samples is "
            f"{manifest['num_samples']}; " + VERIFY_HINT.format(root=root)
        )
    return manifest


@dataclass(frozen=True)
class SampleTable:
    """Where every sample's members live: one row per sample, in global order."""

    keys: list[str]
    shard: np.ndarray  # int32 [N] shard number
    start: np.ndarray  # int64 [N] byte offset of the first member's data
    flac: np.ndarray  # int64 [N, 2] (offset, size)
    labels: np.ndarray  # int64 [N, 2] (offset, size)

    def __len__(self) -> int:
        return len(self.keys)


def parse_index(text: str, shard_name: str) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a DALI ``wds2idx`` v1.2 file: per sample ``ext offset size name`` repeated."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{shard_name}: index file does not start with 'v1.2 N'")
    expected = int(lines[0].split()[1])
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise DataError(f"{shard_name}: index line {lineno} is not 'ext offset size name'*k")
        members = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            members[ext] = (int(offset), int(size), name)
        samples.append(members)
    if len(samples) != expected:
        raise DataError(f"{shard_name}: index announces {expected} samples, lists {len(samples)}")
    return samples


class ShardSet:
    """A shard set opened for reading: manifest, paths, the sample table, sampling weights."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root, _ = _split_url(url)
        self.manifest = read_manifest(url)
        self.shards = self.manifest["shards"]
        self.num_samples = int(self.manifest["num_samples"])
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = [c["display_name"] for c in self.manifest["classes"]]
        self.verify_hint = VERIFY_HINT.format(root=self.root)
        self.missing_shards = [s["name"] for s in self.shards if not self.fs.exists(self.path(s))]
        self._table: SampleTable | None = None

    @functools.cached_property
    def is_local(self) -> bool:
        """True when DALI's own file readers can open the shards (a local filesystem)."""
        return "file" in np.atleast_1d(self.fs.protocol)

    def path(self, shard: dict[str, Any]) -> str:
        return posixpath.join(self.root, shard["name"])

    def index_path(self, shard: dict[str, Any]) -> str:
        return posixpath.join(self.root, shard["index"])

    def require_all_shards(self) -> None:
        """Raise naming the first missing shard and the way out."""
        if self.missing_shards:
            names = ", ".join(self.missing_shards[:5])
            raise DataError(
                f"{self.root}: {len(self.missing_shards)} shard(s) missing ({names}); "
                f"{self.verify_hint}, or set data.corrupt_policy=skip to train without them"
            )

    @property
    def table(self) -> SampleTable:
        """Member offsets of every sample, read from the index files on first use."""
        if self._table is None:
            self._table = self._read_table()
        return self._table

    def _read_table(self) -> SampleTable:
        keys: list[str] = []
        shard_no, start, flac, labels = [], [], [], []
        for number, shard in enumerate(self.shards):
            count = int(shard["num_samples"])
            if shard["name"] in self.missing_shards:
                samples = [None] * count
            else:
                samples = self._read_shard_index(shard)
            for sample in samples:
                if sample is None:  # missing shard: placeholder rows, never read
                    keys.append(f"<missing {shard['name']}>")
                    shard_no.append(number)
                    start.append(-1)
                    flac.append((-1, 0))
                    labels.append((-1, 0))
                    continue
                try:
                    f_off, f_size, name = sample["flac"]
                    l_off, l_size, _ = sample["labels"]
                except KeyError as exc:
                    raise DataError(
                        f"{shard['name']}: a sample lacks its .{exc.args[0]} member; "
                        + self.verify_hint
                    ) from exc
                keys.append(name.rsplit(".", 1)[0])
                shard_no.append(number)
                start.append(min(m[0] for m in sample.values()))
                flac.append((f_off, f_size))
                labels.append((l_off, l_size))
        return SampleTable(
            keys=keys,
            shard=np.asarray(shard_no, dtype=np.int32),
            start=np.asarray(start, dtype=np.int64),
            flac=np.asarray(flac, dtype=np.int64).reshape(-1, 2),
            labels=np.asarray(labels, dtype=np.int64).reshape(-1, 2),
        )

    def _read_shard_index(self, shard: dict[str, Any]) -> list[dict[str, tuple[int, int, str]]]:
        path = self.index_path(shard)
        if not self.fs.exists(path):
            raise DataError(f"{path}: index file missing; {self.verify_hint}")
        with self.fs.open(path, "rb") as f:
            samples = parse_index(f.read().decode(), shard["name"])
        if len(samples) != int(shard["num_samples"]):
            raise DataError(
                f"{shard['name']}: index lists {len(samples)} samples, manifest says "
                f"{shard['num_samples']}; {self.verify_hint}"
            )
        return samples

    def weights(self) -> np.ndarray:
        """AST's balanced-sampling weight per sample (float64 [N]), from weights.npy."""
        name = self.manifest.get("weights", "weights.npy")
        path = posixpath.join(self.root, name)
        if not self.fs.exists(path):
            raise DataError(f"{path} missing: balanced sampling needs it; {self.verify_hint}")
        with self.fs.open(path, "rb") as f:
            weights = np.load(io.BytesIO(f.read()))
        if weights.shape != (self.num_samples,):
            raise DataError(
                f"{path}: shape {weights.shape}, expected ({self.num_samples},); "
                + self.verify_hint
            )
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise DataError(f"{path}: weights must be finite, >= 0 and not all 0; rerun prep")
        return weights


def cache_root() -> Path:
    """Where remote shard sets are copied for readers that need local files (the eval
    loader: DALI's webdataset reader): ``$CMKD_SHARD_CACHE``, else ``<tmp>/cmkd_shard_cache``.
    On a cluster point it at node-local disk (see README, "Cluster layout")."""
    configured = os.environ.get("CMKD_SHARD_CACHE", "")
    return Path(configured or Path(tempfile.gettempdir()) / "cmkd_shard_cache")


def local_copy(shards: ShardSet, root: Path | None = None) -> str:
    """A local copy of a remote shard set (manifest, shard tars, their .idx), made once per
    manifest: ``root/<manifest sha256>/``. Each tar is checked against the manifest's sha256
    while it downloads and published by rename, so ranks sharing a node may race safely and a
    killed copy is redone. Returns the local folder; raises DataError naming the shard whose
    download failed."""
    manifest_bytes = json.dumps(shards.manifest, sort_keys=True).encode()
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:32]
    folder = Path(root or cache_root()) / digest
    folder.mkdir(parents=True, exist_ok=True)
    for shard in shards.shards:
        _fetch(shards, shards.path(shard), folder / shard["name"], shard.get("sha256"))
        _fetch(shards, shards.index_path(shard), folder / shard["index"], None)
    target = folder / "manifest.json"
    if not target.is_file():
        tmp = folder / f".manifest.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(shards.manifest, indent=2))
        os.replace(tmp, target)
    return str(folder)


def _fetch(shards: ShardSet, src: str, dest: Path, sha256: str | None) -> None:
    if dest.is_file():
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with shards.fs.open(src, "rb") as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 22), b""):
                digest.update(block)
                fout.write(block)
    except Exception as exc:  # any fsspec backend's error (botocore's are not OSError)
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{src} cannot be copied to {dest.parent} ({type(exc).__name__}: {exc}); "
            + shards.verify_hint
        ) from exc
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{src}: sha256 differs from the manifest's; " + shards.verify_hint)
    os.replace(tmp, dest)
