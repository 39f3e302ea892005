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
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastpath.api import versions
from fastpath.errors import BadRequest
from fastpath.master import shm as shm_layout
from fastpath.settings import Settings

log = logging.getLogger("fastpath.metrics")

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

    Reads shared memory and the sidecars' published stats files only (no store call, no
    message to other processes): cellsync's ``DATA_DIR/run/cellsync.json`` gives the
    ``fastpath_cellsync_*`` series.  Other parts add their series through
    :meth:`add_source` (a callable returning exposition lines, called per scrape; it must
    not open a store transaction either, or say so in its HELP text).
    """

    def __init__(self, shm: shm_layout.SharedState | None, routes: list[RouteSpec],
                 data_dir: str | None = None) -> None:
        self.shm = shm
        self.data_dir = data_dir
        # Row 0 counts requests that matched no route.
        self.names = ["unmatched"] + [f"{r.method} {r.template}" for r in routes]
        self.sources: list[Callable[[], list[str]]] = []

    def add_source(self, source: Callable[[], list[str]]) -> None:
        """Append ``source()``'s lines to every scrape (e.g. the forwarder's outbox depth)."""
        self.sources.append(source)

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
            lines += self._sidecar_lines(self.shm)
        if self.data_dir is not None:
            lines += cellsync_metric_lines(self.data_dir)
        for source in self.sources:
            try:
                lines += source()
            except Exception:  # noqa: BLE001 - one broken source must not hide the rest
                log.exception("a /metrics source failed")
        return ("\n".join(lines) + "\n").encode("ascii")

    @staticmethod
    def _sidecar_lines(shm: shm_layout.SharedState) -> list[str]:
        by_role = shm.ready_by_role()
        lines = [
            "# HELP fastpath_sidecars_ready Sidecar processes of the master (cells, cellsync, "
            "forwarder) currently ready, by role.",
            "# TYPE fastpath_sidecars_ready gauge",
        ]
        for role in (shm_layout.ROLE_CELL, shm_layout.ROLE_CELLSYNC, shm_layout.ROLE_FORWARDER):
            ready, _ = by_role.get(role, (0, 0))
            lines.append(f'fastpath_sidecars_ready{{role="{shm_layout.ROLE_NAMES[role]}"}} {ready}')
        return lines


# (name, stats key, type, help) of the per-cell cellsync series.
_CELLSYNC_SERIES = (
    ("fastpath_cellsync_lag_seconds", "lag_seconds", "gauge",
     "Age of the oldest change of the cell not yet applied to the store."),
    ("fastpath_cellsync_lag_seqs", "lag_seqs", "gauge",
     "Change-feed entries of the cell not yet applied (feed head minus cursor)."),
    ("fastpath_cellsync_changes_applied_total", "applied_total", "counter",
     "Servers applied to the store from the cell since cellsync started."),
    ("fastpath_cellsync_resyncs_total", "resyncs_total", "counter",
     "Full resyncs of the cell since cellsync started (gap, regression, requested)."),
    ("fastpath_cellsync_batches_total", "batches_total", "counter",
     "Store write transactions that applied changes of the cell since cellsync started."),
)


def cellsync_metric_lines(data_dir: str) -> list[str]:
    """The ``fastpath_cellsync_*`` series, from the stats cellsync publishes (a small file:
    no store transaction).  Nothing if cellsync never ran for this data dir."""
    from fastpath.master.status import read_cellsync_stats

    doc = read_cellsync_stats(data_dir)
    if doc is None:
        return []
    cells = doc["cells"]
    lines: list[str] = []
    for name, key, kind, text in _CELLSYNC_SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for cell in sorted(cells):
            value = cells[cell].get(key) if isinstance(cells[cell], dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                lines.append(f'{name}{{cell="{_label(cell)}"}} {value}')
    try:
        age = max(0.0, time.time() - float(doc.get("updated_at", 0)))
    except (TypeError, ValueError):
        age = float("inf")
    lines += [
        "# HELP fastpath_cellsync_stats_age_seconds Seconds since cellsync last published "
        "these figures (it does at least every few seconds while it runs).",
        "# TYPE fastpath_cellsync_stats_age_seconds gauge",
        f"fastpath_cellsync_stats_age_seconds {age:.3f}",
    ]
    return lines


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped, ASCII only."""
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return out.encode("ascii", "backslashreplace").decode("ascii")


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
    # Route names are filled below, once the table is complete.
    metrics = Metrics(shm, [], data_dir=settings["data_dir"])
    from fastpath import forwarder

    metrics.add_source(lambda: forwarder.metric_lines(store, settings["data_dir"]))
    routes.append(RouteSpec("GET", "/metrics", metrics, auth=False, versioned=False))
    if settings["debug.test_routes"]:
        routes.append(RouteSpec("GET", "/debug/sleep", _debug_sleep, auth=False, versioned=False))
        routes.append(RouteSpec("POST", "/debug/echo", _debug_echo, auth=False, versioned=False))
    routes += servers.routes(ctx)
    routes += catalog.routes(ctx)
    from fastpath.api import instance_actions

    routes += instance_actions.routes(ctx)
    from fastpath.api import metadata_commands

    routes += metadata_commands.routes(ctx)
    from fastpath.api import catalog_commands

    routes += catalog_commands.routes(ctx)
    from fastpath.api import server_commands

    routes += server_commands.routes(ctx)
    metrics.names = ["unmatched"] + [f"{r.method} {r.template}" for r in routes]
    if len(routes) + 1 > shm_layout.MAX_ROUTES:
        raise ValueError(f"{len(routes)} routes exceed the metrics table ({shm_layout.MAX_ROUTES})")
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    default_host = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    return Plan(settings=settings, routes=routes, default_host=default_host.encode(), context=ctx)
