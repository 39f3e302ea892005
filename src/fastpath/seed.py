"""``fastpath seed``: fill a data dir with a realistic catalogue and N servers.

For trying fastpath and for measuring it: flavors (public and one private), images, a
keypair per project user, an availability zone with hosts, default quotas, and N servers
spread over P projects (created one second apart, newest last, mostly ACTIVE, some
SHUTOFF and ERROR), every one rendered into its views as cellsync will do.

Through the cells (the default).  The cells own the servers, so seeding writes them where
the truth lives: into the cells' databases (``DATA_DIR/cells/*.sqlite`` if there are any,
else the cells of ``standalone.cells``, created if missing), spread evenly over them
(server i goes to cell ``i % cells``), in transactions of ``CHUNK`` servers with their
change-feed entries.  Each server is built as a record (:func:`make_server`) and converted
to the cell's values in one place (:func:`cell_values`), with the cell's own hosts and
fixed IPs.  Then the servers are brought up to the API store: if a ``fastpath serve``
with its cellsync runs on the data dir, its bell is rung and seeding waits (bounded) until
cellsync's cursors reach the cells' feed heads; otherwise :class:`cellsync.sync.CellSync`
runs here until idle.  The catalogue (flavors, images, keypairs, AZ, quotas) is API-owned
and goes to the store directly.

Directly into the store (``--direct``, for the 1M-server benchmarks): through its one
write path (``Store.apply``, durable commits), no cells involved.  A ``fastpath serve`` may
run on the same data dir meanwhile (LMDB serves readers while one writer writes).

Either way seeding is idempotent: server ids and versions derive from ``--seed`` and the
server's index, so running it again with the same arguments changes nothing (a server a
cell already has is skipped), and a larger ``--servers`` adds only the new ones.

PERF (direct): rendering the views (~85 us a server) dominates; it runs in a pool of
processes forked before the store is opened (LMDB environments must not cross fork), while
this process applies batches of pre-rendered servers.  Through the cells, one process per
cell (up to ``--jobs``) builds and writes that cell's servers; the rendering is cellsync's.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import multiprocessing
import os
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fastpath.store.changes import Batch, Catalog, CatalogPut, Upsert
from fastpath.store.samples import EPOCH_2024, sample_record

if TYPE_CHECKING:
    from fastpath.cell.db import CellDB

CHUNK = 2000  # servers per pool task and per write transaction
# Waiting for a running cellsync to bring the seeded servers up: this long at least, plus
# one second per SYNC_WAIT_RATE servers (a shared, slow machine).
SYNC_WAIT_MIN = 120.0
SYNC_WAIT_RATE = 500

FLAVORS: tuple[dict[str, Any], ...] = (
    {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1},
    {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20},
    {"id": "3", "name": "m1.medium", "vcpus": 2, "ram": 4096, "disk": 40},
    {"id": "4", "name": "m1.large", "vcpus": 4, "ram": 8192, "disk": 80},
    {"id": "5", "name": "m1.xlarge", "vcpus": 8, "ram": 16384, "disk": 160},
    {"id": "6", "name": "c1.gpu", "vcpus": 16, "ram": 65536, "disk": 200, "is_public": False,
     "extra_specs": {"resources:VGPU": "1"}},
)
IMAGES: tuple[dict[str, Any], ...] = (
    {"id": "70a599e0-31e7-49b7-b260-868f441e862b", "name": "cirros-0.6.2-x86_64",
     "size": 21430272, "min_disk": 1, "properties": {"architecture": "x86_64"}},
    {"id": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "name": "ubuntu-24.04-x86_64",
     "size": 611254272, "min_disk": 10, "min_ram": 512,
     "properties": {"architecture": "x86_64", "os_distro": "ubuntu"}},
)
HOSTS = tuple(f"compute-{i:02d}" for i in range(16))
AZ = "nova"
PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFyXvTQTKd1HNWLs7gw3hBw1OZHk6HmV9Ymz2eCE2a8T seed"
)


def project_id(p: int) -> str:
    """Project ids look like Keystone's: 32 hex digits."""
    return f"{p:032x}"


