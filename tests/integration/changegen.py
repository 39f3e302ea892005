"""A change generator for the fault tests of issue 6, run as its own process.

    python -m tests.integration.changegen --data-dir DIR --out FILE.json
        [--cells cell1,cell2] [--seed N] [--duration SECONDS] [--ops N] [--rate OPS_PER_S]
        [--mode direct|inbox] [--racers N] [--mix C,U,D,R] [--prefix P]

It opens the cells' databases (``DATA_DIR/cells/NAME.sqlite``, created if missing) and, until
``--duration`` seconds or ``--ops`` operations have passed (whichever comes first; SIGTERM
stops it early), writes a steady, seeded stream of changes at about ``--rate`` operations
per second, spread over the cells:

``direct`` (the default): what a cell service and its driver write -- servers created,
    updated (vm/task/power state, name, metadata, tags, several of them in one transaction)
    and deleted.  Deletes race updates: ``race`` operations commit an update immediately
    before or after the delete of the same server (or both in one transaction), and
    ``--racers`` threads per cell, each on its own SQLite connection, keep updating the
    servers that are about to be or were just deleted, so their commits interleave with the
    main thread's at the database.
``inbox``: commands for real ``fastpath cell`` processes, as the forwarder delivers them
    (``accept_command``): creates, then per server a valid sequence of the other commands
    (power actions, update, metadata, tags, lock/unlock, resize + confirm/revert, rebuild,
    createImage) and, for some, delete, sometimes with an update queued right behind the
    delete (the cell must refuse it: the server is gone).  Some commands are delivered twice (the inbox must refuse the
    duplicate).  Each command's expected final inbox state is recorded.

At exit it writes a JSON report to ``--out`` (atomically): the operations done, the uuids
created and deleted per cell, the commands and their expected outcome (inbox mode), and
the elapsed time.  Exit status 0, or 1 if an operation failed unexpectedly (the report
then has ``"error"``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
import uuid as uuid_mod
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from fastpath.cell.db import CellDBError, SqliteCellDB
from fastpath.cell.registry import open_cell

FLAVORS: tuple[dict[str, Any], ...] = (
    {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0, "swap": 0,
     "extra_specs": {}},
    {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20, "ephemeral": 0,
     "swap": 0, "extra_specs": {"hw:cpu_policy": "shared"}},
)
PROJECTS = ("6f70656e737461636b20342065766572", "a" * 32, "b" * 32)
USER = "fake-user"
TAGS = ("web", "db", "blue", "green", "canary", "batch")
# (vm_state, task_state, power_state) a driver may report.
STATES: tuple[tuple[str, str | None, int], ...] = (
    ("active", None, 1), ("stopped", None, 4), ("paused", None, 3), ("suspended", None, 7),
    ("active", "rebooting", 1), ("building", "spawning", 0), ("error", None, 0),
)
# Non-create command sequences a server may go through (inbox mode), valid in order.
PLANS: tuple[tuple[str, ...], ...] = (
    ("stop", "start", "reboot"), ("reboot", "stop"), ("pause", "unpause"),
    ("stop", "start", "delete"), ("reboot", "delete"), ("delete",), ("suspend", "resume", "delete"),
    ("update", "metadata", "tags", "stop", "metadata", "start"), ("lock", "unlock", "reboot"),
    ("resize", "confirmResize", "delete"), ("resize", "revertResize", "metadata"),
    ("rebuild", "tags", "delete"), ("createImage", "pause", "unpause"),
    ("metadata", "tags", "delete"),
)
# Updates that may be queued right behind a delete (the cell must refuse them).
LATE = ("reboot", "metadata", "tags", "update", "lock")


class Report:
    """What the generator did; dumped as JSON at exit."""

    def __init__(self, args: argparse.Namespace, cells: Sequence[str]) -> None:
        self.data: dict[str, Any] = {
            "seed": args.seed, "mode": args.mode, "cells": list(cells),
            "ops": Counter(), "created": {c: [] for c in cells},
            "deleted": {c: [] for c in cells}, "commands": {c: [] for c in cells},
            "duplicates_refused": 0, "elapsed": 0.0,
        }
        self.lock = threading.Lock()

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.data["ops"][what] += n

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def new_uuid(rng: random.Random) -> str:
    return str(uuid_mod.UUID(int=rng.getrandbits(128), version=4))


def random_update(db: SqliteCellDB, u: str, rng: random.Random, *, states: bool = True) -> str:
    """One transaction changing one server; returns its kind.  ``states=False``: user data
    only (name, metadata, tags), what may still arrive after a delete."""
    kinds = ("state", "name", "metadata", "tags", "multi") if states else (
        "name", "metadata", "tags")
    kind = rng.choice(kinds)
    if kind == "state":
        vm, task, power = rng.choice(STATES)
        db.update_instance(u, vm_state=vm, task_state=task, power_state=power)
    elif kind == "name":
        db.update_instance(u, name=f"vm-{rng.getrandbits(20):05x}")
    elif kind == "metadata":
        db.set_metadata(u, {f"k{i}": f"v{rng.getrandbits(16)}" for i in range(rng.randint(0, 3))})
    elif kind == "tags":
        db.set_tags(u, rng.sample(TAGS, rng.randint(0, 3)))
    else:
        with db.transaction():
            vm, task, power = rng.choice(STATES)
            db.update_instance(u, vm_state=vm, task_state=task, power_state=power,
                               name=f"vm-{rng.getrandbits(20):05x}")
            db.set_metadata(u, {"role": rng.choice(TAGS)})
            db.set_tags(u, rng.sample(TAGS, 2))
    return kind


def server_values(u: str, rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "uuid": u, "project_id": rng.choice(PROJECTS), "user_id": USER, "name": f"gen-{n}",
        "flavor": dict(rng.choice(FLAVORS)), "metadata": {"n": str(n)},
        "tags": rng.sample(TAGS, rng.randint(0, 2)),
    }


class CellStream:
    """The main thread's view of one cell: its connection and its live servers."""

    def __init__(self, name: str, db: SqliteCellDB) -> None:
        self.name = name
        self.db = db
        self.live: list[str] = []
        self.hot: deque[str] = deque(maxlen=16)  # the racers' targets
        # inbox mode: uuid -> remaining plan; servers whose create was queued
        self.plans: dict[str, list[str]] = {}
        self.accepted: list[tuple[str, str | None, dict[str, Any]]] = []

    def take_live(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.live))
        self.live[i], self.live[-1] = self.live[-1], self.live[i]
        return self.live.pop()


