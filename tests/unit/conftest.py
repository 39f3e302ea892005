"""Shared fixtures of the protocol-level unit tests: an in-process Worker, a fake transport,
an independent HTTP/1.1 response parser and the ways of delivering bytes (whole, split at
every point, byte by byte).

No sockets and no processes: the protocol is driven through its asyncio.Protocol methods,
as uvloop would drive it, on a real uvloop loop that only runs when a test asks (async
handlers, deferred ``connection_lost``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from fastpath import _loader, settings
from fastpath.api.routes import RouteSpec, build_plan
from fastpath.errors import HTTPFault
from fastpath.master.shm import ROLE_WORKER, SharedState

HOST = "compute.test:8774"
REQUEST_ID = re.compile(r"^req-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# --------------------------------------------------------------------------------------
# Requests


def request(
    target: str = "/",
    *headers: str,
    method: str = "GET",
    body: bytes | None = None,
    version: str = "1.1",
    host: str | None = HOST,
) -> bytes:
    """One request; ``headers`` are "Name: value" lines; a body gets its Content-Length."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(headers)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(*parts: bytes) -> bytes:
    """A chunked body made of ``parts`` (then the last, empty chunk)."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + b"0\r\n\r\n"


def deliveries(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Every way the tests deliver ``data``: whole, split in two at every point, byte by byte."""
    yield "whole", [data]
    for i in range(1, len(data)):
        yield f"split at {i}", [data[:i], data[i:]]
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------------------
# An independent HTTP/1.1 response parser (Content-Length framing only: fastpath never
# sends chunked responses).


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")

    def all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"header {name} repeated: {values}"
        return values[0] if values else None

    def __getitem__(self, name: str) -> str:
        value = self.header(name)
        assert value is not None, f"no {name} header in {self.raw_head!r}"
        return value

    def json(self) -> Any:
        assert self.header("Content-Type") == "application/json", self.raw_head
        return json.loads(self.body)


class ParseError(AssertionError):
    pass