def user_id(p: int) -> str:
    return f"user-{p:04d}"


def server_uuid(seed: int, i: int) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"fastpath-seed/{seed}/{i}"))


def catalog(projects: int) -> list[CatalogPut]:
    now = EPOCH_2024
    puts = []
    for f in FLAVORS:
        entry = {"ephemeral": 0, "swap": 0, "rxtx_factor": 1.0, "is_public": True,
                 "disabled": False, "description": None, "extra_specs": {},
                 "projects": [], "created_at": now, "updated_at": None, **f}
        if not entry["is_public"]:
            entry["projects"] = [project_id(0)]
        puts.append(CatalogPut(Catalog.FLAVORS, f["id"], entry))
    for img in IMAGES:
        entry = {"status": "active", "min_ram": 0, "visibility": "public", "owner": None,
                 "members": [], "created_at": now, "updated_at": now, **img}
        puts.append(CatalogPut(Catalog.IMAGES, img["id"], entry))
    for p in range(projects):
        name = "default-key"
        puts.append(CatalogPut(Catalog.KEYPAIRS, (user_id(p), name), {
            "name": name, "user_id": user_id(p), "public_key": PUBLIC_KEY,
            "fingerprint": "7e:eb:ab:24:ba:d1:e1:88:ae:9a:fb:66:53:df:d3:bd", "type": "ssh",
            "id": p + 1, "created_at": now, "updated_at": None,
        }))
    hosts = {
        h: {"nova-compute": {"available": True, "active": True, "updated_at": now}}
        for h in HOSTS
    }
    puts.append(CatalogPut(Catalog.AZS, AZ, {"name": AZ, "available": True, "hosts": hosts}))
    puts.append(CatalogPut(Catalog.QUOTA_LIMITS, "", {
        "instances": 1000000, "cores": 10000000, "ram": 1 << 40,
    }))
    return puts


def make_server(seed: int, i: int, projects: int) -> dict[str, Any]:
    p = i % projects
    j = i // projects  # varies within each project (i % k would not, with k | projects)
    u = server_uuid(seed, i)
    flavor = dict(FLAVORS[j % 5])
    flavor.update(ephemeral=0, swap=0, extra_specs={})
    image = IMAGES[j % 2]
    created = EPOCH_2024 + i * 1_000_000
    state = ("active", None, 1) if j % 10 < 8 else ("stopped", None, 4) if j % 10 == 8 \
        else ("error", None, 0)
    extra: dict[str, Any] = {}
    if state[0] == "error":
        extra["fault"] = {"code": 500, "message": "No valid host was found.",
                          "details": "", "created": created + 2_000_000}
    return sample_record(
        u, 1, project_id=project_id(p), user_id=user_id(p), created_at=created,
        updated_at=created + 10_000_000, seed=i,
        name=f"server-{i:07d}", hostname=f"server-{i:07d}",
        vm_state=state[0], task_state=state[1], power_state=state[2],
        host=HOSTS[i % len(HOSTS)], node=f"{HOSTS[i % len(HOSTS)]}.example.com",
        availability_zone=AZ,
        flavor={k: flavor[k] for k in ("id", "name", "vcpus", "ram", "disk", "ephemeral",
                                       "swap", "extra_specs")},
        image={"id": image["id"], "properties": dict(image["properties"])},
        tags=["web", "prod"] if j % 3 == 0 else ["db"] if j % 3 == 1 else [],
        **extra,
    )


# -- through the cells ----------------------------------------------------------------------
# The record's fields that are instance columns of the cell, as they are.
_CELL_SCALARS = (
    "uuid", "project_id", "user_id", "name", "hostname", "description", "vm_state",
    "task_state", "power_state", "progress", "locked", "locked_by", "locked_reason",
    "created_at", "updated_at", "launched_at", "terminated_at", "host", "node",
    "instance_name", "availability_zone", "pinned_availability_zone", "key_name",
    "config_drive", "disk_config", "access_ip_v4", "access_ip_v6", "reservation_id",
    "launch_index", "kernel_id", "ramdisk_id", "root_device_name", "user_data",
)


