"""In-process Worker and fake transport shared by the micro-benchmarks (see conftest.py)."""

from __future__ import annotations

import collections
from typing import Any

# The Host every benchmark request carries: the version document's links are built from it.
HOST = b"127.0.0.1:8774"


class FakeTransport:
    """The part of asyncio.Transport the protocol uses, as cheap as possible.

    ``write`` is a C-level ``deque.append`` keeping the last ``keep`` writes, so the
    measured time is the protocol's, not the fake's.
    """

    __slots__ = ("out", "write", "closed", "paused")

    def __init__(self, keep: int = 16) -> None:
        self.out: collections.deque[bytes] = collections.deque(maxlen=keep)
        self.write = self.out.append
        self.closed = False
        self.paused = False

    def writelines(self, chunks: Any) -> None:
        self.out.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Harness:
    """The session's Worker; ``connect()`` opens a protocol on a fake transport."""

    def __init__(self) -> None:
        import asyncio

        import uvloop

        from fastpath import _loader, settings
        from fastpath.api.routes import build_plan
        from fastpath.master.shm import ROLE_WORKER, SharedState

        self.core = _loader.load_core()
        self.shm = SharedState(2)
        self.shm.claim(0, ROLE_WORKER, 1, 0, 0)
        import tempfile

        self.data_dir = tempfile.mkdtemp(prefix="fastpath-bench-")
        self.settings = settings.load(
            None, {"bind": HOST.decode(), "data_dir": self.data_dir, "store.map_size": 1 << 24}
        )
        self.plan = build_plan(self.settings, self.shm, 0)
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.worker = self.core.Worker(self.plan, self.shm.buf, self.shm.slot_offset(0), self.loop)
        self.open: list[tuple[Any, FakeTransport]] = []

    def connect(self, keep: int = 16) -> tuple[Any, FakeTransport]:
        proto = self.worker.protocol_factory()
        transport = FakeTransport(keep)
        proto.connection_made(transport)
        self.open.append((proto, transport))
        return proto, transport

    def disconnect_all(self) -> None:
        while self.open:
            proto, _ = self.open.pop()
            proto.connection_lost(None)

    def close(self) -> None:
        self.disconnect_all()
        self.worker.close_all()
        self.loop.close()


def request(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    """One HTTP/1.1 request with Host first, as wrk and most clients send it."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + HOST, *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status_of(response: bytes) -> int:
    return int(response[9:12])
