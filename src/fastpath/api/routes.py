"""The route table: what each (method, path template) is answered by.

The table is plain data, built once per worker at start (:func:`build_plan`); ``_core``
compiles it into its route tree.  A handler is either the name of a handler compiled into
``_core`` (``"core:..."``: the hot routes) or a Python callable (cold routes) that takes the
``_core.Request`` and returns ``(status, body[, extra_header_bytes[, content_type_line]])``
or an awaitable of that tuple.  Raising :class:`fastpath.errors.HTTPFault` answers with
Nova's error body.

The position of a route in the table is its metrics index (row of the shared-memory
counter table), so appending routes keeps the meaning of the earlier rows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath.api import versions
from fastpath.errors import BadRequest
from fastpath.master import shm as shm_layout
from fastpath.settings import Settings

API_ROOT = "/v2.1"
TEXT_PLAIN = b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"


@dataclass(frozen=True)
class RouteSpec:
    method: str
    template: str
    handler: str | Callable[[Any], Any]
    auth: bool = True  # a token is required (401 without one)
    versioned: bool = True  # microversion negotiated; version headers on the response


@dataclass
class Plan:
    """Everything a worker's ``_core`` needs, computed once at worker start."""

    settings: Settings
    routes: list[RouteSpec]
    api_roots: list[str] = field(default_factory=lambda: [API_ROOT])
    version_docs: tuple[Callable[[str], bytes], ...] = versions.RENDERERS
    default_host: bytes = b"localhost"
    authenticator: Callable[[bytes], tuple[str, str, bool] | None] | None = None
    context: Any = None  # fastpath.api.context.ApiContext (handlers close over it)


class Metrics:
    """``GET /metrics``: Prometheus text, summed over every API worker's shared-memory slot.

    Reads shared memory only (no store call, no message to other processes).
    """

    def __init__(self, shm: shm_layout.SharedState | None, routes: list[RouteSpec]) -> None:
        self.shm = shm
        # Row 0 counts requests that matched no route.
        self.names = ["unmatched"] + [f"{r.method} {r.template}" for r in routes]

    def __call__(self, req: Any) -> tuple[int, bytes, None, bytes]:
        return 200, self.render(), None, TEXT_PLAIN

    def render(self) -> bytes:
        from fastpath import _loader

        core = _loader.load_core()
        lines = [
            "# HELP fastpath_requests_total HTTP requests answered, by route and status.",
            "# TYPE fastpath_requests_total counter",
        ]
        restarts = 0
        reads = writes = 0
        if self.shm is not None:
            nroutes = len(self.names)
            sums = core.sum_counters(self.shm.buf, self.shm.nslots, nroutes, shm_layout.ROLE_WORKER)
            nstatus = shm_layout.NSTATUS
            for r, name in enumerate(self.names):
                row = sums[r * nstatus : (r + 1) * nstatus]
                for c, n in enumerate(row):
                    if n:
                        status = str(shm_layout.STATUSES[c]) if c < nstatus - 1 else "other"
                        lines.append(f'fastpath_requests_total{{route="{name}",status="{status}"}} {n}')
            restarts = self.shm.worker_restarts
            reads, writes = self.shm.store_txns(shm_layout.ROLE_WORKER)
        lines += [
            "# HELP fastpath_worker_restarts_total API worker processes respawned by the master.",
            "# TYPE fastpath_worker_restarts_total counter",
            f"fastpath_worker_restarts_total {restarts}",
            "# HELP fastpath_store_read_txn_total Store read transactions of the API workers.",
            "# TYPE fastpath_store_read_txn_total counter",
            f"fastpath_store_read_txn_total {reads}",
            "# HELP fastpath_store_write_txn_total Store write transactions of the API workers.",
            "# TYPE fastpath_store_write_txn_total counter",
            f"fastpath_store_write_txn_total {writes}",
        ]
        if self.shm is not None:
            up = sum(
                1
                for s in range(self.shm.nslots)
                if self.shm.role(s) == shm_layout.ROLE_WORKER and self.shm.pid(s) > 0 and self.shm.ready(s)
            )
            lines += [
                "# HELP fastpath_workers_ready API worker processes currently serving.",
                "# TYPE fastpath_workers_ready gauge",
                f"fastpath_workers_ready {up}",
            ]
        return ("\n".join(lines) + "\n").encode("ascii")


async def _debug_sleep(req: Any) -> tuple[int, bytes]:
    """``GET /debug/sleep?ms=N`` (only with debug.test_routes): an asynchronous handler that
    holds its connection, for tests of pipelining behind async work and of graceful stop."""
    ms = 0
    for part in req.query_string.split("&"):
        key, _, value = part.partition("=")
        if key == "ms":
            try:
                ms = int(value)
            except ValueError:
                raise BadRequest("ms must be an integer") from None
    if not 0 <= ms <= 60000:
        raise BadRequest("ms must be from 0 to 60000")
    await asyncio.sleep(ms / 1000)
    return 200, b'{"slept_ms": %d, "pid": %d}' % (ms, os.getpid())


def _debug_echo(req: Any) -> tuple[int, bytes]:
    """``POST /debug/echo`` (only with debug.test_routes): the body's length, for body tests."""
    body = req.body
    return 200, b'{"length": %d}' % len(body)


def build_plan(
    settings: Settings,
    shm: shm_layout.SharedState | None = None,
    slot: int | None = None,
    store: Any = None,
) -> Plan:
    """The route plan of one worker.  Opens the API store (after fork; its transaction
    counters go to ``slot`` of ``shm`` when given) unless ``store`` is passed."""
    from fastpath.api import catalog, servers
    from fastpath.api.context import ApiContext, open_store

    host, port = settings.bind_address
    if store is None:
        counters = (shm.buf, shm.slot_offset(slot)) if shm is not None and slot is not None else None
        store = open_store(settings, counters)
    ctx = ApiContext.create(settings, store)
    from fastpath.api import views

    try:
        views.configure(ctx.disabled_extensions)  # which fragments each view selects
    except ValueError as exc:
        from fastpath.errors import SettingsError

        raise SettingsError(f"setting 'api.disabled_extensions': {exc}") from None
    routes: list[RouteSpec] = [
        RouteSpec("GET", "/", "core:versions", auth=False, versioned=False),
        RouteSpec("GET", "/v2/", "core:version_v2", auth=False, versioned=False),
        RouteSpec("GET", API_ROOT + "/", "core:version_v21", auth=False, versioned=True),
        RouteSpec("GET", "/healthz", "core:healthz", auth=False, versioned=False),
    ]
    metrics = Metrics(shm, [])  # names filled below, once the table is complete
    routes.append(RouteSpec("GET", "/metrics", metrics, auth=False, versioned=False))
    if settings["debug.test_routes"]:
        routes.append(RouteSpec("GET", "/debug/sleep", _debug_sleep, auth=False, versioned=False))
        routes.append(RouteSpec("POST", "/debug/echo", _debug_echo, auth=False, versioned=False))
    routes += servers.routes(ctx)
    routes += catalog.routes(ctx)
    from fastpath.api import instance_actions

    routes += instance_actions.routes(ctx)
    metrics.names = ["unmatched"] + [f"{r.method} {r.template}" for r in routes]
    if len(routes) + 1 > shm_layout.MAX_ROUTES:
        raise ValueError(f"{len(routes)} routes exceed the metrics table ({shm_layout.MAX_ROUTES})")
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    default_host = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    return Plan(settings=settings, routes=routes, default_host=default_host.encode(), context=ctx)
