"""Group commit: the one write path of an API worker's commands (docs/commands.md).

LMDB has one writer at a time and a durable commit costs an fsync, so a worker does not
commit per command.  :class:`GroupCommitter` queues the commands of its worker; one commit
is in flight at a time, in a dedicated thread (off the event loop: the loop keeps answering
while the disk syncs), and every command that arrives meanwhile joins the next group.  The
thread commits groups back to back: once a commit is durable it hands the outcomes to the
event loop and at once starts the next group with whatever is queued, without waiting for
the loop; commands that arrive while a group's works run join that group before its commit
(PERF: measured 1,890 -> 2,670 creates/s, groups of ~16 -> ~28, ``load_commands.py
--api-only`` c=64).  A group is one write transaction (:func:`fastpath.store.commands.run_group`): each command's
``work(ctxn)`` runs in its own nested transaction, so a work that raises (an
:class:`~fastpath.errors.HTTPFault` refusal, or a bug) leaves no write and refuses only
itself.  ``await submit(work)`` returns the work's value only once the group's commit is
durable (LMDB synced commit); that is when a command may be acknowledged (202).

Bounds (settings ``api.commit_group_max`` and ``api.commit_queue_max``): a group holds at
most ``max_group`` commands; at most ``max_queue`` wait or are in flight (beyond,
``submit`` answers 503 with ``Retry-After`` at once: memory stays bounded under overload).
A failure of the transaction itself (the map cannot grow: ``StoreFullError``; any LMDB
error) resolves every future of the group with a 503 (store full) or 500, logged once with
its cause.

Works run in the committer thread; they must not touch the event loop.  Map resizes run on
the loop thread (see :mod:`fastpath.store.commands`).  After each durable commit that wrote
outbox entries the forwarder's bell is rung.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastpath import wake
from fastpath.errors import HTTPFault
from fastpath.store import Store
from fastpath.store.changes import Renderer
from fastpath.store.commands import RESIZE_GROW, CommandTxn, GroupResult, run_group
from fastpath.store.errors import StoreError, StoreFullError

log = logging.getLogger("fastpath.api.commit")

T = TypeVar("T")

MAX_GROUP = 512
MAX_QUEUE = 8192
RESIZE_TIMEOUT = 60.0  # seconds the committer waits for the loop thread to resize the map
# Python's thread switch interval in a process with a committer (set when its thread starts).
# PERF: the committer thread gives up the interpreter lock in every LMDB call that may block
# (begin, commit's fsync) and must then wait for the busy event-loop thread to give it back,
# up to the interval -- with Python's default 5 ms, also while it holds LMDB's writer lock in
# the middle of a group's works.  Measured (a group of 16 creates, another thread busy):
# 5 ms -> p50 12 ms, p90 22-45 ms; 0.5 ms -> p50 6 ms, p90 11 ms.  Forced switches only
# happen while both threads want to run, so the event loop loses next to nothing.
SWITCH_INTERVAL = 0.0005


class Busy(HTTPFault):
    """The committer's queue is full: 503 with Retry-After, nothing written."""

    def __init__(self) -> None:
        super().__init__(
            503, "The API is busy: too many commands are waiting for the store. Retry later.",
            ((b"Retry-After", b"1"),),
        )


