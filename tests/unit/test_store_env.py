"""The store's environment: crashes, map growth, stale readers, fork, counters, layout.

Processes that must die mid-way run as subprocesses (a fresh interpreter each), killed with
SIGKILL at a point they announce on stdout -- no sleeps to guess timing.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.master.shm import ROLE_CELLSYNC, ROLE_WORKER, SharedState
from fastpath.store import (
    Batch,
    Store,
    StoreError,
    StoreForkError,
    StoreFullError,
    StoreLayoutError,
    Upsert,
)
from fastpath.store import layout as L
from fastpath.store.samples import EPOCH_2024, sample_record

DEADLINE = 60.0


def uid(i: int) -> str:
    return str(uuidlib.UUID(int=(i + 7) * 0x9E3779B97F4A7C15 % 2**128, version=4))


def upserts(n: int, version: int, start: int = 0) -> list[Upsert]:
    out = []
    for i in range(start, start + n):
        r = sample_record(uid(i), version, created_at=EPOCH_2024 + i,
                          updated_at=EPOCH_2024 + 10**9 + version, seed=i)
        out.append(Upsert(uid(i), version, r))
    return out


# -- child processes ----------------------------------------------------------------------------
CHILD_PRELUDE = """
import sys, time
from fastpath.store import Batch, Store, Upsert
from fastpath.store.samples import EPOCH_2024, sample_record
import uuid as uuidlib

def uid(i):
    return str(uuidlib.UUID(int=(i + 7) * 0x9E3779B97F4A7C15 % 2**128, version=4))

def upserts(n, version, start=0):
    return [Upsert(uid(i), version, sample_record(uid(i), version, created_at=EPOCH_2024 + i,
            updated_at=EPOCH_2024 + 10**9 + version, seed=i)) for i in range(start, start + n)]

def say(*words):
    print(*words, flush=True)
"""


class Child:
    """A Python subprocess running ``code`` (after CHILD_PRELUDE) with ``args`` in sys.argv."""

    def __init__(self, code: str, *args: object) -> None:
        # stderr to a file: a child that logs a lot must never block on a full pipe.
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *map(str, args)],
            stdout=subprocess.PIPE, stderr=self.stderr,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.pending = b""

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def wait_for(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; fails after DEADLINE even if the
        child hangs without a word (select, not a blocking readline)."""
        deadline = time.monotonic() + DEADLINE
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                if line.decode().startswith(prefix):
                    return line.decode().strip()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {prefix!r} from the child in {DEADLINE}s: {self.errors()}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"child ended before {prefix!r}: {self.errors()}")
            self.pending += chunk

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(DEADLINE) == -signal.SIGKILL

    def finish(self) -> None:
        self.proc.communicate(timeout=DEADLINE)
        assert self.proc.returncode == 0, self.errors()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.cleanup()


def spawn(children: list[Child], code: str, *args: object) -> Child:
    c = Child(code, *args)
    children.append(c)
    return c


# -- crash atomicity (P8) -----------------------------------------------------------------------
WRITER = """
data_dir, n, batches, stop_in = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = Store.open(data_dir)  # durable commits, as cellsync runs
for b in range(1, batches + 1):
    rendered = 0
    def render(record):
        global rendered
        rendered += 1
        if b == stop_in and rendered == n // 2:
            say("mid", b)  # half the batch is written, inside the write transaction
            time.sleep(60)
        return {b"v": str(record["version"]).encode()}
    store.apply(Batch(upserts(n, b), cursor=("cell1", b)), render)
    say("committed", b)
say("done")
"""


def assert_whole_batches(data_dir: Path, n: int) -> int:
    """The store holds exactly the state after batch ``cursor``; returns the cursor."""
    with Store.open(data_dir, sync=False) as store:
        with store.read() as r:
            cursor = r.cursor("cell1")
            assert cursor is not None
            versions = {r.head(uid(i)).version for i in range(n)}  # type: ignore[union-attr]
            views = {bytes(r.view(uid(i), b"v") or b"") for i in range(n)}
            assert versions == {cursor}, f"cursor {cursor} but versions {versions}"
            assert views == {str(cursor).encode()}
            assert r.check() == []
        # The killed writer held the writer lock: LMDB's robust mutex lets the next one in.
        store.apply(Batch(upserts(n, cursor + 1), cursor=("cell1", cursor + 1)))
        with store.read() as r:
            assert r.cursor("cell1") == cursor + 1
        return cursor


def test_kill_9_inside_the_write_txn_applies_none_of_the_batch(
    tmp_path: Path, children: list[Child]
) -> None:
    n = 200
    c = spawn(children, WRITER, tmp_path, n, 5, 3)
    assert c.wait_for("mid") == "mid 3"
    c.kill()
    assert assert_whole_batches(tmp_path, n) == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_any_moment_leaves_whole_batches(
    tmp_path: Path, children: list[Child], seed: int
) -> None:
    n = 150
    rnd = random.Random(seed)
    c = spawn(children, WRITER, tmp_path, n, 1000, 0)
    c.wait_for(f"committed {rnd.randrange(1, 4)}")
    time.sleep(rnd.random() * 0.05)  # a random point: between commits or inside one
    c.kill()
    assert assert_whole_batches(tmp_path, n) >= 1


