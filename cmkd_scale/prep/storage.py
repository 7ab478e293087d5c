"""The output location (local dir or any fsspec URL) with atomic publishing of files.

Every file is first written under a hidden temporary name (``.NAME.<pid>-<random>.tmp``,
unique per writer, so concurrent tasks writing the same plan.json never collide) inside --out
and then renamed, so a reader never sees a partial file.  Remote outputs are spooled to a local
temporary file first and uploaded under the temporary name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def temp_name(name: str) -> str:
    """A hidden name for ``name`` that no other writer (process, task, host) uses."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


class Output:
    """Named files under one root directory, local or remote."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if create:
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        if "/" in name or name.startswith(".."):
            raise ValueError(f"refusing output name {name!r}: names stay inside --out")
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self.path(name), "rb")

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def names(self) -> list[str]:
        """Sorted names of the files directly under the root."""
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def remove_temps(self) -> list[str]:
        """Delete every temporary file left by killed writers (only when none is running)."""
        stale = [n for n in self.names() if n.startswith(".") and n.endswith(".tmp")]
        for name in stale:
            self.remove(name)
        return stale

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as ``name`` atomically."""
        with self.spool(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def spool(self, name: str) -> Iterator[BinaryIO]:
        """A local file to write; on clean exit it becomes ``name`` atomically, else vanishes."""
        tmp = self.path(temp_name(name))
        if self.is_local:
            try:
                with open(tmp, "w+b") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path(name))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        fd, local = tempfile.mkstemp(prefix="cmkd_prep_", suffix=".tmp")
        try:
            with os.fdopen(fd, "w+b") as f:
                yield f
            self.fs.put_file(local, tmp)
            self.fs.mv(tmp, self.path(name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)

    def copy_to_local(self, name: str, dest: str) -> None:
        """Download ``name`` to the local path ``dest`` (used by verify for remote outputs)."""
        with self.open(name) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
