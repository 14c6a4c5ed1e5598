"""Crash-safe file writing shared by the model format and stream snapshots.

A reader (or a restarted daemon) must see either the old file or the new one, never half of each:
the bytes go to a temporary file in the same directory, are flushed and fsynced, the temporary file is
renamed over the target (atomic on POSIX and Windows), and the directory is fsynced so the rename
itself survives a power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

NEW_FILE_MODE = 0o644
"""Mode of a newly created file (mkstemp's 0600 would hide models from the service user)."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; on any failure the old file (if any) is untouched."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, target)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Not possible on Windows, where rename is durable enough."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