# -- map growth ---------------------------------------------------------------------------------
def test_a_full_map_grows_and_the_write_is_retried(tmp_path: Path) -> None:
    initial = 256 << 10
    with Store.open(tmp_path, map_size=initial, max_map_size=64 << 20, sync=False) as store:
        resizes = 0
        for b in range(20):
            s = store.apply(Batch(upserts(50, 1, start=b * 50)), lambda r: {b"v": b"x" * 500})
            resizes += s.map_resizes
        assert resizes >= 2
        assert store.info()["map_size"] > initial
        assert store.write_txns == 20 + resizes  # every attempt is a transaction begun
        with store.read() as r:
            assert r.count(L.SERVERS) == 1000
            assert r.check() == []


def test_one_batch_may_need_several_doublings(tmp_path: Path) -> None:
    with Store.open(tmp_path, map_size=256 << 10, max_map_size=64 << 20, sync=False) as store:
        s = store.apply(Batch(upserts(1000, 1)))  # ~4 MB of pages: four doublings or more
        assert s.applied == 1000 and s.map_resizes >= 4
        assert store.info()["map_size"] == (256 << 10) << s.map_resizes


def test_the_maximum_map_size_gives_a_clear_error_and_no_damage(tmp_path: Path) -> None:
    with Store.open(tmp_path, map_size=256 << 10, max_map_size=1 << 20, sync=False) as store:
        committed = 0
        with pytest.raises(StoreFullError) as e:
            for b in range(100):
                store.apply(Batch(upserts(50, 1, start=b * 50), cursor=("cell1", b + 1)))
                committed = b + 1
        assert "store.max_map_size" in str(e.value) and str(1 << 20) in str(e.value)
        assert store.info()["map_size"] == 1 << 20
        with store.read() as r:  # the store still serves, with every committed batch
            assert r.count(L.SERVERS) == committed * 50
            assert r.cursor("cell1") == committed
            assert r.check() == []


def test_another_process_growing_the_map_is_adopted(tmp_path: Path, children: list[Child]) -> None:
    with Store.open(tmp_path, map_size=256 << 10, max_map_size=64 << 20, sync=False) as store:
        store.apply(Batch(upserts(10, 1)))
        grower = spawn(children, """
            store = Store.open(sys.argv[1], map_size=256 << 10, max_map_size=64 << 20)
            for b in range(10):
                store.apply(Batch(upserts(100, 1, start=10 + b * 100)))
            say("grown", store.info()["map_size"])
        """, tmp_path)
        grown = int(grower.wait_for("grown").split()[1])
        grower.finish()
        assert grown > 256 << 10
        with store.read() as r:  # MDB_MAP_RESIZED at begin: adopted, then read
            assert r.count(L.SERVERS) == 1010
        store.apply(Batch(upserts(10, 2)))
        assert store.info()["map_size"] >= grown


# -- stale readers ------------------------------------------------------------------------------
HOLDER = """
store = Store.open(sys.argv[1])
say("open")
time.sleep(60)
"""
READER = """
store = Store.open(sys.argv[1])
reader = store.read().__enter__()  # a read transaction that never ends
say("reading")
time.sleep(60)
"""


def test_reader_check_clears_the_slot_of_a_killed_reader(
    tmp_path: Path, children: list[Child]
) -> None:
    store = Store.open(tmp_path, sync=False)
    store.apply(Batch(upserts(5, 1)))
    holder = spawn(children, HOLDER, tmp_path)  # keeps the lock file from being reset
    holder.wait_for("open")
    reader = spawn(children, READER, tmp_path)
    reader.wait_for("reading")
    reader.kill()
    assert store.reader_check() == 1
    assert store.reader_check() == 0
    # And at open: a new opener clears what dead readers left behind.
    reader = spawn(children, READER, tmp_path)
    reader.wait_for("reading")
    reader.kill()
    store.close()
    with Store.open(tmp_path, sync=False) as again:
        assert again.stale_readers_cleared == 1


# -- fork ---------------------------------------------------------------------------------------
def test_a_store_does_not_cross_fork(tmp_path: Path) -> None:
    store = Store.open(tmp_path, sync=False)
    store.apply(Batch(upserts(3, 1)))
    with store.read() as r:  # a read transaction open across the fork
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code, never return into pytest
            code = 10
            try:
                try:
                    store.read()
                    code = 1
                except StoreForkError:
                    code = 11
                try:
                    store.apply(Batch(upserts(1, 2)))
                    code = 2
                except StoreForkError:
                    code += 1
                try:
                    Store.open(tmp_path)
                    code = 3
                except StoreError as e:
                    code += 1 if "before it forked" in str(e) else 50
                store.close()  # must leave the parent's environment and reader slot alone
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 13
        assert str(os.getpid()) in store._env.readers()  # the parent's slot survived
        assert r.get_server(uid(0)) is not None
    store.apply(Batch(upserts(3, 2)))
    store.close()


