"""The HTTP API (``docs/CLOUD_API.md``) as a Starlette application: bounded bodies, rate limits, metrics, and
every failure answered as JSON with a wire code (a bad request is a 4xx naming the field, never a 500).

Why Starlette: a small ASGI toolkit (routing, requests, responses, lifespan) with no ORM, templating or
validation layer of its own to fight; the documents are validated by ``protocol.cloud``, the one parser both
ends share. It runs on uvicorn (the project already follows uvicorn's design) and its whole API is two
endpoints plus health and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmgrd.vendor.lmcloud.db import ping
from lmgrd.vendor.lmcloud.store import Outcome, Refusal, Store
from protocol.cloud import (
    MAX_BODY_BYTES,
    CheckInRequest,
    CloudDocumentError,
    loads_document,
    parse_document,
    verify_activation_request,
    verify_check_in_request,
)
from protocol.errors import ErrorCode
from protocol.license import format_timestamp

__all__ = ["RateLimiter", "build_app"]

logger = logging.getLogger(__name__)

#: How often stale nonces are pruned (seconds).
PRUNE_EVERY_SECONDS: Final = 3600.0
#: Buckets kept per limiter before the least recently used are forgotten (a forgotten bucket is a full one).
MAX_BUCKETS: Final = 100_000


class RateLimiter:
    """Token buckets keyed by a customer ID or an address: ``per_minute`` requests a minute, bursts as large.

    Per service process (several instances each allow the rate). ``per_minute`` 0 turns the limit off.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, key: str) -> float | None:
        """Take one token for ``key``; ``None`` if allowed, else the seconds until one is available."""
        if self.capacity <= 0:
            return None
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = None
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.activations = Counter("lmcloud_activations", "Activation requests by result", ["result"],
                                   registry=self.registry)
        self.check_ins = Counter("lmcloud_check_ins", "Check-ins by result", ["result"], registry=self.registry)
        self.conflicts = Counter("lmcloud_conflicts", "Activation conflicts (another machine)",
                                 registry=self.registry)
        self.clones = Counter("lmcloud_suspected_clones", "Stale check-in tokens presented (suspected clones)",
                              registry=self.registry)
        self.rate_limited = Counter("lmcloud_rate_limited", "Requests answered 429", ["scope"],
                                    registry=self.registry)
        self.duration = Histogram("lmcloud_request_duration_seconds", "Request latency", ["endpoint"],
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                                  registry=self.registry)
        for result in ("activated", "already_active", "pending", "conflict", "revoked", "refused"):
            self.activations.labels(result)
        for result in ("renewed", "retry", "revoked", "conflict", "suspected_clone", "not_activated", "refused"):
            self.check_ins.labels(result)
        for scope in ("customer", "address"):
            self.rate_limited.labels(scope)