class DirectGenerator:
    def __init__(self, streams: list[CellStream], rng: random.Random, report: Report,
                 mix: Sequence[float]) -> None:
        self.streams = streams
        self.rng = rng
        self.report = report
        self.n = 0
        w = [max(0.0, x) for x in mix]
        # cumulative thresholds of create, update, delete (the rest: race)
        self.cuts = [sum(w[: i + 1]) / sum(w) for i in range(3)]

    def step(self) -> None:
        rng, s = self.rng, self.rng.choice(self.streams)
        self.n += 1
        r = rng.random()
        if len(s.live) < 4 or r < self.cuts[0]:
            u = new_uuid(rng)
            s.db.create_instance({**server_values(u, rng, self.n), "vm_state": "building",
                                  "task_state": "spawning"})
            s.live.append(u)
            s.hot.append(u)
            self.report.data["created"][s.name].append(u)
            self.report.count("create")
        elif r < self.cuts[1]:
            u = rng.choice(s.live)
            self.report.count("update_" + random_update(s.db, u, rng))
        elif r < self.cuts[2]:
            u = s.take_live(rng)
            s.hot.append(u)
            s.db.delete_instance(u)
            self.report.data["deleted"][s.name].append(u)
            self.report.count("delete")
        else:
            u = s.take_live(rng)
            s.hot.append(u)
            pattern = rng.choice(("update-then-delete", "delete-then-update", "same-txn",
                                  "update-delete-update"))
            if pattern == "same-txn":
                with s.db.transaction():
                    random_update(s.db, u, rng)
                    s.db.delete_instance(u)
            else:
                if pattern != "delete-then-update":
                    random_update(s.db, u, rng)
                s.db.delete_instance(u)
                if pattern != "update-then-delete":
                    random_update(s.db, u, rng, states=False)
            self.report.data["deleted"][s.name].append(u)
            self.report.count("race_" + pattern)


