"""cmkd_scale: cross-model knowledge distillation for audio at AudioSet scale.

The definitions every stage shares live here (importing the package imports nothing else).
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

SAMPLE_RATE = 16000  # Hz, mono: what prep writes into every shard, what data and infer read


def sha256_of(fileobj: BinaryIO) -> tuple[str, int]:
    """(hex SHA-256, byte count) of a binary file object, read from its current position."""
    digest = hashlib.sha256()
    size = 0
    for block in iter(lambda: fileobj.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size
