"""Fixtures shared by the unit tests of lmgrd."""

from __future__ import annotations

import resource
import signal
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int], None]]:
    """Limit this process's file size (RLIMIT_FSIZE), so write(2) really fails with EFBIG past it
    (``resource.RLIM_INFINITY`` lifts it); restored, with the SIGXFSZ handler, after the test."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, old_limit[1]))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