def parse_responses(data: bytes, head: Callable[[int], bool] = lambda i: False) -> list[Response]:
    """Split ``data`` into responses. ``head(i)``: response i (1xx excluded) answers a HEAD,
    so it has no body whatever its Content-Length. Trailing partial data is an error."""
    out: list[Response] = []
    pos = 0
    final = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ParseError(f"incomplete head at {pos}: {data[pos:pos + 200]!r}")
        head_bytes = data[pos:end]
        lines = head_bytes.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/(\d\.\d) (\d{3}) ([^\r\n]*)", lines[0])
        if m is None:
            raise ParseError(f"bad status line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name:
                raise ParseError(f"bad header line {line!r}")
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        status = int(m.group(2))
        pos = end + 4
        body = b""
        if status >= 200:
            lengths = [v for k, v in headers if k.lower() == "content-length"]
            if len(lengths) != 1 or not lengths[0].isdigit():
                raise ParseError(f"need exactly one Content-Length: {head_bytes!r}")
            if not head(final) and status not in (204, 304):
                n = int(lengths[0])
                if pos + n > len(data):
                    raise ParseError(f"body cut short: {n} announced, {len(data) - pos} there")
                body = data[pos : pos + n]
                pos += n
            final += 1
        out.append(
            Response(m.group(1).decode(), status, m.group(3).decode("latin-1"), headers, body,
                     head_bytes)
        )
    return out


# --------------------------------------------------------------------------------------
# Fake transport and connections


class FakeTransport:
    """What HttpProtocol uses of an asyncio transport, recording everything.

    ``close()`` behaves like asyncio's: the protocol's ``connection_lost`` comes later, from
    the loop (call ``Server.settle()``), never inside ``close()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.protocol: Any = None
        self.out = bytearray()
        self.writes = 0
        self.closed = False
        self.reading = True
        self.pause_calls = 0
        self.resume_calls = 0
        self.on_resume: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        assert isinstance(data, bytes | bytearray | memoryview)
        self.out += data
        self.writes += 1

    def writelines(self, chunks: Any) -> None:
        assert not self.closed, "write after close"
        for c in chunks:
            self.out += c
        self.writes += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert self.reading, "pause_reading while paused"
        self.reading = False
        self.pause_calls += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resume_reading while reading"
        self.reading = True
        self.resume_calls += 1
        if self.on_resume is not None:  # like uvloop: reading restarts from the loop
            self.loop.call_soon(self.on_resume)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8774)}.get(
            name, default
        )


class Conn:
    """One client connection to the in-process Worker."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport = FakeTransport(server.loop)
        self.proto = server.worker.protocol_factory()
        self.transport.protocol = self.proto
        self.heads: set[int] = set()  # indexes of final responses that answer a HEAD
        self.pending: collections.deque[bytes] = collections.deque()
        self.transport.on_resume = self.pump
        self.proto.connection_made(self.transport)

    def send(self, *chunks: bytes) -> Conn:
        """Deliver ``chunks`` as separate reads; held back while the protocol paused reading
        (delivered when it resumes, as a real transport would), dropped once closed."""
        self.pending.extend(chunks)
        self.pump()
        return self

    def pump(self) -> None:
        while self.pending and self.transport.reading and not self.transport.closed:
            self.proto.data_received(self.pending.popleft())

    @property
    def closed(self) -> bool:
        return self.transport.closed

    def responses(self) -> list[Response]:
        return parse_responses(bytes(self.transport.out), lambda i: i in self.heads)

    def one(self) -> Response:
        rs = self.responses()
        assert len(rs) == 1, rs
        return rs[0]

    def wait(self, n: int, timeout: float = 3.0) -> list[Response]:
        """Run the loop until ``n`` responses arrived (asynchronous handlers)."""

        async def poll() -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if len(self.responses()) >= n:
                        return
                except ParseError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{n} responses expected: {bytes(self.transport.out)!r}")
                await asyncio.sleep(0.001)

        self.server.loop.run_until_complete(poll())
        return self.responses()


# --------------------------------------------------------------------------------------
# Test routes: handlers that show what the core decided (identity, version, captures).


def _echo(req: Any) -> tuple[int, bytes]:
    return 200, json.dumps(
        {
            "route": req.route.name,
            "method": req.method_str,
            "path": req.path_str,
            "query": req.query_string,
            "params": list(req.params),
            "user": req.user,
            "project": req.project,
            "is_admin": req.is_admin,
            "version": req.version,
            "url_project": req.url_project.decode() if req.url_project is not None else None,
            "base_url": req.base_url,
        }
    ).encode()


def _boom(req: Any) -> tuple[int, bytes]:
    raise RuntimeError("handler bug")


async def _async_boom(req: Any) -> tuple[int, bytes]:
    await asyncio.sleep(0)
    raise RuntimeError("async handler bug")


def _conflict(req: Any) -> tuple[int, bytes]:
    raise HTTPFault(409, "Conflict in state", ((b"Retry-After", b"1"),))


async def _async_conflict(req: Any) -> tuple[int, bytes]:
    await asyncio.sleep(0)
    raise HTTPFault(409, "Async conflict", ((b"Retry-After", b"2"),))


def _bad_result(req: Any) -> Any:
    return 200, "a str body is a handler bug"


def _created(req: Any) -> tuple[int, bytes, bytes]:
    return 201, b'{"ok": true}', b"Location: http://x/1\r\n"


def _big(req: Any) -> tuple[int, bytes]:
    return 200, b'"' + b"x" * 100_000 + b'"'


def _long_head(req: Any) -> tuple[int, bytes, bytes, bytes]:
    """Header lines longer than any fixed reserve of the response buffer."""
    n = int(req.query_string or "0")
    return (200, b"{}", b"X-Extra: " + b"e" * n + b"\r\n",
            b"Content-Type: text/x-" + b"t" * n + b"\r\n")


TEST_ROUTES = [
    RouteSpec("GET", "/v2.1/things", _echo),
    RouteSpec("POST", "/v2.1/things", _created),
    RouteSpec("POST", "/v2.1/echo", _echo),
    RouteSpec("GET", "/v2.1/things/detail", _echo),
    RouteSpec("GET", "/v2.1/things/{thing_id}", _echo),
    RouteSpec("DELETE", "/v2.1/things/{thing_id}", _echo),
    RouteSpec("GET", "/v2.1/things/{thing_id}/parts/{part_id}", _echo),
    RouteSpec("GET", "/v2.1/boom", _boom),
    RouteSpec("GET", "/v2.1/async-boom", _async_boom),
    RouteSpec("GET", "/v2.1/conflict", _conflict),
    RouteSpec("GET", "/v2.1/async-conflict", _async_conflict),
    RouteSpec("GET", "/v2.1/bad-result", _bad_result),
    RouteSpec("GET", "/v2.1/big", _big),
    RouteSpec("GET", "/public/long/head", _long_head, auth=False, versioned=False),
    RouteSpec("GET", "/public/{name}", _echo, auth=False, versioned=False),
]


# --------------------------------------------------------------------------------------
# The Worker


class Server:
    """A Worker on its own fresh loop and shared memory; ``connect()`` opens connections."""

    def __init__(self, core: Any, overrides: dict[str, Any], extra_routes: bool) -> None:
        self.core = core
        self.data_dir = tempfile.mkdtemp(prefix="fastpath-unit-")
        self.settings = settings.load(
            None,
            {"debug.test_routes": True, "data_dir": self.data_dir, "store.map_size": 1 << 24,
             **overrides},
        )
        self.shm = SharedState(2)
        self.shm.claim(0, ROLE_WORKER, 1, 0, 0)
        self.plan = build_plan(self.settings, self.shm, 0)
        if extra_routes:
            self.plan.routes.extend(TEST_ROUTES)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.worker = core.Worker(self.plan, self.shm.buf, self.shm.slot_offset(0), self.loop)
        self.index = {r.name: r.index for r in self.worker.routes}

    def connect(self) -> Conn:
        return Conn(self)

    def exchange(self, *chunks: bytes) -> Conn:
        return self.connect().send(*chunks)

    def settle(self) -> None:
        """Run the loop until nothing is ready (deferred connection_lost, done callbacks)."""
        for _ in range(20):
            self.loop.run_until_complete(asyncio.sleep(0))

    def tick(self, advance: float = 0.0) -> None:
        """Move the worker's coarse clock forward, then run its once-a-second tick."""
        if advance:
            self.core.clock_skew(advance)
        self.worker.tick()

    def close(self) -> None:
        self.settle()
        self.worker.close_all()
        self.settle()
        self.loop.close()
        asyncio.set_event_loop(None)
        self.plan.context.store.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def core() -> Any:
    return _loader.load_core()


@pytest.fixture
def make_server(core: Any) -> Iterator[Callable[..., Server]]:
    """``make_server(**settings)``: a fresh Worker; dotted names as ``http__max_headers``."""
    made: list[Server] = []

    def make(extra_routes: bool = True, **overrides: Any) -> Server:
        if made:  # one Worker per process: the previous one goes first
            made.pop().close()
        s = Server(core, {k.replace("__", "."): v for k, v in overrides.items()}, extra_routes)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()
