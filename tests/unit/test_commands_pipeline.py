"""The committer thread's pipelining (fastpath.api.commit): commands that arrive while a
group's works run join that group before its commit, and the committer commits groups
back to back from its own thread."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath.api.commit import SWITCH_INTERVAL, GroupCommitter
from fastpath.store import Store
from fastpath.store.commands import CommandTxn

UUID = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path, map_size=1 << 20)
    yield s
    s.close()


def put(i: int) -> Any:
    def work(c: CommandTxn) -> int:
        return c.put_outbox("cell1", UUID, f"req-{i}", {"action": "reboot", "type": "SOFT"})
    return work


def test_commands_arriving_during_the_works_join_the_group(store: Store) -> None:
    gc = GroupCommitter(store, None)
    started, release = threading.Event(), threading.Event()

    def slow(c: CommandTxn) -> int:
        started.set()
        if not release.wait(30):
            raise TimeoutError("never released")
        return c.put_outbox("cell1", UUID, "req-slow", {"action": "stop"})

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(gc.submit(slow))
        deadline = time.monotonic() + 30
        while not started.is_set():  # the group of one is running its works
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        late = [asyncio.ensure_future(gc.submit(put(i))) for i in range(3)]
        while gc.queued < 3:  # queued behind the running group
            assert time.monotonic() < deadline
            await asyncio.sleep(0)
        release.set()
        return [await first] + [await f for f in late]

    writes = store.write_txns
    loop = asyncio.new_event_loop()
    try:
        seqs = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert seqs == [1, 2, 3, 4]
    assert store.write_txns - writes == 1 and gc.commits == 1 and gc.commands == 4
    assert gc.works > 0 and gc.held >= gc.works
    assert sys.getswitchinterval() <= SWITCH_INTERVAL
    gc.close()


def test_groups_follow_each_other_without_the_event_loop(store: Store) -> None:
    """The loop stays blocked (a synchronous sleep) while the committer thread commits two
    groups: the second starts without the loop's help."""
    gc = GroupCommitter(store, None, max_group=1)
    committed = threading.Event()

    def second(c: CommandTxn) -> int:
        committed.set()
        return c.put_outbox("cell1", UUID, "req-2", {"action": "start"})

    async def scenario() -> list[int]:
        futs = [asyncio.ensure_future(gc.submit(put(1))), asyncio.ensure_future(gc.submit(second))]
        await asyncio.sleep(0)  # both submitted, the committer rung
        await asyncio.sleep(0)
        assert committed.wait(30)  # the loop does nothing meanwhile
        return [await f for f in futs]

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == [1, 2]
    finally:
        loop.close()
    assert gc.commits == 2
    gc.close()


def test_the_thread_survives_a_group_that_raised_past_exception(store: Store) -> None:
    """A work raising a BaseException (not an Exception: not its own outcome) fails its
    whole group with a 500, nothing written; the committer goes on with the next group."""
    gc = GroupCommitter(store, None)

    class Boom(BaseException):
        pass

    def boom(c: CommandTxn) -> None:
        c.put_outbox("cell1", UUID, "req-boom", {"action": "stop"})
        raise Boom()

    async def group() -> list[Any]:
        return list(await asyncio.gather(gc.submit(put(1)), gc.submit(boom),
                                         return_exceptions=True))

    loop = asyncio.new_event_loop()
    try:
        a, b = loop.run_until_complete(group())
        assert getattr(a, "status", None) == 500 and b is a
        assert loop.run_until_complete(gc.submit(put(2))) == 1  # nothing of the group stayed
    finally:
        loop.close()
    gc.close()