class InboxGenerator:
    """Commands into the inboxes of real cell processes."""

    def __init__(self, streams: list[CellStream], rng: random.Random, report: Report,
                 prefix: str) -> None:
        self.streams = streams
        self.rng = rng
        self.report = report
        self.prefix = prefix
        self.n = 0
        self.flavors: dict[str, str] = {}  # uuid -> flavor id at creation

    def _accept(self, s: CellStream, u: str, payload: dict[str, Any], expect: str) -> None:
        self.n += 1
        cid = f"{self.prefix}-{self.n:08d}"  # sorts in issue order (the inbox's tie-break)
        if not s.db.accept_command(cid, payload, u):
            raise RuntimeError(f"command {cid} refused as a duplicate on first delivery")
        s.accepted.append((cid, u, payload))
        self.report.data["commands"][s.name].append([cid, u, payload["action"], expect])
        self.report.count("command_" + payload["action"])

    def payload(self, u: str, action: str) -> dict[str, Any]:
        """A command's payload (docs/commands.md, "Inbox payloads")."""
        rng = self.rng
        p: dict[str, Any] = {"action": action}
        if action == "reboot":
            p["type"] = rng.choice(("SOFT", "HARD"))
        elif action == "update":
            p["name"] = f"renamed-{rng.getrandbits(16):04x}"
        elif action == "metadata":
            p.update(rng.choice((
                {"op": "set", "key": "k", "value": f"v{rng.getrandbits(8)}"},
                {"op": "merge", "metadata": {"a": "1", "b": f"{rng.getrandbits(8)}"}},
                {"op": "replace", "metadata": {"only": "this"}})))
        elif action == "tags":
            p.update(rng.choice(({"op": "add", "tag": rng.choice(TAGS)},
                                 {"op": "replace", "tags": rng.sample(TAGS, 2)},
                                 {"op": "clear"})))
        elif action == "lock":
            p.update(reason="fault test", locked_by="owner")
        elif action == "resize":
            now = self.flavors.get(u, FLAVORS[0]["id"])
            p["flavor"] = dict(next(f for f in FLAVORS if f["id"] != now))
        elif action == "rebuild":
            p["image_ref"] = str(uuid_mod.UUID(int=rng.getrandbits(128), version=4))
        elif action == "createImage":
            p.update(image_id=str(uuid_mod.UUID(int=rng.getrandbits(128), version=4)),
                     name="snapshot")
        return p

    def step(self) -> None:
        rng, s = self.rng, self.rng.choice(self.streams)
        r = rng.random()
        if s.accepted and r < 0.08:
            cid, u, again = rng.choice(s.accepted)  # a duplicate delivery
            if s.db.accept_command(cid, again, u):
                raise RuntimeError(f"duplicate delivery of {cid} was accepted twice")
            self.report.data["duplicates_refused"] += 1
            return
        if not s.plans or r < 0.40:
            u = new_uuid(rng)
            server = server_values(u, rng, self.n)
            self.flavors[u] = server["flavor"]["id"]
            self._accept(s, u, {"action": "create", "server": server}, "done")
            s.plans[u] = list(rng.choice(PLANS))
            self.report.data["created"][s.name].append(u)
            return
        u = rng.choice(list(s.plans))
        action = s.plans[u].pop(0)
        self._accept(s, u, self.payload(u, action), "done")
        if action == "delete":
            self.report.data["deleted"][s.name].append(u)
            if rng.random() < 0.5:  # an update racing the delete: queued right behind it
                self._accept(s, u, self.payload(u, rng.choice(LATE)), "failed")
            del s.plans[u]
        elif not s.plans[u]:
            del s.plans[u]


