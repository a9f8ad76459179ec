"""Writes that fail for lack of room: named with what was written, where, and the free space.

A full disk (or quota, or a read-only folder) surfaces as an ``OSError`` whose message names a
temporary file, or as torch's ``RuntimeError: [enforce fail at inline_container.cc:672] .
unexpected pos ...``, which names nothing. The export, the reports and the embedding caches
wrap their writes in ``named_write_failures``: the error says what could not be written, in
which folder, how much room its disk has left, and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

#: ``OSError`` numbers of a write refused for room or permission to write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
#: What torch's and numpy's writers say when the file system refuses a write.
WRITER_MESSAGES = ("inline_container", "PytorchStreamWriter", "file write failed")


class WriteFailed(RuntimeError):
    """Something could not be written: what, where, the disk's free space and what was kept."""


def free_mib(folder) -> float:
    """Free space (MiB) of the disk holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**20


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a write the file system refused (room, quota, read-only)."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return isinstance(error, RuntimeError) and any(m in str(error) for m in WRITER_MESSAGES)


@contextlib.contextmanager
def named_write_failures(what: str, folder, kept: str) -> Iterator[None]:
    """Turn a refused write inside the block into ``WriteFailed`` naming ``what`` and ``folder``.

    ``kept``: what the caller leaves as it was (e.g. "the previous reports are whole"). Other
    errors pass unchanged.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, WriteFailed) or not is_write_failure(error):
            raise
        raise WriteFailed(
            f"cannot write {what} in {folder} ({free_mib(folder):.0f} MiB free on its disk): "
            f"{type(error).__name__}: {error}. {kept}; free some space and run it again"
        ) from error