def cell_values(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``CellDB.create_instance`` values that hold everything of record ``rec``
    (the inverse of cellsync's projection; ``rec["fault"]`` goes in with ``add_fault``)."""
    values = {k: rec[k] for k in _CELL_SCALARS if k in rec}
    image = rec.get("image")
    values["image_ref"] = image["id"] if image else None
    values["image_properties"] = image["properties"] if image else {}
    values["flavor"] = rec["flavor"]
    values["metadata"] = rec.get("metadata", {})
    values["tags"] = rec.get("tags", [])
    values["security_groups"] = rec.get("security_groups", [])
    values["volumes"] = rec.get("volumes_attached", [])
    values["scheduler_hints"] = rec.get("scheduler_hints", {})
    values["server_groups"] = rec.get("server_groups", [])
    values["trusted_image_certificates"] = rec.get("trusted_image_certificates")
    # One VIF per (network, MAC): two ports on one network show under the same label.
    vifs: dict[tuple[str, str], dict[str, Any]] = {}
    for net, entries in rec.get("addresses", {}).items():
        for a in entries:
            vif = vifs.setdefault((net, a["mac"]), {"mac": a["mac"], "network": net, "ips": []})
            vif["ips"].append({"addr": a["addr"], "version": a["version"], "type": a["type"]})
    values["network"] = list(vifs.values())
    return values


@functools.lru_cache(maxsize=64)
def _pool_of(cell: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    from fastpath.cell.main import ip_pool_for

    return ipaddress.ip_network(ip_pool_for(cell))


def make_cell_server(seed: int, i: int, projects: int, cell: str, k: int,
                     hosts: int) -> dict[str, Any]:
    """Server ``i`` as the ``k``-th seeded server of ``cell``: :func:`make_server`, on the
    cell's own hosts (``CELL-compute-NN``, as ``fastpath cell`` names them) with one fixed
    IPv4 from the cell's pool, counted down from its top so that the addresses the running
    cell hands out from the bottom do not collide (until a cell holds ~32,000 seeded)."""
    rec = make_server(seed, i, projects)
    host = f"{cell}-compute-{k % hosts:02d}"
    rec["host"] = rec["node"] = host
    pool = _pool_of(cell)
    addr = pool.broadcast_address - 1 - (k % (pool.num_addresses // 2))
    mac = "fa:16:3e:" + ":".join(f"{b:02x}" for b in hashlib.sha256(rec["uuid"].encode()).digest()[:3])
    rec["addresses"] = {"private": [{"addr": str(addr), "version": 4, "mac": mac,
                                     "type": "fixed"}]}
    return rec


def seed_cells_of(data_dir: str, settings: Any) -> list[str]:
    """The cells ``fastpath seed`` writes into: the data dir's, else ``standalone.cells``."""
    from fastpath.cell.registry import cell_names

    return cell_names(data_dir) or list(settings.standalone_cells)


def _write_cell(db: CellDB, recs: list[dict[str, Any]]) -> None:
    with db.transaction():
        for rec in recs:
            db.create_instance(cell_values(rec))
            fault = rec.get("fault")
            if fault:
                db.add_fault(rec["uuid"], fault["code"], fault["message"], fault.get("details"),
                             rec["host"], fault["created"])


def _seed_cell(args: tuple[str, str, int, int, int, int, int, int]) -> tuple[str, int, int, int]:
    """Pool task: write the servers of one cell (every ``ncells``-th from ``first``), in
    transactions of CHUNK; ``(cell, written, already there, feed head)``.  One process per
    cell: SQLite has one writer per database, and the cells are separate files."""
    from fastpath.cell.registry import open_cell

    data_dir, cell, first, ncells, seed, servers, projects, hosts = args
    db = open_cell(data_dir, cell, create=True)
    written = existing = 0
    try:
        have = {u for u, _, _ in db.all_instance_versions()}
        pending: list[dict[str, Any]] = []
        for i in range(first, servers, ncells):
            if server_uuid(seed, i) in have:
                existing += 1
                continue
            pending.append(make_cell_server(seed, i, projects, cell, i // ncells, hosts))
            if len(pending) >= CHUNK:
                _write_cell(db, pending)
                written += len(pending)
                pending = []
        if pending:
            _write_cell(db, pending)
            written += len(pending)
        return cell, written, existing, db.max_seq()
    finally:
        db.close()


def seed_through_cells(
    data_dir: str, servers: int, projects: int, cells: Sequence[str], *, seed: int = 1,
    jobs: int = 0, settings: Any = None, progress: Callable[[int, int], None] | None = None,
    wait: float | None = None,
) -> dict[str, Any]:
    """Write the servers into ``cells`` (one process per cell, at most ``jobs``) and bring
    them up to the store (module doc)."""
    from fastpath.api.context import open_store
    from fastpath.settings import load

    if servers < 0 or projects < 1:
        raise ValueError("--servers must be >= 0 and --projects >= 1")
    if not cells:
        raise ValueError("no cells to seed into")
    settings = settings or load(None, {"data_dir": data_dir})
    started = time.monotonic()
    store = open_store(settings)
    try:
        store.apply(Batch(catalog=catalog(projects)))
    finally:
        store.close()  # before the pool forks: an LMDB environment must not cross fork
    n = len(cells)
    tasks = [(data_dir, cell, k, n, seed, servers, projects, settings["cell.hosts"])
             for k, cell in enumerate(cells)]
    jobs = min(jobs or os.cpu_count() or 1, n)
    written = existing = 0
    heads: dict[str, int] = {}

    def done(result: tuple[str, int, int, int]) -> None:
        nonlocal written, existing
        cell, w, e, head = result
        written, existing, heads[cell] = written + w, existing + e, head
        if progress is not None:
            progress(min(servers, sum(len(range(t[2], servers, n)) for t in tasks
                                      if t[1] in heads)), servers)

    if jobs <= 1:
        for task in tasks:
            done(_seed_cell(task))
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for result in pool.imap_unordered(_seed_cell, tasks):
                done(result)
    how = _bring_up(data_dir, settings, heads,
                    wait if wait is not None else SYNC_WAIT_MIN + servers / SYNC_WAIT_RATE)
    return {
        "servers": servers, "projects": projects, "applied": written, "unchanged": existing,
        "cells": list(cells), "synced_by": how,
        "seconds": round(time.monotonic() - started, 1),
    }


def _cellsync_running(data_dir: str) -> bool:
    from fastpath.master.status import collect

    return any(r["role"] == "cellsync" for r in collect(data_dir))


def _bring_up(data_dir: str, settings: Any, heads: dict[str, int], wait: float) -> str:
    """Bring the cells' changes up to ``heads`` into the store; says who did it."""
    from fastpath.wake import bell_path, ring

    if _cellsync_running(data_dir):
        from fastpath.api.context import open_store

        ring(bell_path(data_dir, "cellsync"))
        deadline = time.monotonic() + wait
        store = open_store(settings)
        try:
            while True:
                with store.read() as r:  # each read sees the latest commit
                    cursors = {c: r.cursor(c) or 0 for c in heads}
                if all(cursors[c] >= h for c, h in heads.items()):
                    return "the running cellsync"
                if time.monotonic() >= deadline:
                    behind = ", ".join(f"{c} at {cursors[c]} of {heads[c]}"
                                       for c in sorted(heads) if cursors[c] < heads[c])
                    raise TimeoutError(
                        f"cellsync did not catch up within {wait:.0f} s ({behind}); the "
                        "servers are in the cells and will appear when it does")
                time.sleep(0.05)
        finally:
            store.close()
    from cellsync.__main__ import open_all
    from cellsync.sync import CellSync

    store, dbs = open_all(data_dir)
    try:
        CellSync(store, dbs).run_until_idle()
    finally:
        for db in dbs.values():
            db.close()
        store.close()
    # A cellsync running on its own (not under a master) may want to look too: harmless.
    ring(bell_path(data_dir, "cellsync"))
    return "cellsync in this process"


# -- directly into the store ------------------------------------------------------------------
def _render_chunk(args: tuple[int, int, int, int]) -> list[tuple[str, dict[str, Any], Any]]:
    """Pool task: records and their rendered views for servers [start, stop)."""
    from fastpath.api import views

    seed, start, stop, projects = args
    out = []
    for i in range(start, stop):
        rec = make_server(seed, i, projects)
        out.append((rec["uuid"], rec, views.render_server(rec)))
    return out


def _chunks(seed: int, servers: int, projects: int) -> Iterator[tuple[int, int, int, int]]:
    for start in range(0, servers, CHUNK):
        yield seed, start, min(start + CHUNK, servers), projects


def seed_data_dir(
    data_dir: str, servers: int, projects: int, *, seed: int = 1, jobs: int = 0,
    settings: Any = None, progress: Any = None,
) -> dict[str, Any]:
    """Seed ``data_dir``; returns a summary.  ``progress(done, total)`` is called per batch."""
    from fastpath.api.context import open_store
    from fastpath.settings import load

    if servers < 0 or projects < 1:
        raise ValueError("--servers must be >= 0 and --projects >= 1")
    settings = settings or load(None, {"data_dir": data_dir})
    jobs = jobs or os.cpu_count() or 1
    started = time.monotonic()
    applied = skipped = 0
    ctx = multiprocessing.get_context("fork")
    # The pool is forked before the store is opened: LMDB environments must not cross fork.
    with ctx.Pool(jobs) as pool:
        store = open_store(settings)
        try:
            store.apply(Batch(catalog=catalog(projects)))
            done = 0
            for rendered in pool.imap(_render_chunk, _chunks(seed, servers, projects)):
                views_by_uuid = {u: v for u, _, v in rendered}
                summary = store.apply(
                    Batch([Upsert(u, rec["version"], rec) for u, rec, _ in rendered]),
                    render=lambda rec: views_by_uuid[rec["uuid"]],  # noqa: B023 - used at once
                )
                applied += summary.applied
                skipped += summary.skipped_stale
                done += len(rendered)
                if progress is not None:
                    progress(done, servers)
        finally:
            store.close()
    return {
        "servers": servers, "projects": projects, "applied": applied,
        "unchanged": skipped, "seconds": round(time.monotonic() - started, 1),
    }


def seed_main(data_dir: str, servers: int, projects: int, seed: int, jobs: int,
              settings: Any, direct: bool = False, wait: float | None = None) -> int:
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2 or done == total:
            last[0] = now
            print(f"fastpath seed: {done}/{total} servers", file=sys.stderr, flush=True)

    cells = [] if direct else seed_cells_of(data_dir, settings)
    if cells:
        try:
            result = seed_through_cells(data_dir, servers, projects, cells, seed=seed,
                                        jobs=jobs, settings=settings, progress=progress,
                                        wait=wait)
        except TimeoutError as exc:
            print(f"fastpath seed: {exc}", file=sys.stderr)
            return 1
        where = f"cells {', '.join(cells)} of {data_dir}, synced by {result['synced_by']}"
    else:
        result = seed_data_dir(data_dir, servers, projects, seed=seed, jobs=jobs,
                               settings=settings, progress=progress)
        where = f"{data_dir}"
    print(
        f"seeded {result['servers']} servers in {result['projects']} projects into "
        f"{where} ({result['applied']} written, {result['unchanged']} already there) "
        f"in {result['seconds']} s"
    )
    host, port = settings.bind_address
    print(f"try (with fastpath serve running): curl -s 'http://{host}:{port}/v2.1/servers?limit=5' "
          f"-H 'X-Auth-Token: {user_id(0)}:{project_id(0)}'")
    return 0


__all__: Sequence[str] = (
    "cell_values", "seed_data_dir", "seed_through_cells", "seed_main", "project_id", "user_id",
    "server_uuid",
)