def _error(status: int, code: ErrorCode, message: str, hint: str = "", headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"status": "error", "error": {"code": str(code), "message": message, "hint": hint}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _outcome(outcome: Outcome) -> JSONResponse:
    if outcome.status == "active":
        return JSONResponse({"status": "active", "certificate": outcome.certificate}, status_code=200)
    if outcome.status == "pending":
        assert outcome.activates_at is not None
        return JSONResponse({"status": "pending", "activates_at": format_timestamp(
            datetime.fromtimestamp(outcome.activates_at, UTC)), "error": {
            "code": str(ErrorCode.LICENSE_NOT_ACTIVATED), "message": outcome.message, "hint": outcome.hint}},
            status_code=202)
    return JSONResponse({"status": "revoked", "revocation": outcome.revocation, "error": {
        "code": str(ErrorCode.LICENSE_REVOKED), "message": outcome.message, "hint": outcome.hint}}, status_code=410)


def _refusal(refusal: Refusal) -> JSONResponse:
    extra: dict[str, Any] = {}
    if refusal.conflict_hostname is not None and refusal.conflict_since is not None:
        extra["conflict"] = {"hostname": refusal.conflict_hostname, "since": format_timestamp(
            datetime.fromtimestamp(refusal.conflict_since, UTC))}
    return _error(refusal.http_status, refusal.code, refusal.message, refusal.hint, **extra)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _loose_customer_id(data: Any) -> str | None:
    """The customer ID a body claims, before validation (for the per-customer rate limit only)."""
    if isinstance(data, dict) and isinstance(data.get("document"), dict):
        cid = data["document"].get("customer_id")
        if isinstance(cid, str):
            return cid[:32]
    return None


#: Database faults answered 503 STORE_UNAVAILABLE (the service's trouble, for the client to retry).
_STORE_FAULTS: Final = (OSError, asyncio.TimeoutError, sa.exc.OperationalError, sa.exc.InterfaceError,
                        sa.exc.DBAPIError, sa.exc.TimeoutError)


def build_app(store: Store, clock: Callable[[], float], *, rate_per_customer: float = 30.0,
              rate_per_address: float = 600.0) -> Starlette:
    """The ASGI application over ``store``; ``clock()`` is the service's clock (epoch seconds)."""
    metrics = _Metrics()
    by_customer = RateLimiter(rate_per_customer)
    by_address = RateLimiter(rate_per_address)

    def limited(scope: str, wait: float) -> JSONResponse:
        metrics.rate_limited.labels(scope).inc()
        seconds = max(1, math.ceil(wait))
        what = "this customer ID" if scope == "customer" else "this address"
        return _error(429, ErrorCode.RATE_LIMITED, f"too many requests for {what}; retry in {seconds} s",
                      "the daemon retries by itself after Retry-After", headers={"Retry-After": str(seconds)},
                      retry_after_seconds=seconds)

    async def handle(request: Request, endpoint: str) -> JSONResponse:
        counter = metrics.activations if endpoint == "activations" else metrics.check_ins
        address = request.client.host if request.client else "unknown"
        wait = by_address.retry_after(address)
        if wait is not None:
            return limited("address", wait)
        try:
            body = await _read_body(request)
        except _TooLarge:
            counter.labels("refused").inc()
            return _error(413, ErrorCode.BAD_REQUEST, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                          "send one signed document as the API describes")
        try:
            data = loads_document(body, "request")
            cid = _loose_customer_id(data)
            if cid is not None:
                wait = by_customer.retry_after(cid)
                if wait is not None:
                    return limited("customer", wait)
            now = int(clock())
            if endpoint == "activations":
                outcome = await store.activate(verify_activation_request(data), now)
            else:
                req, _ = parse_document(data, CheckInRequest)

                def verify(key: str) -> None:
                    verify_check_in_request(data, key)

                outcome = await store.check_in(req, verify, now)
        except CloudDocumentError as exc:
            counter.labels("refused").inc()
            return _error(400, exc.code, exc.message, exc.hint)
        except Refusal as refusal:
            counter.labels(refusal.metric).inc()
            if refusal.metric == "conflict":
                metrics.conflicts.inc()
            elif refusal.metric == "suspected_clone":
                metrics.clones.inc()
            return _refusal(refusal)
        except _STORE_FAULTS as exc:
            logger.error("database fault on %s: %s", endpoint, exc)
            return _error(503, ErrorCode.STORE_UNAVAILABLE, "the activation service's database is unavailable",
                          "retry later; the license keeps being served on its certificate meanwhile")
        counter.labels(outcome.metric).inc()
        return _outcome(outcome)

    async def activations_endpoint(request: Request) -> Response:
        with metrics.duration.labels("activations").time():
            return await handle(request, "activations")

    async def check_ins_endpoint(request: Request) -> Response:
        with metrics.duration.labels("check_ins").time():
            return await handle(request, "check_ins")

    async def healthz(request: Request) -> Response:
        with metrics.duration.labels("healthz").time():
            try:
                async with store.engine.connect() as conn:
                    await asyncio.wait_for(ping(conn), 5.0)
            except _STORE_FAULTS as exc:
                return _error(503, ErrorCode.STORE_UNAVAILABLE, f"the database does not answer: {exc}")
            return JSONResponse({"status": "ok", "time": format_timestamp(datetime.fromtimestamp(clock(), UTC)),
                                 "service": "lmcloud", "api": 1})

    async def metrics_endpoint(request: Request) -> Response:
        with metrics.duration.labels("metrics").time():
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        metrics.duration.labels("other").observe(0.0)
        what = "no such endpoint" if exc.status_code == 404 else f"HTTP {exc.status_code}: {exc.detail}"
        return _error(exc.status_code, ErrorCode.BAD_REQUEST, f"{request.method} {request.url.path}: {what}",
                      "see docs/CLOUD_API.md: POST /v1/activations, POST /v1/check-ins, GET /healthz, GET /metrics")

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, ErrorCode.INTERNAL_ERROR, "internal error in the activation service",
                      "retry later; the vendor has the details in the service log")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def prune() -> None:
            while True:
                with contextlib.suppress(*_STORE_FAULTS):
                    await store.prune_nonces(int(clock()))
                await asyncio.sleep(PRUNE_EVERY_SECONDS)

        task = asyncio.create_task(prune())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[
            Route("/v1/activations", activations_endpoint, methods=["POST"]),
            Route("/v1/check-ins", check_ins_endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
