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


# -- a seeded store (the read API benchmarks here and in load.py) --------------------------

SEED_PROJECT = "6f70656e737461636b20342065766572"  # the project the read benchmarks ask as
# Nova's classic public flavors, with the extra specs a real cloud carries.
SEED_FLAVORS = [
    ("1", "m1.tiny", 1, 512, 1),
    ("2", "m1.small", 1, 2048, 20),
    ("3", "m1.medium", 2, 4096, 40),
    ("4", "m1.large", 4, 8192, 80),
    ("5", "m1.xlarge", 8, 16384, 160),
    ("6", "c1.2xlarge", 16, 32768, 160),
]


def seed_uuid(i: int) -> str:
    h = f"{0xFA57 << 112 | i:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def seed_project(i: int, projects: int) -> str:
    return SEED_PROJECT if i % projects == 0 else f"project-{i % projects:04d}"


def newest_of_project(servers: int, projects: int) -> int:
    """The index of SEED_PROJECT's newest server (created_at grows with the index): the
    first of its lists."""
    return (servers - 1) // projects * projects


def seed_batches(servers: int, projects: int = 1, chunk: int = 2000) -> Any:
    """``Batch``es for ``Store.apply(batch, render=views.render_server)``: ``servers``
    sample servers round-robin over ``projects`` projects (server ``i`` is
    ``seed_uuid(i)``, created ``i`` seconds after 2024-01-01), and SEED_FLAVORS in the
    first batch."""
    from fastpath.store import Batch, Upsert
    from fastpath.store.changes import Catalog, CatalogPut
    from fastpath.store.samples import EPOCH_2024, sample_record

    flavors = [
        CatalogPut(Catalog.FLAVORS, fid, {
            "id": fid, "name": name, "vcpus": vcpus, "ram": ram, "disk": disk,
            "ephemeral": 0, "swap": 0, "rxtx_factor": 1.0, "is_public": True,
            "disabled": False, "description": None,
            "extra_specs": {"hw:cpu_policy": "shared", "hw_rng:allowed": "True"},
        })
        for fid, name, vcpus, ram, disk in SEED_FLAVORS
    ]
    for start in range(0, servers, chunk):
        ups = []
        for i in range(start, min(start + chunk, servers)):
            rec = sample_record(
                seed_uuid(i), 1, project_id=seed_project(i, projects),
                created_at=EPOCH_2024 + i * 1_000_000, seed=i, name=f"vm-{i:07d}",
            )
            ups.append(Upsert(rec["uuid"], 1, rec))
        yield Batch(ups, catalog=flavors if start == 0 else ())
