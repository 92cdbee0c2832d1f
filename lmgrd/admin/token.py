"""The admin credential: a random token in a mode-0600 file in the daemon user's runtime directory.

``lmutil`` run on the license server by the same user finds it by port (``admin-PORT.token``) with nothing
but ``-c PORT@HOST``; from elsewhere the operator passes ``--token-file``. Removed at shutdown if it is
still ours.

The directory is trusted only if nobody else can change it. Without ``XDG_RUNTIME_DIR`` the runtime
directory is ``/tmp/runtime-UID/lmgrd``, a path any local user can create first to read or swap the token.
So the directory is created mode 0700 (each missing level), and before the token is written it must be a
real directory owned by this user and writable by nobody else, and each directory above it owned by this
user or root and writable by nobody else unless sticky (``/tmp``); otherwise :class:`TokenDirUnsafe` says
which directory is wrong and why. The file is written to a new name opened with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted file or symlink is never followed or reused) and renamed over
the token path (a symlink there is replaced, never written through).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from lmgrd import LmgrdError

__all__ = ["TokenDirUnsafe", "check_token_dir", "remove_token", "runtime_dir", "token_path", "write_token"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class TokenDirUnsafe(LmgrdError):
    """The admin token's directory (or one above it) could be changed by another user."""


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


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and each missing parent, every one mode 0700 (``os.makedirs`` gives the mode to
    the last level only)."""
    missing: list[Path] = []
    p = directory
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile: checked below like any other
            os.mkdir(d, 0o700)


def check_token_dir(directory: Path) -> None:
    """Refuse a token directory another user could change.

    Raises:
        TokenDirUnsafe: naming the directory, its owner or mode, and what to do.
    """
    if os.name != "posix":
        return
    uid = os.geteuid()
    fix = ("remove it (or fix its owner and mode), or point LMGRD_RUNTIME_DIR or --admin-token-file at a "
           "directory of this user's own")
    d = directory.absolute()
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode):
        raise TokenDirUnsafe(f"the admin token directory {d} is a symbolic link (to {os.readlink(d)}); it may "
                             f"have been planted by another user to capture the token: {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise TokenDirUnsafe(f"the admin token directory {d} is not a directory: {fix}")
    if st.st_uid != uid:
        raise TokenDirUnsafe(f"the admin token directory {d} belongs to uid {st.st_uid}, not to this user "
                             f"(uid {uid}); another user may have created it to read or replace the token: {fix}")
    if st.st_mode & 0o022:
        raise TokenDirUnsafe(f"the admin token directory {d} has mode {stat.S_IMODE(st.st_mode):04o}: other users "
                             f"can add, replace or remove files in it (0700 is required): {fix}")
    for parent in d.parents:
        pst = os.stat(parent)  # above the token's own directory a system symlink (/var/run -> /run) is fine
        if pst.st_uid not in (uid, 0):
            raise TokenDirUnsafe(f"{parent}, above the admin token directory {d}, belongs to uid {pst.st_uid}, "
                                 f"not to this user (uid {uid}) or root; that user could replace the token "
                                 f"directory: {fix}")
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            raise TokenDirUnsafe(f"{parent}, above the admin token directory {d}, has mode "
                                 f"{stat.S_IMODE(pst.st_mode):04o} without the sticky bit: other users could "
                                 f"replace the token directory: {fix}")


def write_token(path: Path) -> str:
    """Create a fresh admin token in ``path`` (mode 0600, replacing any stale one) and return it.

    Raises:
        TokenDirUnsafe: the directory could be changed by another user (nothing is written).
        OSError: the directory cannot be created or written.
    """
    token = secrets.token_urlsafe(32)
    _make_dirs(path.parent)
    check_token_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(token.encode() + b"\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return token


def remove_token(path: Path, token: str) -> None:
    """Remove the token file if it is still ours (a newer daemon on the same port may have replaced it)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            ours = f.read(4096).decode("utf-8", "replace").strip() == token
        if ours:
            path.unlink()
    except OSError:
        pass