def racer(cell: str, path: str, hot: deque[str], seed: int, stop: threading.Event,
          report: Report, interval: float, errors: list[str]) -> None:
    """Update the servers the main thread is deleting, on a connection of its own."""
    rng = random.Random(seed)
    db = SqliteCellDB(path)
    try:
        while not stop.is_set():
            try:  # indexing a deque is atomic; iterating it beside the appender is not
                u = hot[rng.randrange(len(hot))] if hot else None
            except IndexError:
                u = None
            if u is not None:
                try:
                    random_update(db, u, rng, states=False)
                    report.count("racer_update")
                except CellDBError as e:  # rows are never removed: this is a bug
                    errors.append(f"racer {cell} {u}: {e}")
                    return
            stop.wait(interval)
    except Exception:  # noqa: BLE001 - reported through the JSON report
        errors.append(traceback.format_exc())
    finally:
        db.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="changegen", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="the JSON report written at exit")
    p.add_argument("--cells", default="cell1,cell2", help="comma-separated cell names")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--ops", type=int, default=0, help="stop after N operations (0: no limit)")
    p.add_argument("--rate", type=float, default=500.0, help="operations per second")
    p.add_argument("--mode", choices=("direct", "inbox"), default="direct")
    p.add_argument("--racers", type=int, default=1, help="racing updater threads per cell")
    p.add_argument("--mix", default="30,45,10,15",
                   help="direct mode: weights of create,update,delete,race (default 30,45,10,15)")
    p.add_argument("--prefix", default="", help="command id prefix (inbox mode)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [c for c in args.cells.split(",") if c]
    report = Report(args, names)
    rng = random.Random(args.seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    streams = [CellStream(n, open_cell(args.data_dir, n, create=True)) for n in names]
    errors: list[str] = []
    threads: list[threading.Thread] = []
    if args.mode == "direct":
        mix = [float(x) for x in args.mix.split(",")]
        if len(mix) != 4 or sum(mix) <= 0:
            print("changegen: --mix takes four weights", file=sys.stderr)
            return 2
        gen: DirectGenerator | InboxGenerator = DirectGenerator(streams, rng, report, mix)
        for s in streams:
            for i in range(args.racers):
                t = threading.Thread(
                    target=racer, name=f"racer-{s.name}-{i}",
                    args=(s.name, s.db.path, s.hot, rng.getrandbits(32), stop, report,
                          2.0 / max(args.rate, 1.0), errors), daemon=True)
                t.start()
                threads.append(t)
    else:
        gen = InboxGenerator(streams, rng, report, args.prefix or f"gen{args.seed}")
    print(f"changegen: {args.mode} into {','.join(names)} (seed {args.seed})", flush=True)
    start = time.monotonic()
    deadline = start + args.duration
    period = 1.0 / args.rate
    done = 0
    try:
        while not stop.is_set() and not errors:
            now = time.monotonic()
            if now >= deadline or (args.ops and done >= args.ops):
                break
            gen.step()
            done += 1
            pause = start + done * period - time.monotonic()
            if pause > 0:
                stop.wait(pause)
    except Exception:  # noqa: BLE001 - reported through the JSON report and the exit status
        errors.append(traceback.format_exc())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        report.data["elapsed"] = round(time.monotonic() - start, 3)
        report.data["steps"] = done
        if errors:
            report.data["error"] = errors
        report.write(args.out)
        for s in streams:
            s.db.close()
    print(f"changegen: {done} steps in {report.data['elapsed']} s: {dict(report.data['ops'])}",
          flush=True)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
