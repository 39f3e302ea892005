"""Shared memory between the master and its children: heartbeats, readiness, counters.

The master maps one shared region before it forks, so every child inherits the same pages
and no message round trip is needed to read a worker's state or to sum counters for
/metrics.  ``fastpath serve`` backs it with a file, ``DATA_DIR/run/fastpath.shm``
(:meth:`SharedState.create_file`), so that ``fastpath status`` can map it read-only
(:meth:`SharedState.open_file`); without a path it is anonymous (``mmap(-1, size)`` is
MAP_SHARED|MAP_ANONYMOUS), which the unit tests use.

Each child process owns one *process slot* and is its only writer; the master writes the
header and the ``restarts`` field of a slot only while no child owns it.  Every field is a
naturally aligned 64-bit word, which x86-64 and aarch64 load and store atomically, so a
reader never sees a torn value (it may see a counter one request old, which is fine).

A slot's counters are never reset: when a new process takes over a slot (respawn, reload)
it keeps adding to the same words, so the sums on /metrics only ever grow, as Prometheus
counters must.

Layout (little-endian, offsets in bytes)::

    header (HEADER_SIZE bytes)
      0  magic                u64  b"FPSHM001"
      8  nslots               u64
     16  slot_size            u64
     24  worker_restarts      u64  respawns of API workers since the master started
     32  master_pid           u64
     40  generation           u64  current worker generation (bumped on every reload)
     48  master_started       f64  wall-clock start time of the master
    slot i at HEADER_SIZE + i * slot_size
      0  pid                  i64  0 = free
      8  role                 u64  ROLE_* below
     16  generation           u64
     24  started              f64  wall-clock start time (seconds since the epoch)
     32  heartbeat            u64  CLOCK_MONOTONIC nanoseconds of the last loop tick
     40  ready                u64  1 once the process serves
     48  restarts             u64  times this slot's worker index was respawned
     56  worker_index         u64
     64  store_read_txn       u64  read transactions begun by this process
     72  store_write_txn      u64  write transactions begun by this process
     80  name                 48 bytes, UTF-8, NUL-padded: a sidecar's name (cell name,
                                "cellsync", "forwarder"); empty for workers
    128  requests[MAX_ROUTES][NSTATUS]  u64, requests by route index and status index
"""

from __future__ import annotations

import mmap
import os
import struct
import time

MAGIC = b"FPSHM001"
HEADER_SIZE = 128

OFF_PID = 0
OFF_ROLE = 8
OFF_GENERATION = 16
OFF_STARTED = 24
OFF_HEARTBEAT = 32
OFF_READY = 40
OFF_RESTARTS = 48
OFF_WORKER_INDEX = 56
OFF_STORE_READ = 64
OFF_STORE_WRITE = 72
OFF_NAME = 80
NAME_SIZE = 48
COUNTERS_OFFSET = 128

# Routes are numbered by the route table (fastpath.api.routes); index 0 is "no route".
MAX_ROUTES = 256
# Status codes that get their own counter; anything else is counted under "other".
STATUSES: tuple[int, ...] = (
    100, 200, 201, 202, 204, 300, 304, 400, 401, 403, 404, 405, 406, 409, 410, 411,
    413, 414, 415, 422, 429, 431, 500, 501, 503, 504,
)
NSTATUS = len(STATUSES) + 1  # the last column counts every other status
SLOT_SIZE = COUNTERS_OFFSET + MAX_ROUTES * NSTATUS * 8

ROLE_FREE = 0  # never used
ROLE_WORKER = 1
ROLE_CELL = 2
ROLE_CELLSYNC = 3
ROLE_FORWARDER = 4
ROLE_NAMES = {ROLE_WORKER: "worker", ROLE_CELL: "cell", ROLE_CELLSYNC: "cellsync", ROLE_FORWARDER: "forwarder"}

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


def status_index(status: int) -> int:
    try:
        return STATUSES.index(status)
    except ValueError:
        return NSTATUS - 1


