"""``fastpath status``: the processes serving a data dir, read from the master's files.

The master holds an exclusive ``flock`` on ``DATA_DIR/run/master.pid`` for as long as it
runs and publishes its shared memory as ``DATA_DIR/run/fastpath.shm``; this command maps
that file read-only.  A pid file nobody holds the lock on is stale (the master is gone,
whatever pid it names), so nothing is listed and the exit code is 1.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from fastpath.master.shm import ROLE_NAMES, ROLE_WORKER, SharedState

RUN_DIR = "run"
PID_FILE = "master.pid"
SHM_FILE = "fastpath.shm"
# Written by the cellsync daemon (at most once a second), read by /metrics and status.
CELLSYNC_STATS_FILE = "cellsync.json"

EXIT_OK = 0
EXIT_NOT_RUNNING = 1


def run_paths(data_dir: str) -> tuple[str, str, str]:
    """(run dir, pid/lock file, shared-memory file) of a data dir."""
    run = os.path.join(data_dir, RUN_DIR)
    return run, os.path.join(run, PID_FILE), os.path.join(run, SHM_FILE)


def cellsync_stats_path(data_dir: str) -> str:
    return os.path.join(data_dir, RUN_DIR, CELLSYNC_STATS_FILE)


def write_json_atomic(path: str, doc: Any) -> None:
    """Replace ``path`` with ``doc`` as JSON: readers see the old file or the new, whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, path)


def read_cellsync_stats(data_dir: str) -> dict[str, Any] | None:
    """The last stats cellsync published for ``data_dir`` (None: none, or unreadable)::

        {"pid": 123, "updated_at": 1764480000.5,
         "cells": {"cell1": {"cursor": 10, "head": 12, "lag_seqs": 2, "lag_seconds": 0.01,
                             "applied_total": 345, "resyncs_total": 0}}}
    """
    try:
        with open(cellsync_stats_path(data_dir), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), dict):
        return None
    return doc


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def master_pid(data_dir: str) -> int | None:
    """The pid of the master running for ``data_dir``, or None if none runs."""
    _, pid_path, _ = run_paths(data_dir)
    try:
        fd = os.open(pid_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            # flock works on a read-only descriptor; a shared lock conflicts only with the
            # master's exclusive one and is dropped at once, so a master starting at this
            # instant just retries (see arbiter._lock_data_dir).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            held = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not held or not text.isdigit():
        return None
    pid = int(text)
    return pid if _pid_alive(pid) else None


def _iso(ts: float) -> str | None:
    if ts <= 0:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _uptime(ts: float) -> float | None:
    return round(max(0.0, time.time() - ts), 1) if ts > 0 else None


def collect(data_dir: str) -> list[dict[str, Any]]:
    """One object per running process: the master first, then its children by slot."""
    pid = master_pid(data_dir)
    if pid is None:
        return []
    _, _, shm_path = run_paths(data_dir)
    try:
        shm: SharedState | None = SharedState.open_file(shm_path)
    except (OSError, ValueError):
        shm = None  # the master is between taking the lock and publishing its memory
    if shm is not None and shm.master_pid != pid:
        shm = None  # a previous master's file; the new one has not replaced it yet
    master: dict[str, Any] = {
        "role": "master",
        "name": None,
        "pid": pid,
        "started": None,
        "uptime": None,
        "restarts": 0,
        "generation": None,
        "worker_restarts": None,
    }
    rows = [master]
    if shm is None:
        return rows
    try:
        master["started"] = _iso(shm.master_started)
        master["uptime"] = _uptime(shm.master_started)
        master["generation"] = shm.generation
        master["worker_restarts"] = shm.worker_restarts
        now_ns = time.monotonic_ns()  # the heartbeats are CLOCK_MONOTONIC, system-wide
        for slot in range(shm.nslots):
            child = shm.pid(slot)
            if child <= 0:  # 0 free, -1 being forked
                continue
            beat = shm.heartbeat_ns(slot)
            role = shm.role(slot)
            rows.append(
                {
                    "role": ROLE_NAMES.get(role, f"role{role}"),
                    # A sidecar's name: the cell's name, "cellsync", "forwarder".
                    "name": (shm.name(slot) or None) if role != ROLE_WORKER else None,
                    "pid": child,
                    "started": _iso(shm.started(slot)),
                    "uptime": _uptime(shm.started(slot)),
                    "restarts": shm.restarts(slot),
                    "generation": shm.slot_generation(slot),
                    "index": shm.worker_index(slot),
                    "slot": slot,
                    "ready": shm.ready(slot),
                    "heartbeat_age": round(max(0, now_ns - beat) / 1e9, 3) if beat else None,
                }
            )
    finally:
        shm.buf.close()
    return rows


def _table(rows: list[dict[str, Any]], out: TextIO) -> None:
    head = ("ROLE", "NAME", "PID", "STARTED", "RESTARTS", "GEN", "INDEX", "READY", "HEARTBEAT")
    lines = [head]
    for r in rows:
        age = r.get("heartbeat_age")
        ready = r.get("ready")
        lines.append(
            (
                r["role"],
                r.get("name") or "-",
                str(r["pid"]),
                r["started"] or "-",
                str(r["restarts"]),
                "-" if r.get("generation") is None else str(r["generation"]),
                "-" if r.get("index") is None else str(r["index"]),
                "-" if ready is None else ("yes" if ready else "no"),
                "-" if age is None else f"{age:.1f}s ago",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        out.write("\n")


def _cellsync_lines(data_dir: str, out: TextIO) -> None:
    doc = read_cellsync_stats(data_dir)
    if doc is None:
        return
    age = max(0.0, time.time() - float(doc.get("updated_at") or 0))
    for cell, st in sorted(doc["cells"].items()):
        if isinstance(st, dict):
            out.write(
                f"cellsync {cell}: cursor {st.get('cursor')} of {st.get('head')}, "
                f"lag {st.get('lag_seqs')} changes / {st.get('lag_seconds')} s, "
                f"{st.get('applied_total')} applied, {st.get('resyncs_total')} resyncs "
                f"(as of {age:.0f} s ago)\n"
            )


def status_main(data_dir: str, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the processes of ``data_dir``; exit code 1 if no master runs for it."""
    out = sys.stdout if out is None else out
    rows = collect(data_dir)
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif rows:
        _table(rows, out)
        respawns = rows[0].get("worker_restarts")
        if respawns:
            out.write(f"worker respawns since the master started: {respawns}\n")
        if any(r["role"] == "cellsync" for r in rows):
            _cellsync_lines(data_dir, out)
    else:
        print(f"no fastpath running for {data_dir}", file=out)
    return EXIT_OK if rows else EXIT_NOT_RUNNING
