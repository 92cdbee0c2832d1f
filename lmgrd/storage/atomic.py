"""The one way lmgrd writes a small file: completely or not at all.

Used for the activation records, the admin token, the metrics textfile and the vendor's license and
revocation files. (The lease journal has its own append-and-compact discipline in :mod:`.journal`.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, durable: bool = True,
                 replace: bool = True) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a part.

    The data goes to a temporary file beside ``path`` (named ``.NAME.XXXX.tmp``, so no ``*.prom`` or ``*.lic``
    glob picks it up), which is then renamed over ``path``, or, with ``replace=False``, hard-linked to it so
    an existing file is never overwritten.

    Args:
        mode: the file's permission bits (0o600 for secrets).
        durable: fsync the file before the rename and the directory after it, so a power loss keeps it.
        replace: False to refuse (``FileExistsError``) when ``path`` exists, without a window in which a
            file created meanwhile could be replaced.

    Raises:
        FileExistsError: ``replace=False`` and ``path`` exists.
        OSError: the directory is not writable, the disk is full, ...; ``path`` is then untouched.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and os.name == "posix":
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