def test_a_store_opened_after_fork_works_in_the_child(tmp_path: Path) -> None:
    with Store.open(tmp_path, sync=False) as store:
        store.apply(Batch(upserts(2, 1)))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with Store.open(tmp_path, sync=False) as mine:
                mine.apply(Batch(upserts(2, 2)))
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with Store.open(tmp_path, sync=False) as store, store.read() as r:
        assert r.head(uid(0)).version == 2  # type: ignore[union-attr]


# -- counters -----------------------------------------------------------------------------------
def test_counters_in_the_shared_memory_slot(tmp_path: Path) -> None:
    shm = SharedState(3)
    shm.claim(1, ROLE_WORKER, 1, 0, 0)
    shm.claim(2, ROLE_CELLSYNC, 1, 0, 0)
    with Store.open(tmp_path, sync=False, counters=(shm.buf, shm.slot_offset(1))) as store:
        for _ in range(3):
            with store.read() as r:
                r.get_server(uid(0))
        store.apply(Batch(upserts(2, 1)))
        store.apply(Batch(upserts(2, 2)))
        assert (store.read_txns, store.write_txns) == (3, 2)
        assert shm.store_txns(ROLE_WORKER) == (3, 2)
        assert shm.store_txns(ROLE_CELLSYNC) == (0, 0)
    shm.buf.close()  # the store let go of its view of the region


def test_counters_refuse_a_misaligned_slot() -> None:
    from fastpath.store import TxnCounters

    with pytest.raises(StoreError):
        TxnCounters(bytearray(256), 4)


# -- opening ------------------------------------------------------------------------------------
def test_open_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path, sync=False):
        with pytest.raises(StoreError, match="already open"):
            Store.open(tmp_path)
    Store.open(tmp_path).close()  # once closed, it opens again


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    store = Store.open(tmp_path, sync=False)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.read()
    with pytest.raises(StoreError, match="closed"):
        store.apply(Batch())


def test_a_store_of_another_layout_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path, sync=False) as store:
        store._write(lambda txn: txn.put(L.META_LAYOUT, L.U64.pack(999), db=store.dbs.meta))
    with pytest.raises(StoreLayoutError, match="layout version 999"):
        Store.open(tmp_path)
    # The refusal left nothing open: moved aside, the store is rebuilt from scratch.
    (tmp_path / "store").rename(tmp_path / "store.old")
    with Store.open(tmp_path, sync=False) as store, store.read() as r:
        assert r.count(L.SERVERS) == 0


def test_open_creates_every_database_and_records_the_layout(tmp_path: Path) -> None:
    with Store.open(tmp_path, sync=False) as store:
        with store.read() as r:
            dump = r.dump()
        assert set(dump) == {name.decode() for name in L.DATABASES}
        assert dump["meta"] == [(L.META_LAYOUT, L.U64.pack(L.LAYOUT_VERSION))]
        assert (tmp_path / "store" / "data.mdb").exists()
        assert oct((tmp_path / "store").stat().st_mode & 0o777) == oct(0o700)
        info: dict[str, Any] = store.info()
        assert info["max_readers"] == 1024 and info["used"] > 0
    with pytest.raises(StoreError, match="larger than max_map_size"):
        Store.open(tmp_path, map_size=2 << 20, max_map_size=1 << 20)


def test_a_layout_1_store_is_migrated_to_by_cell(tmp_path: Path) -> None:
    from fastpath.store import Upsert
    from fastpath.store.samples import sample_record

    uids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(5)]
    with Store.open(tmp_path, sync=False) as store:
        store.apply(Batch([Upsert(u, 1, sample_record(u, 1, cell=f"c{i % 2}", seed=i))
                           for i, u in enumerate(uids)]))

        def as_layout_1(txn: Any) -> None:  # what a layout-1 store looks like on disk
            txn.drop(store.dbs.by_cell, delete=False)
            txn.put(L.META_LAYOUT, L.U64.pack(1), db=store.dbs.meta)

        store._write(as_layout_1)
        with store.read() as r:
            assert r.check() and list(r.cell_servers("c0")) == []
    with Store.open(tmp_path, sync=False) as store, store.read() as r:
        assert r.check() == []
        assert r.txn.get(L.META_LAYOUT, db=r.dbs.meta) == L.U64.pack(L.LAYOUT_VERSION)
        assert {L.uuid_str(u) for u, _ in r.cell_servers("c0")} == set(uids[0::2])
        assert {L.uuid_str(u) for u, _ in r.cell_servers("c1")} == set(uids[1::2])
