"""``fastpath status`` on hand-made run files: a held lock, a stale pid file, no data dir.

The "master" here is this test process: it takes the lock as the master does and writes
a shared-memory file with two worker slots (no processes are started).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpath.master import status
from fastpath.master.shm import ROLE_CELL, ROLE_CELLSYNC, ROLE_WORKER, SharedState


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path


def write_pid_file(data_dir: Path, pid: int) -> Path:
    path = data_dir / "run" / "master.pid"
    path.write_text(f"{pid}\n")
    return path


@pytest.fixture
def locked(data_dir: Path) -> Iterator[int]:
    """The pid file holds this process's pid and is locked as a running master's is."""
    path = write_pid_file(data_dir, os.getpid())
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
    os.close(fd)


def make_shm(data_dir: Path, master_pid: int) -> SharedState:
    shm = SharedState.create_file(str(data_dir / "run" / "fastpath.shm"), nslots=6)
    shm.set_master_pid(master_pid)
    shm.master_started = time.time() - 60
    shm.generation = 3
    shm.worker_restarts = 2
    shm.claim(0, ROLE_WORKER, generation=3, worker_index=0, restarts=2)
    shm.set_pid(0, 1111)
    shm.claim(4, ROLE_WORKER, generation=3, worker_index=1, restarts=0)
    shm.set_pid(4, 2222)
    shm.buf[shm.slot_offset(4) + 40 : shm.slot_offset(4) + 48] = (1).to_bytes(8, "little")
    shm.claim(2, ROLE_WORKER, generation=2, worker_index=1, restarts=0)  # being forked
    shm.claim(5, ROLE_CELL, generation=3, worker_index=0, restarts=1, name="cell1")
    shm.set_pid(5, 3333)
    shm.set_ready(5)
    return shm


def run(data_dir: Path, as_json: bool) -> tuple[int, str]:
    out = io.StringIO()
    code = status.status_main(str(data_dir), as_json=as_json, out=out)
    return code, out.getvalue()


def test_lists_master_and_workers_as_json(data_dir: Path, locked: int) -> None:
    make_shm(data_dir, os.getpid())
    code, text = run(data_dir, as_json=True)
    assert code == 0
    rows = json.loads(text)
    assert [(r["role"], r["pid"]) for r in rows] == [
        ("master", os.getpid()),
        ("worker", 1111),
        ("worker", 2222),
        ("cell", 3333),
    ]
    for r in rows:
        assert {"role", "name", "pid", "started", "uptime", "restarts"} <= r.keys()
    master, w0, w1, cell = rows
    assert 59 <= master["uptime"] < 120
    assert (w0["name"], cell["name"]) == (None, "cell1")
    assert (cell["restarts"], cell["ready"], cell["slot"]) == (1, True, 5)
    assert master["generation"] == 3 and master["worker_restarts"] == 2
    assert master["restarts"] == 0
    assert (w0["restarts"], w0["index"], w0["slot"], w0["ready"]) == (2, 0, 0, False)
    assert (w1["restarts"], w1["index"], w1["slot"], w1["ready"]) == (0, 1, 4, True)
    assert 0 <= w0["heartbeat_age"] < 60
    assert w0["started"].endswith("+00:00")


def test_table(data_dir: Path, locked: int) -> None:
    make_shm(data_dir, os.getpid())
    code, text = run(data_dir, as_json=False)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["ROLE", "NAME", "PID", "STARTED", "RESTARTS"]
    assert lines[1].split()[:3] == ["master", "-", str(os.getpid())]
    assert lines[2].split()[:3] == ["worker", "-", "1111"]
    assert lines[3].split()[:3] == ["worker", "-", "2222"]
    assert lines[4].split()[:3] == ["cell", "cell1", "3333"]


def test_master_without_published_memory_is_listed_alone(data_dir: Path, locked: int) -> None:
    code, text = run(data_dir, as_json=True)
    assert code == 0
    assert [r["role"] for r in json.loads(text)] == ["master"]


def test_memory_of_a_previous_master_is_ignored(data_dir: Path, locked: int) -> None:
    make_shm(data_dir, master_pid=os.getpid() + 1)
    code, text = run(data_dir, as_json=True)
    assert code == 0
    assert [r["role"] for r in json.loads(text)] == ["master"]


def test_unlocked_pid_file_is_stale(data_dir: Path) -> None:
    # The pid is alive (it is ours) but nobody holds the lock: the master is gone.
    write_pid_file(data_dir, os.getpid())
    make_shm(data_dir, os.getpid())
    code, text = run(data_dir, as_json=False)
    assert code == 1
    assert text.strip() == f"no fastpath running for {data_dir}"
    code, text = run(data_dir, as_json=True)
    assert code == 1 and json.loads(text) == []


def test_locked_pid_file_naming_a_dead_pid_is_stale(data_dir: Path, locked: int) -> None:
    os.pwrite(locked, b"999999999\n", 0)  # beyond pid_max: certainly not running
    code, text = run(data_dir, as_json=True)
    assert code == 1 and json.loads(text) == []


def test_empty_pid_file_is_not_running(data_dir: Path) -> None:
    (data_dir / "run" / "master.pid").write_text("")
    assert run(data_dir, as_json=True) == (1, "[]\n")


def test_missing_data_dir(tmp_path: Path) -> None:
    code, text = run(tmp_path / "nowhere", as_json=False)
    assert code == 1
    assert "no fastpath running for" in text


def test_shared_memory_file_round_trip(data_dir: Path) -> None:
    shm = make_shm(data_dir, 77)
    reader = SharedState.open_file(str(data_dir / "run" / "fastpath.shm"))
    assert reader.nslots == shm.nslots and reader.master_pid == 77
    assert [reader.pid(s) for s in range(6)] == [1111, 0, -1, 0, 2222, 3333]
    assert reader.worker_index(4) == 1 and reader.slot_generation(0) == 3
    assert (reader.name(5), reader.name(4)) == ("cell1", "")
    assert reader.ready_by_role() == {ROLE_WORKER: (1, 2), ROLE_CELL: (1, 1)}
    # The writer's updates are visible through the reader's mapping at once.
    shm.set_pid(0, 4444)
    assert reader.pid(0) == 4444
    reader.buf.close()
    shm.buf.close()
    other = data_dir / "other.shm"
    other.write_bytes(b"not a fastpath file" * 10)
    with pytest.raises(ValueError, match="bad magic"):
        SharedState.open_file(str(other))


def test_cellsync_stats_file_and_its_metrics(data_dir: Path) -> None:
    from fastpath.api.routes import cellsync_metric_lines

    assert status.read_cellsync_stats(str(data_dir)) is None
    assert cellsync_metric_lines(str(data_dir)) == []  # cellsync never ran here
    doc = {"pid": 9, "updated_at": time.time() - 2.5, "cells": {
        "cell1": {"cursor": 10, "head": 12, "lag_seqs": 2, "lag_seconds": 0.25,
                  "applied_total": 345, "resyncs_total": 1, "batches_total": 7},
        'we"ird': {"cursor": 0, "head": 0, "lag_seqs": 0, "lag_seconds": 0.0,
                   "applied_total": 0, "resyncs_total": 0},
    }}
    status.write_json_atomic(status.cellsync_stats_path(str(data_dir)), doc)
    assert status.read_cellsync_stats(str(data_dir)) == json.loads(json.dumps(doc))
    lines = cellsync_metric_lines(str(data_dir))
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert samples['fastpath_cellsync_lag_seconds{cell="cell1"}'] == "0.25"
    assert samples['fastpath_cellsync_lag_seqs{cell="cell1"}'] == "2"
    assert samples['fastpath_cellsync_changes_applied_total{cell="cell1"}'] == "345"
    assert samples['fastpath_cellsync_resyncs_total{cell="cell1"}'] == "1"
    assert samples['fastpath_cellsync_batches_total{cell="cell1"}'] == "7"
    assert 'fastpath_cellsync_batches_total{cell="we\\"ird"}' not in samples  # older file
    assert samples['fastpath_cellsync_lag_seqs{cell="we\\"ird"}'] == "0"
    assert 2.4 <= float(samples["fastpath_cellsync_stats_age_seconds"]) < 60
    # A torn or foreign file is ignored, never an error on /metrics.
    with open(status.cellsync_stats_path(str(data_dir)), "w") as f:
        f.write('{"cells": ')
    assert status.read_cellsync_stats(str(data_dir)) is None
    assert cellsync_metric_lines(str(data_dir)) == []


def test_metrics_list_the_sidecars_ready_by_role(data_dir: Path) -> None:
    from fastpath.api.routes import Metrics

    shm = make_shm(data_dir, os.getpid())
    text = Metrics(shm, [], data_dir=str(data_dir)).render().decode()
    assert 'fastpath_sidecars_ready{role="cell"} 1' in text
    assert 'fastpath_sidecars_ready{role="cellsync"} 0' in text
    assert 'fastpath_sidecars_ready{role="forwarder"} 0' in text
    m = Metrics(shm, [])
    m.add_source(lambda: ["fastpath_test_hook 7"])
    assert "fastpath_test_hook 7" in m.render().decode()
    shm.buf.close()


def test_table_ends_with_cellsync_figures(data_dir: Path, locked: int) -> None:
    shm = make_shm(data_dir, os.getpid())
    shm.claim(3, ROLE_CELLSYNC, generation=3, worker_index=0, restarts=0, name="cellsync")
    shm.set_pid(3, 4444)
    status.write_json_atomic(status.cellsync_stats_path(str(data_dir)), {
        "pid": 4444, "updated_at": time.time(), "cells": {"cell1": {
            "cursor": 10, "head": 12, "lag_seqs": 2, "lag_seconds": 0.25,
            "applied_total": 345, "resyncs_total": 1}}})
    code, text = run(data_dir, as_json=False)
    assert code == 0
    assert text.splitlines()[-1] == (
        "cellsync cell1: cursor 10 of 12, lag 2 changes / 0.25 s, 345 applied, 1 resyncs "
        "(as of 0 s ago)")
    assert text.splitlines()[3].split()[:3] == ["cellsync", "cellsync", "4444"]  # by slot
