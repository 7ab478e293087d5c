"""Full disks and I/O errors in words: which file, how many bytes it needed, how many are free.

A full filesystem shows up as ``OSError(ENOSPC)`` from Python's own writes, but as a bare
``RuntimeError`` from torch's C++ writer (``basic_ios::clear: iostream error``,
``PytorchStreamWriter failed writing file``) and from libraries further down. Writers of big
files (checkpoints, exports, prep shards, the tracking journal) wrap their writes in
:func:`explain_storage_errors`, which turns any of these into one :class:`StorageError` whose
message names the path, the bytes needed and the free space, e.g.::

    checkpoint step-000006: writing /runs/x/checkpoints/step-000006 failed (no space left on
    device): it needs about 2.5 MB, 0.9 MB are free on the filesystem of /runs/x/checkpoints
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "this storage cannot take the write", not a bug in the writer
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error (EIO): a failing disk or network filesystem",
    errno.EFBIG: "file too large for this filesystem",
    errno.EROFS: "read-only filesystem",
}
# what a full disk looks like through torch's C++ writers and other native code
_NATIVE_MARKERS = (
    "iostream error",
    "file write failed",
    "No space left",
    "Disk quota exceeded",
    "Input/output error",
)


class StorageError(OSError):
    """A write failed for lack of space or an I/O error; ``str()`` is the whole explanation."""

    def __init__(self, message: str, *, path: Path, needed: int | None, free: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message


def human(n: int | None) -> str:
    """Bytes as ``1.2 GB`` / ``3.4 MB`` / ``512 B`` (decimal units, as df -H)."""
    if n is None:
        return "an unknown amount"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def existing_dir(path: Path) -> Path:
    """``path`` or its nearest existing parent directory (where ``disk_usage`` works)."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path | str) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (None: unknown, e.g.
    an object-store URL)."""
    if "://" in str(path):
        return None
    try:
        return shutil.disk_usage(existing_dir(path)).free
    except OSError:
        return None


def storage_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is a storage failure (``None``: it is some other error)."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[err.errno]
        if isinstance(err, (OSError, RuntimeError)):
            text = str(err)
            for marker in _NATIVE_MARKERS:
                if marker in text:
                    return f"no space left on device or an I/O error ({marker!r})"
    return None


def storage_message(
    what: str, path: Path | str, reason: str, *, needed: int | None, hint: str = ""
) -> StorageError:
    """The :class:`StorageError` for a failed write of ``path``: reason, need, free space."""
    remote = "://" in str(path)
    where: Path | str = str(path).rsplit("/", 1)[0] if remote else existing_dir(Path(path).parent)
    free = free_bytes(where)
    message = (
        f"{what}: writing {path} failed ({reason}): it needs about {human(needed)}, "
        f"{human(free)} {'is' if free is not None and free < 2 else 'are'} free on the "
        f"filesystem of {where}"
    )
    if hint:
        message += f". {hint}"
    return StorageError(message, path=Path(path), needed=needed, free=free)


@contextlib.contextmanager
def explain_storage_errors(
    what: str, path: Path | str, *, needed: int | None = None, hint: str = ""
) -> Iterator[None]:
    """Turn a full disk or an I/O error inside the block into one :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = storage_reason(exc)
        if reason is None:
            raise
        raise storage_message(what, path, reason, needed=needed, hint=hint) from exc
