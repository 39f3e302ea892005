# cython: language_level=3
"""fastpath's request path: HTTP/1.1 on httptools, routing, auth, microversions, rendering,
metrics — compiled.

One process runs one :class:`Worker`; its per-process state lives in module-level C
variables (there is exactly one worker per process), so the hot path reads them without an
attribute lookup.  The pieces, by concern:

* ``http/clock.pxi``        coarse clock, Date header, request ids
* ``http/response.pxi``     status lines, header block, one write per response
* ``http/microversion.pxi`` Nova's microversion negotiation
* ``http/router.pxi``       the compiled route tree
* ``http/protocol.pxi``     the asyncio protocol (httptools callbacks, limits, pipelining)
* ``http/handlers.pxi``     the handlers compiled in (version documents, health)
* ``http/views.pxi``        server views assembled from pre-rendered fragment blobs
* ``http/serverpath.pxi``   the default servers list page and the plain show, compiled
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t, int64_t, uint8_t
from libc.string cimport memcpy, memcmp, memchr
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport malloc, realloc, free

import asyncio
import collections
import json
import logging
import os

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from fastpath.errors import HTTPFault, fault_name

cdef extern from "_core_hash.h":
    const char* FASTPATH_SOURCE_HASH

SOURCE_HASH = FASTPATH_SOURCE_HASH.decode("ascii")

log = logging.getLogger("fastpath.http")

# Nova's microversion range (the C constants MV_MIN/MV_MAX of _core.pxd, for Python).
MAX_VERSION = MV_MAX
MIN_VERSION = MV_MIN

include "http/clock.pxi"
include "http/metrics.pxi"
include "http/response.pxi"
include "http/microversion.pxi"
include "http/router.pxi"
include "http/protocol.pxi"
include "http/handlers.pxi"
include "http/views.pxi"
include "http/serverpath.pxi"


# --------------------------------------------------------------------------------------
# Per-process state: one Worker per process.

cdef Worker _worker = None

# Limits (copied from the settings at Worker start; read by the protocol per request).
cdef Py_ssize_t _max_header_size = 16384
cdef int _max_headers = 100
cdef Py_ssize_t _max_body_size = 1048576
cdef double _header_timeout = 10.0
cdef double _body_timeout = 30.0
cdef double _keepalive_timeout = 30.0
cdef Py_ssize_t _max_connections = 10000

# Auth (noauth2): opaque tokens map to this project; this user is admin.
cdef str _default_project = "default"
cdef str _admin_user = "admin"
cdef object _authenticator = None   # a Python callable for strategies other than noauth2

cdef RouteNode _root = None
cdef object _conns = None           # set of live HttpProtocol
cdef object _loop = None


cdef class Worker:
    """Owns the compiled plan, the connections and the once-a-second tick of a process."""

    cdef readonly object plan
    cdef readonly bint stopping
    cdef object _shm
    cdef Py_ssize_t _slot_offset
    cdef object _tick_handle
    cdef object _shutdown_done
    cdef double _shutdown_deadline
    cdef readonly list routes

    def __init__(self, plan, shm_buf, Py_ssize_t slot_offset, loop):
        global _worker, _root, _conns, _loop
        global _max_header_size, _max_headers, _max_body_size, _header_timeout
        global _body_timeout, _keepalive_timeout, _max_connections
        global _default_project, _admin_user, _authenticator
        self.plan = plan
        self.stopping = False
        self._shm = shm_buf
        self._slot_offset = slot_offset
        self._tick_handle = None
        self._shutdown_done = None
        s = plan.settings
        _max_header_size = s["http.max_header_size"]
        _max_headers = s["http.max_headers"]
        _max_body_size = s["http.max_body_size"]
        _header_timeout = s["http.header_timeout"]
        _body_timeout = s["http.body_timeout"]
        _keepalive_timeout = s["http.keepalive_timeout"]
        _max_connections = s["http.max_connections"]
        _default_project = s["auth.default_project"]
        _admin_user = s["auth.admin_user"]
        _authenticator = plan.authenticator
        self.routes = []
        _root = compile_routes(plan.routes, self.routes)
        for api_root in plan.api_roots:
            mark_api_root(api_root)
        _conns = set()
        _loop = loop
        metrics_attach(shm_buf, slot_offset, len(self.routes) + 1)
        handlers_init(plan)
        clock_init()
        _worker = self

    def protocol_factory(self):
        return HttpProtocol.__new__(HttpProtocol)

    def start(self):
        """Start the tick and mark this process ready in its slot."""
        self._tick()
        metrics_set_ready(1)

    def _tick(self):
        # PERF: one timer per process instead of one per connection: the tick refreshes the
        # coarse clock and the Date header, beats the heartbeat and sweeps the deadlines.
        self.tick()
        self._tick_handle = _loop.call_later(clock_next_tick_delay(), self._tick)

    def tick(self):
        """One tick, without scheduling the next (tests call it to drive timeouts)."""
        clock_tick()
        metrics_heartbeat()
        cdef HttpProtocol p
        cdef list expired = None
        for p in _conns:
            if p.deadline != 0 and p.deadline < _now:
                if expired is None:
                    expired = []
                expired.append(p)
        if expired is not None:
            for p in expired:
                p.timed_out()
        if self.stopping:
            self._check_shutdown()

    def begin_shutdown(self, double grace, done):
        """Graceful stop: idle connections close now, busy ones after their response."""
        cdef HttpProtocol p
        self.stopping = True
        self._shutdown_done = done
        self._shutdown_deadline = _now + grace
        for p in list(_conns):
            p.shutdown()
        self._check_shutdown()

    cdef _check_shutdown(self):
        if not _conns or _now >= self._shutdown_deadline:
            done = self._shutdown_done
            self._shutdown_done = None
            if done is not None:
                metrics_set_ready(0)
                done()

    def connection_count(self):
        return len(_conns)

    def close_all(self):
        cdef HttpProtocol p
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for p in list(_conns):
            p._close()
        metrics_set_ready(0)

    def counters(self):
        """This process's request counters: {(route_index, status): n} (tests use it)."""
        return metrics_snapshot()

    def store_txn_counts(self):
        return metrics_store_txns()


def make_request_id():
    """A request id as the worker would stamp it (tests check the format)."""
    return new_request_id().decode("ascii")
