"""Deterministic webdataset tars and their DALI index files.

Per sample, in this order: ``{key}.flac``, ``{key}.json``, ``{key}.labels`` (raw little-endian
float32 multi-hot).  Tar headers are fixed (ustar, mtime 0, uid/gid 0, no user names, mode
0644) so the same samples always give the same bytes.  The ``.idx`` file is DALI's ``wds2idx``
format v1.2: ``v1.2 N`` then per sample ``ext offset size name`` for each member, where
offset is the member's data offset in the tar.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from .segments import Segment

MEMBER_EXTS = ("flac", "json", "labels")
IDX_VERSION = "v1.2"


def shard_name(j: int) -> str:
    return f"shard-{j:06d}"


def sample_json(segment: Segment, duration: float, audio: str) -> bytes:
    """The ``{key}.json`` member: everything a reader needs besides the audio."""
    record = {
        "key": segment.key,
        "ytid": segment.ytid,
        "start": segment.start,
        # a whole file (every format but AudioSet) ends where its audio does
        "end": segment.end if segment.end is not None else round(segment.start + duration, 6),
        "labels": list(segment.labels),
        "mids": list(segment.mids),
        "duration": duration,
        "source": segment.source,
        "audio": audio,
    }
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode()


def multi_hot(labels: tuple[int, ...], num_classes: int) -> bytes:
    vec = np.zeros(num_classes, dtype="<f4")
    vec[list(labels)] = 1.0
    return vec.tobytes()


@dataclass
class ShardWriter:
    """Writes samples into an open binary file as a tar, recording DALI index entries."""

    fileobj: BinaryIO
    _tar: tarfile.TarFile = field(init=False)
    _idx_lines: list[str] = field(init=False, default_factory=list)
    keys: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close(), which also returns the idx
            fileobj=self.fileobj, mode="w", format=tarfile.USTAR_FORMAT
        )

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        header_at = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return header_at + tarfile.BLOCKSIZE, len(data)  # ustar: exactly one header block

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample's members in MEMBER_EXTS order."""
        parts = []
        for ext in MEMBER_EXTS:
            name = f"{key}.{ext}"
            offset, size = self._add(name, members[ext])
            parts.append(f"{ext} {offset} {size} {name}")
        self._idx_lines.append(" ".join(parts))
        self.keys.append(key)

    def close(self) -> bytes:
        """Finish the tar; returns the DALI index file's bytes."""
        self._tar.close()
        lines = [f"{IDX_VERSION} {len(self._idx_lines)}", *self._idx_lines]
        return ("\n".join(lines) + "\n").encode()


def index_from_tar(fileobj: BinaryIO) -> bytes:
    """Rebuild the DALI index from a tar's own headers (verify compares it with the .idx)."""
    fileobj.seek(0)
    bundles: list[list[str]] = []
    last = None
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, _, ext = member.name.partition(".")
            if base != last:
                bundles.append([])
                last = base
            bundles[-1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    lines = [f"{IDX_VERSION} {len(bundles)}", *(" ".join(b) for b in bundles)]
    return ("\n".join(lines) + "\n").encode()
