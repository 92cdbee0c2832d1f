"""Fixtures for the client stub's unit tests: an event-loop runner (asyncio and uvloop, debug mode, any
unhandled loop exception fails the test) and the scripted protocol server (see scripted_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from scripted_server import ScriptedServer

LOOPS = ["asyncio"]
with contextlib.suppress(ImportError):
    import uvloop  # noqa: F401

    LOOPS.append("uvloop")

@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Run a coroutine function on a fresh loop (asyncio and uvloop, debug mode). Any exception the loop
    reports (a task that failed unobserved, a future's exception never retrieved) fails the test."""
    errors: list[dict[str, Any]] = []

    def runner(fn: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
        loop: asyncio.AbstractEventLoop
        if request.param == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 10.0  # the shared CI machine is slow; not what these tests check
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        async def main() -> Any:
            async with asyncio.timeout(timeout):
                return await fn()

        try:
            return loop.run_until_complete(main())
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            gc.collect()  # surface "exception was never retrieved" now, while errors is checked
            assert not errors, f"unhandled exceptions in the event loop: {errors}"
            assert not pending, f"tasks left running after the test: {pending}"

    yield runner


@pytest.fixture
def scripted() -> Callable[..., ScriptedServer]:
    """Make scripted servers (start them inside the test's loop with ``await srv.start()``)."""

    def make(**kw: Any) -> ScriptedServer:
        return ScriptedServer(**kw)

    return make
