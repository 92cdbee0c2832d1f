"""The admin credential: a random token in a mode-0600 file in the daemon user's runtime directory.

``lmutil`` run on the license server by the same user finds it by port (``admin-PORT.token``) with nothing
but ``-c PORT@HOST``; from elsewhere the operator passes ``--token-file``. Written atomically
(:func:`lmgrd.storage.atomic.write_atomic`), removed at shutdown if it is still ours.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from lmgrd.storage.atomic import write_atomic

__all__ = ["remove_token", "runtime_dir", "token_path", "write_token"]


def runtime_dir() -> Path:
    """Where the admin token lives: $LMGRD_RUNTIME_DIR, else the platform's per-user runtime directory."""
    env = os.environ.get("LMGRD_RUNTIME_DIR")
    if env:
        return Path(env)
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR (a service account, a container) platformdirs falls back to
        # /tmp/runtime-UID and warns on every call; the daemon logs the token path it uses instead.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir("lmgrd"))


def token_path(port: int, directory: Path | None = None) -> Path:
    return (directory or runtime_dir()) / f"admin-{port}.token"


def write_token(path: Path) -> str:
    """Create a fresh admin token in ``path`` (mode 0600, replacing any stale one) and return it."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, token.encode() + b"\n", mode=0o600, durable=False)
    return token


def remove_token(path: Path, token: str) -> None:
    """Remove the token file if it is still ours (a newer daemon on the same port may have replaced it)."""
    try:
        if path.read_text().strip() == token:
            path.unlink()
    except OSError:
        pass