# (work, its future, the event loop of that future)
_Item = tuple[Callable[[CommandTxn], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class GroupCommitter:
    """One per worker process (created with its :class:`~fastpath.api.context.ApiContext`)."""

    def __init__(self, store: Store, render: Renderer | None, *, max_group: int = MAX_GROUP,
                 max_queue: int = MAX_QUEUE, bell: str | None = None) -> None:
        if max_group < 1 or max_queue < 1:
            raise ValueError("max_group and max_queue must be at least 1")
        self.store = store
        self.render = render
        self.max_group = max_group
        self.max_queue = max_queue
        self.bell = bell  # path of the forwarder's bell (fastpath.wake), or None
        # Commands not yet taken by the committer thread (appended by event loops, taken by
        # the thread: deque's append and popleft are atomic).
        self._queue: collections.deque[_Item] = collections.deque()
        self._open = 0  # commands submitted and not yet resolved (the max_queue bound)
        self._wake = threading.Event()
        self._closing = False
        self._ringing: set[asyncio.AbstractEventLoop] = set()  # loops with a _ring scheduled
        self._thread: threading.Thread | None = None
        # statistics (tests, metrics): durable commits, commands committed, refused as busy
        self.commits = 0
        self.commands = 0
        self.busy = 0
        self.lock_wait = 0.0  # seconds waiting for LMDB's writer lock, summed
        self.held = 0.0  # seconds holding it through the durable commit, summed
        self.works = 0.0  # of held: seconds running the works, summed
        self._logged = (time.monotonic(), 0, 0, 0.0, 0.0, 0.0)
        self._window_max = (0.0, 0.0)  # longest writer-lock wait and hold since the last log

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, work: Callable[[CommandTxn], T]) -> T:
        """Run ``work(ctxn)`` in the next group's write transaction; its value once durable.

        ``work`` runs in the committer thread, maybe more than once (the group runs again
        after the map grew), so it computes nothing random and keeps no state outside
        ``ctxn``.  What it raises is raised here (after the group committed the others).
        """
        loop = asyncio.get_running_loop()
        if self._open >= self.max_queue:
            self.busy += 1
            raise Busy()
        fut: asyncio.Future[T] = loop.create_future()
        self._open += 1
        self._queue.append((work, fut, loop))
        if loop not in self._ringing:
            # Wake the thread once this loop iteration has run its ready callbacks: the
            # commands submitted in the same iteration start as one group.
            self._ringing.add(loop)
            loop.call_soon(self._ring, loop)
        try:
            return await fut
        finally:
            self._open -= 1

    def _ring(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ringing.discard(loop)
        if self._thread is None:
            if sys.getswitchinterval() > SWITCH_INTERVAL:
                sys.setswitchinterval(SWITCH_INTERVAL)
            self._thread = threading.Thread(target=self._run, name="fastpath-commit",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    # -- the committer thread --------------------------------------------------------------
    def _take(self, n: int) -> list[_Item]:
        q = self._queue
        out: list[_Item] = []
        while q and len(out) < n:
            out.append(q.popleft())
        return out

    def _run(self) -> None:
        """Commit groups back to back: as soon as one commit is durable (its results handed
        to the event loop), the next group -- every command that arrived meanwhile -- starts;
        commands that arrive while a group's works run join it before its commit."""
        while True:
            group = self._take(self.max_group)
            if not group:
                if self._closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            self._commit(group)

    def _commit(self, group: list[_Item]) -> None:
        """In the committer thread: one group, its results handed to the loops."""
        loop = group[0][2]

        def more(room: int) -> list[Callable[[CommandTxn], Any]]:
            late = self._take(room)
            group.extend(late)
            return [w for w, _, _ in late]

        try:
            result: GroupResult | BaseException = run_group(
                self.store, [w for w, _, _ in group], self.render,
                lambda kind: self._resize(kind, loop), more=more, max_group=self.max_group)
        except BaseException as exc:  # noqa: BLE001 - resolved into every future; the
            result = _store_fault(exc, len(group))  # thread goes on with the next group
        if isinstance(result, GroupResult) and result.outbox_written and self.bell is not None:
            wake.ring(self.bell)  # never blocks or raises; the forwarder also polls
        for lp in dict.fromkeys(g[2] for g in group):
            try:
                lp.call_soon_threadsafe(self._resolve, lp, group, result)
            except RuntimeError:  # that loop is closed: nobody waits for its answers
                pass

    def _resolve(self, loop: asyncio.AbstractEventLoop, group: list[_Item],
                 result: GroupResult | BaseException) -> None:
        """On ``loop``: the group's outcomes into the futures of this loop's commands."""
        if isinstance(result, BaseException):
            for _, fut, lp in group:
                if lp is loop and not fut.done():
                    fut.set_exception(result)
            return
        if loop is group[0][2]:
            self.commits += 1
            self.commands += len(group)
            self.lock_wait += result.lock_wait
            mw, mh = self._window_max
            self._window_max = (max(mw, result.lock_wait), max(mh, result.held))
            self.held += result.held
            self.works += result.works
            if log.isEnabledFor(logging.DEBUG):
                self._log_stats()
        for (_, fut, lp), (ok, value) in zip(group, result.outcomes, strict=True):
            if lp is not loop or fut.done():  # the caller went away: committed anyway
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _log_stats(self) -> None:
        """At debug level, every 2 s: groups, their size, writer-lock wait and hold."""
        t, commits, commands, wait, held, works = self._logged
        now = time.monotonic()
        if now - t < 2 or self.commits == commits:
            return
        n = self.commits - commits
        mw, mh = self._window_max
        log.debug("group commit: %d commits of %.1f commands in %.1f s; writer lock: %.2f ms "
                  "waited, %.2f ms held (%.2f ms works, the rest commit + fsync) per commit; "
                  "longest wait %.1f ms, hold %.1f ms",
                  n, (self.commands - commands) / n, now - t, (self.lock_wait - wait) * 1e3 / n,
                  (self.held - held) * 1e3 / n, (self.works - works) * 1e3 / n, mw * 1e3, mh * 1e3)
        self._window_max = (0.0, 0.0)
        self._logged = (now, self.commits, self.commands, self.lock_wait, self.held, self.works)

    def _resize(self, kind: str, loop: asyncio.AbstractEventLoop) -> None:
        """In the committer thread: have the loop thread resize the map (no transaction of
        this process is open there between callbacks) and wait for it."""
        done = threading.Event()
        box: list[BaseException] = []

        def run() -> None:
            try:
                if kind == RESIZE_GROW:
                    self.store._grow()
                else:
                    self.store._env.set_mapsize(0)  # adopt another process's size
            except BaseException as exc:  # noqa: BLE001 - carried back to the thread
                box.append(exc)
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        if not done.wait(RESIZE_TIMEOUT):
            raise StoreError(f"the event loop did not resize the store map within {RESIZE_TIMEOUT}s")
        if box:
            raise box[0]

    def close(self) -> None:
        """Stop the committer thread once the queue is empty (worker shutdown, tests)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._closing = False


def _store_fault(exc: BaseException, n: int) -> HTTPFault:
    if isinstance(exc, StoreFullError):
        log.error("group commit of %d command(s) failed: %s", n, exc)
        return HTTPFault(503, "The API store is full; the command was not accepted. Retry later.",
                         ((b"Retry-After", b"30"),))
    log.error("group commit of %d command(s) failed", n, exc_info=exc)
    return HTTPFault(500, "Unexpected API Error. The command was not accepted: the store "
                          "could not commit it.")


__all__ = ["Busy", "GroupCommitter", "MAX_GROUP", "MAX_QUEUE"]
