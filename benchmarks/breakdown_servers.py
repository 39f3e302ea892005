#!/usr/bin/env python3
"""Where the time of one read request goes, stage by stage, in process.

    python benchmarks/breakdown_servers.py [--servers 1000] [-n 2000] [--repeat 7]

Seeds the harness Worker's store as ``bench_servers.py`` does, captures the real
``Request`` of one ``GET /v2.1/servers/detail?limit=100`` (and of a show), then times
cumulative prefixes of the handler's work with the same calls the handler makes
(src/fastpath/api/servers.py ``ServerRoutes._list`` / ``show``), so each stage's cost is
the difference between two lines:

* ``read txn``: ``with store.read()`` (begin + abort, counters);
* ``+ plan``: ``_ListPlan(req)``: query parse, schema, options, sort;
* ``+ walk``: ``plan.run(r)``: the cursor walk and one ``unpack_index`` (msgpack ->
  IndexEntry) per server, filters;
* ``+ view gets``: one ``r.view(u, b"server")`` per server;
* ``+ join``: ``views.servers_json_join`` (compiled, buffers -> one bytes);
* ``handler``: ``ServerRoutes.detail(req)`` itself (adds the next link and the wrapper);
* ``whole request``: ``data_received`` of the bytes wrk sends (parse, route, auth,
  microversion, handler, head, ``transport.write``).

The sub-stages ``walk only`` (cursor iteration, no decoding) and ``unpack_index x100``
split the walk.  Minimum over ``--repeat`` runs of ``-n`` calls, in microseconds per call.
Use it beside ``perf record -g python benchmarks/breakdown_servers.py --loop detail``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from _harness import (
    SEED_PROJECT,
    Harness,
    newest_of_project,
    request,
    seed_batches,
    seed_uuid,
    status_of,
)

TOKEN = b"X-Auth-Token: fake:" + SEED_PROJECT.encode()
MV = b"OpenStack-API-Version: compute 2.104"


def _link_project(req: Any) -> bytes:
    # The handlers' helper (its name moved while the API modules were being refactored).
    from fastpath.api import servers

    fn = getattr(servers, "link_project", None) or servers._link_project
    return bytes(fn(req))


def _strict_query(req: Any) -> None:
    from fastpath.api import servers

    try:
        servers.Q.strict(req)
    except TypeError:  # the older signature: (params, version)
        servers.Q.strict(servers.Q.parse(req.query_string), req.version)


def timeit(fn: Callable[[], Any], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def capture_request(h: Harness, data: bytes) -> Any:
    """The ``Request`` object _core hands the handler for ``data``."""
    from fastpath.api import servers

    seen: list[Any] = []
    orig = servers._ListPlan.__init__
    orig_show = servers.ServerRoutes._visible

    def spy(self: Any, req: Any, *a: Any) -> None:
        seen.append(req)
        orig(self, req, *a)

    def spy_show(r: Any, req: Any, server_id: str) -> bool:
        seen.append(req)
        return orig_show(r, req, server_id)

    servers._ListPlan.__init__ = spy  # type: ignore[method-assign]
    servers.ServerRoutes._visible = staticmethod(spy_show)  # type: ignore[assignment]
    compiled = getattr(servers, "COMPILED", None)
    if compiled is not None:
        servers.COMPILED = False  # the compiled paths would answer before any spy runs
    try:
        proto, transport = h.connect()
        proto.data_received(data)
        assert status_of(transport.out[-1]) == 200, transport.out[-1][:300]
    finally:
        if compiled is not None:
            servers.COMPILED = compiled
        servers._ListPlan.__init__ = orig  # type: ignore[method-assign]
        servers.ServerRoutes._visible = staticmethod(orig_show)  # type: ignore[assignment]
    return seen[0]


def list_stages(
    row: Callable[..., float], h: Harness, handlers: Any, detail: bool, data: bytes,
    proto: Any,
) -> None:
    """The rows of one list request (detail or index), cumulative prefixes of ``_list``."""
    from fastpath.api import servers, views
    from fastpath.store import record as R

    store = h.plan.context.store
    max_limit = handlers.max_limit
    req = capture_request(h, data)
    summary = not detail
    base = req.base_url.encode()
    lp = _link_project(req)

    def txn() -> None:
        with store.read():
            pass

    def plan() -> None:
        with store.read():
            servers._ListPlan(req, detail, max_limit)

    def walk() -> None:
        with store.read() as r:
            servers._ListPlan(req, detail, max_limit).run(r)

    def gets() -> None:
        with store.read() as r:
            found = servers._ListPlan(req, detail, max_limit).run(r)
            [r.view(u, views.VIEW_ID) for u, _ in found]

    def join() -> None:
        with store.read() as r:
            found = servers._ListPlan(req, detail, max_limit).run(r)
            blobs = [r.view(u, views.VIEW_ID) for u, _ in found]
            views.servers_json_join(blobs, req.version, req.is_admin, base, summary, lp)

    def walk_only() -> None:
        with store.read() as r:
            for i, _ in enumerate(r.walk(SEED_PROJECT)):
                if i == 99:
                    break

    with store.read() as r:
        packed = [bytes(v) for _, (_, v) in zip(range(100), r.walk(SEED_PROJECT), strict=False)]
        found = servers._ListPlan(req, detail, max_limit).run(r)
        blobs = [bytes(r.view(u, views.VIEW_ID)) for u, _ in found]

    def unpack() -> None:
        for v in packed:
            R.unpack_index(v)

    def join_only() -> None:
        views.servers_json_join(blobs, req.version, req.is_admin, base, summary, lp)

    def compiled() -> None:
        with store.read() as r:
            servers._core.servers_page(req, r.txn, r.dbs, detail, max_limit)

    handler = handlers.detail if detail else handlers.index
    label = "GET /servers/detail?limit=100" if detail else "GET /servers?limit=100"
    row(f"-- {label}", None)
    row("read txn (begin + abort)", txn)
    row("+ _ListPlan (query, schema, sort)", plan)
    row("+ walk: run() (cursor + unpack_index, x100)", walk)
    row("+ view gets (x100)", gets)
    row("+ servers_json_join", join)
    row("handler (ServerRoutes.%s)" % ("detail" if detail else "index"), lambda: handler(req))
    if hasattr(servers._core, "servers_page"):
        row("  of which: read txn + compiled _core.servers_page", compiled)
    row("whole request (data_received -> write)", lambda: proto.data_received(data))
    row("  apart: walk only, no decoding (x100)", walk_only)
    row("  apart: unpack_index (x100)", unpack)
    row("  apart: servers_json_join of bytes blobs", join_only)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", type=int, default=1000)
    p.add_argument("-n", type=int, default=2000, help="calls per timing (default 2000)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument(
        "--loop",
        choices=("detail", "list", "show"),
        help="only run that whole request in a loop for -n x --repeat calls (for a profiler)",
    )
    args = p.parse_args(argv)

    from fastpath.api import servers, views

    h = Harness()
    try:
        store = h.plan.context.store
        for batch in seed_batches(args.servers, 1):
            store.apply(batch, render=views.render_server)
        show_id = seed_uuid(newest_of_project(args.servers, 1))
        reqs = {
            "detail": request(b"/v2.1/servers/detail?limit=100", TOKEN, MV),
            "list": request(b"/v2.1/servers?limit=100", TOKEN, MV),
            "show": request(f"/v2.1/servers/{show_id}".encode(), TOKEN, MV),
        }
        proto, transport = h.connect()
        if args.loop:
            data = reqs[args.loop]
            t0 = time.perf_counter()
            for _ in range(args.n * args.repeat):
                proto.data_received(data)
            dt = time.perf_counter() - t0
            print(f"{args.loop}: {dt / (args.n * args.repeat) * 1e6:.1f} us/request")
            return 0

        handlers = servers.ServerRoutes(h.plan.context)
        n, rep = args.n, args.repeat
        rows: list[tuple[str, float]] = []

        def row(name: str, fn: Callable[[], Any] | None, calls: int = n) -> float:
            us = 0.0 if fn is None else timeit(fn, calls, rep)
            rows.append((name, us))
            return us

        for detail, key in ((True, "detail"), (False, "list")):
            list_stages(row, h, handlers, detail, reqs[key], proto)

        req = capture_request(h, reqs["show"])
        base = req.base_url.encode()
        lp = _link_project(req)
        row("-- GET /servers/{id}", None)

        def txn() -> None:
            with store.read():
                pass


        def show_txn_head() -> None:
            with store.read() as r:
                handlers._visible(r, req, show_id)

        def show_view() -> None:
            with store.read() as r:
                handlers._visible(r, req, show_id)
                blob = r.view(show_id, views.VIEW_ID)
                views.server_json(blob, req.version, req.is_admin, base, lp)

        with store.read() as r:
            blob1 = bytes(r.view(show_id, views.VIEW_ID))
        row("read txn (begin + abort)", txn, n * 10)
        row("+ head (frame get, project check)", show_txn_head, n * 10)
        row("+ view get + server_json", show_view, n * 10)
        row("handler (ServerRoutes.show)", lambda: handlers.show(req), n * 10)
        if hasattr(servers._core, "server_show"):
            def show_compiled() -> None:
                with store.read() as r:
                    servers._core.server_show(req, r.txn, r.dbs)

            row("  of which: read txn + compiled _core.server_show", show_compiled, n * 10)
        row("whole request (data_received -> write)",
            lambda: proto.data_received(reqs["show"]), n * 10)
        row("  apart: server_json of a bytes blob",
            lambda: views.server_json(blob1, req.version, req.is_admin, base, lp), n * 10)
        row("  apart: query check (Q.strict)", lambda: _strict_query(req), n * 10)

        width = max(len(name) for name, _ in rows)
        print(f"servers seeded: {args.servers}; min of {rep} x calls; microseconds per call")
        for name, us in rows:
            print(f"\n{name}" if name.startswith("--") else f"  {name:<{width}} {us:9.2f}")
    finally:
        h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