class SharedState:
    """The master's view of the shared region (children use ``_core`` for their own slot)."""

    def __init__(self, nslots: int, buf: mmap.mmap | None = None) -> None:
        self.nslots = nslots
        self.size = HEADER_SIZE + nslots * SLOT_SIZE
        self.buf = buf if buf is not None else mmap.mmap(-1, self.size)
        if buf is None:
            self._init_header()

    def _init_header(self) -> None:
        self.buf[0:8] = MAGIC
        _U64.pack_into(self.buf, 8, self.nslots)
        _U64.pack_into(self.buf, 16, SLOT_SIZE)

    @classmethod
    def create_file(cls, path: str, nslots: int) -> SharedState:
        """A fresh region backed by the file ``path`` (replaced atomically if it exists).

        MAP_SHARED on a regular file: children inherit the mapping through fork like an
        anonymous one, and ``fastpath status`` can map the same file to read it.
        """
        size = HEADER_SIZE + nslots * SLOT_SIZE
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)  # sparse: only pages that are touched take space
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        state = cls(nslots, buf)
        state._init_header()
        # Readers never see a half-initialised header: the name appears complete.
        os.replace(tmp, path)
        return state

    @classmethod
    def open_file(cls, path: str) -> SharedState:
        """Map an existing region read-only (``fastpath status``); ValueError if not one."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path} is too short to be a fastpath shared-memory file")
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        if buf[0:8] != MAGIC:
            buf.close()
            raise ValueError(f"{path} is not a fastpath shared-memory file (bad magic)")
        nslots = int(_U64.unpack_from(buf, 8)[0])
        slot_size = int(_U64.unpack_from(buf, 16)[0])
        if slot_size != SLOT_SIZE or size < HEADER_SIZE + nslots * slot_size:
            buf.close()
            raise ValueError(f"{path} has another layout than this fastpath version")
        return cls(nslots, buf)

    # -- header ---------------------------------------------------------------------------
    def _u64(self, off: int) -> int:
        return int(_U64.unpack_from(self.buf, off)[0])

    @property
    def worker_restarts(self) -> int:
        return self._u64(24)

    @worker_restarts.setter
    def worker_restarts(self, value: int) -> None:
        _U64.pack_into(self.buf, 24, value)

    @property
    def generation(self) -> int:
        return self._u64(40)

    @generation.setter
    def generation(self, value: int) -> None:
        _U64.pack_into(self.buf, 40, value)

    def set_master_pid(self, pid: int) -> None:
        _U64.pack_into(self.buf, 32, pid)

    @property
    def master_pid(self) -> int:
        return self._u64(32)

    @property
    def master_started(self) -> float:
        return float(_F64.unpack_from(self.buf, 48)[0])

    @master_started.setter
    def master_started(self, value: float) -> None:
        _F64.pack_into(self.buf, 48, value)

    # -- slots ----------------------------------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            raise IndexError(slot)
        return HEADER_SIZE + slot * SLOT_SIZE

    def free_slot(self, role: int) -> int | None:
        """A free slot, preferring one that last served ``role`` (its counters stay with it)."""
        never_used = None
        for slot in range(self.nslots):
            if self.pid(slot) != 0:
                continue
            last = self.role(slot)
            if last == role:
                return slot
            if last == ROLE_FREE and never_used is None:
                never_used = slot
        return never_used

    def claim(
        self, slot: int, role: int, generation: int, worker_index: int, restarts: int,
        name: str = "",
    ) -> None:
        """Prepare a slot for a child about to be forked (the master does this before fork)."""
        base = self.slot_offset(slot)
        raw = name.encode()[:NAME_SIZE]
        self.buf[base + OFF_NAME : base + OFF_NAME + NAME_SIZE] = raw.ljust(NAME_SIZE, b"\0")
        _I64.pack_into(self.buf, base + OFF_PID, -1)  # reserved; the child writes its pid
        _U64.pack_into(self.buf, base + OFF_ROLE, role)
        _U64.pack_into(self.buf, base + OFF_GENERATION, generation)
        _F64.pack_into(self.buf, base + OFF_STARTED, time.time())
        _U64.pack_into(self.buf, base + OFF_HEARTBEAT, time.monotonic_ns())
        _U64.pack_into(self.buf, base + OFF_READY, 0)
        _U64.pack_into(self.buf, base + OFF_RESTARTS, restarts)
        _U64.pack_into(self.buf, base + OFF_WORKER_INDEX, worker_index)

    def set_pid(self, slot: int, pid: int) -> None:
        _I64.pack_into(self.buf, self.slot_offset(slot) + OFF_PID, pid)

    def release(self, slot: int) -> None:
        # The role stays: the slot's counters keep counting for that role (see free_slot).
        base = self.slot_offset(slot)
        _U64.pack_into(self.buf, base + OFF_READY, 0)
        _I64.pack_into(self.buf, base + OFF_PID, 0)

    def beat(self, slot: int) -> None:
        """Write the heartbeat of ``slot`` (a sidecar's own slot; workers beat from _core)."""
        _U64.pack_into(self.buf, self.slot_offset(slot) + OFF_HEARTBEAT, time.monotonic_ns())

    def set_ready(self, slot: int) -> None:
        _U64.pack_into(self.buf, self.slot_offset(slot) + OFF_READY, 1)

    def pid(self, slot: int) -> int:
        return int(_I64.unpack_from(self.buf, self.slot_offset(slot) + OFF_PID)[0])

    def role(self, slot: int) -> int:
        return self._u64(self.slot_offset(slot) + OFF_ROLE)

    def ready(self, slot: int) -> bool:
        return self._u64(self.slot_offset(slot) + OFF_READY) != 0

    def heartbeat_ns(self, slot: int) -> int:
        return self._u64(self.slot_offset(slot) + OFF_HEARTBEAT)

    def started(self, slot: int) -> float:
        return float(_F64.unpack_from(self.buf, self.slot_offset(slot) + OFF_STARTED)[0])

    def slot_generation(self, slot: int) -> int:
        return self._u64(self.slot_offset(slot) + OFF_GENERATION)

    def restarts(self, slot: int) -> int:
        return self._u64(self.slot_offset(slot) + OFF_RESTARTS)

    def name(self, slot: int) -> str:
        base = self.slot_offset(slot) + OFF_NAME
        return bytes(self.buf[base : base + NAME_SIZE]).rstrip(b"\0").decode("utf-8", "replace")

    def ready_by_role(self) -> dict[int, tuple[int, int]]:
        """{role: (ready, running)} over the slots that have a process now."""
        out: dict[int, tuple[int, int]] = {}
        for slot in range(self.nslots):
            if self.pid(slot) <= 0:
                continue
            role = self.role(slot)
            ready, running = out.get(role, (0, 0))
            out[role] = (ready + (1 if self.ready(slot) else 0), running + 1)
        return out

    def worker_index(self, slot: int) -> int:
        return self._u64(self.slot_offset(slot) + OFF_WORKER_INDEX)

    def store_txns(self, role: int = ROLE_WORKER) -> tuple[int, int]:
        """Sum of (read, write) store transactions over every slot of ``role`` ever used."""
        reads = writes = 0
        for slot in range(self.nslots):
            base = self.slot_offset(slot)
            if self._u64(base + OFF_ROLE) == role:
                reads += self._u64(base + OFF_STORE_READ)
                writes += self._u64(base + OFF_STORE_WRITE)
        return reads, writes
