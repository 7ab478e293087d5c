"""Read single samples out of the shard tars by byte range, and check them before DALI does.

DALI aborts the whole pipeline on one undecodable member, so every FLAC member handed to it
is checked first: the ``fLaC`` magic and the STREAMINFO header (parsed here from 42 bytes, no
decoder: 16 kHz, mono, at least one frame); the labels member must hold exactly C float32
values. Damage past the header is caught when DALI fails: the loader then decodes the
suspects with libsndfile (``decodes``) to name the bad member.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from cmkd_scale import SAMPLE_RATE
from cmkd_scale.data.manifest import ShardSet


@dataclass(frozen=True)
class Sample:
    """The members of one sample, as read from its shard."""

    index: int
    key: str
    shard: str
    flac: np.ndarray  # uint8, the encoded FLAC file
    labels: np.ndarray  # float32 [C] multi-hot


class MemberReader:
    """Range reads of sample members; local shards through cached file descriptors."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.table = shards.table
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _read_range(self, shard_no: int, start: int, end: int) -> bytes:
        shard = self.shards.shards[shard_no]
        path = self.shards.path(shard)
        if self.shards.is_local:
            with self._lock:
                fd = self._fds.get(shard_no)
                if fd is None:
                    fd = self._fds[shard_no] = os.open(path, os.O_RDONLY)
            return os.pread(fd, end - start, start)  # no seek: safe across threads
        return self.shards.fs.cat_file(path, start=start, end=end)

    def read(self, index: int) -> Sample:
        """Read one sample's FLAC and labels members (one contiguous range read)."""
        t = self.table
        shard_no = int(t.shard[index])
        name = self.shards.shards[shard_no]["name"]
        key = t.keys[index]
        if t.start[index] < 0:
            raise MemberError(name, key, "its shard is missing")
        (f_off, f_size), (l_off, l_size) = t.flac[index], t.labels[index]
        start = int(t.start[index])
        end = int(max(f_off + f_size, l_off + l_size))
        try:
            blob = self._read_range(shard_no, start, end)
        except Exception as exc:  # OSError, or an object store client's own (botocore's)
            where = self.shards.path(self.shards.shards[shard_no])
            raise MemberError(
                name,
                key,
                f"cannot be read from {where} ({type(exc).__name__}: {exc})",
                unreachable=is_unreachable(exc),
            ) from exc
        if len(blob) != end - start:
            raise MemberError(name, key, f"is truncated ({len(blob)} of {end - start} bytes)")
        view = np.frombuffer(blob, dtype=np.uint8)
        flac = view[f_off - start : f_off - start + f_size]
        labels = view[l_off - start : l_off - start + l_size]
        return Sample(int(index), key, name, flac, labels.view(np.float32))

    def check(self, sample: Sample, num_classes: int) -> None:
        """Raise MemberError unless the members look decodable (header-level check)."""
        if sample.labels.size != num_classes:
            size = sample.labels.size * 4
            raise MemberError(
                sample.shard, sample.key, f"labels hold {size} bytes, not {4 * num_classes}"
            )
        rate, channels, frames = flac_stream_info(sample.flac)
        if rate is None:
            raise MemberError(sample.shard, sample.key, "the .flac member is not FLAC")
        if rate != SAMPLE_RATE or channels != 1 or frames < 1:
            raise MemberError(
                sample.shard,
                sample.key,
                f"is {rate} Hz x {channels} ch x {frames} frames, not 16 kHz mono",
            )

    def decodes(self, index: int) -> bool:
        """Full decode with libsndfile: the slow check used to pinpoint a DALI failure."""
        try:
            sample = self.read(index)
            self.check(sample, self.shards.num_classes)
            data, _ = sf.read(io.BytesIO(sample.flac.tobytes()), dtype="float32")
        except (MemberError, sf.LibsndfileError, RuntimeError):
            return False
        return data.size > 0 and bool(np.isfinite(data).all())

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class MemberError(ValueError):
    """One sample cannot be used; names its shard and key."""

    def __init__(self, shard: str, key: str, why: str, *, unreachable: bool = False) -> None:
        super().__init__(f"shard {shard}, sample {key}: {why}")
        self.shard = shard
        self.key = key
        # the storage did not answer (connection refused, timeout): no other sample of it
        # can be read either, so skipping cannot help
        self.unreachable = unreachable


def is_unreachable(exc: BaseException) -> bool:
    """A connection failure (the server went away), not a missing or damaged object."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}  # botocore's are not OSError
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"})


def flac_stream_info(data: np.ndarray) -> tuple[int | None, int, int]:
    """(sample rate, channels, frames) from a FLAC file's STREAMINFO block; rate None if the
    bytes do not start like a FLAC file. Parses 42 header bytes: no decoder, no copy."""
    head = data[:42].tobytes()
    # "fLaC", then a metadata block header whose type (low 7 bits) is 0 = STREAMINFO, length 34
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0 or head[5:8] != b"\0\0\x22":
        return None, 0, 0
    # STREAMINFO bits 80..: sample rate (20), channels - 1 (3), bits - 1 (5), frames (36)
    packed = int.from_bytes(head[18:26], "big")
    rate = packed >> 44
    channels = ((packed >> 41) & 0x7) + 1
    frames = packed & ((1 << 36) - 1)
    return rate, channels, frames


def silent_flac() -> np.ndarray:
    """A one-sample silent FLAC: the mixup partner of clips that are not mixed."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1, dtype=np.int16), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()
