"""``fastpath seed``: fill a data dir with a realistic catalogue and N servers.

For trying fastpath and for measuring it: flavors (public and one private), images, a
keypair per project user, an availability zone with hosts, default quotas, and N servers
spread over P projects (created one second apart, newest last, mostly ACTIVE, some
SHUTOFF and ERROR), every one rendered into its views as cellsync will do.

Until the cells exist, seeding writes the API store directly, through its one write path
(``Store.apply``, durable commits); a ``fastpath serve`` may run on the same data dir
meanwhile (LMDB serves readers while one writer writes).  Seeding is idempotent: server
ids and versions derive from ``--seed`` and the server's index, so running it again with
the same arguments changes nothing, and a larger ``--servers`` adds only the new ones.

PERF: rendering the views (~85 us a server) dominates; it runs in a pool of processes
forked before the store is opened (LMDB environments must not cross fork), while this
process applies batches of pre-rendered servers.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from typing import Any

from fastpath.store.changes import Batch, Catalog, CatalogPut, Upsert
from fastpath.store.samples import EPOCH_2024, sample_record

CHUNK = 2000  # servers per pool task and per write transaction

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
              settings: Any) -> int:
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2 or done == total:
            last[0] = now
            print(f"fastpath seed: {done}/{total} servers", file=sys.stderr, flush=True)

    result = seed_data_dir(data_dir, servers, projects, seed=seed, jobs=jobs,
                           settings=settings, progress=progress)
    print(
        f"seeded {result['servers']} servers in {result['projects']} projects into "
        f"{data_dir} ({result['applied']} written, {result['unchanged']} already there) "
        f"in {result['seconds']} s"
    )
    host, port = settings.bind_address
    print(f"try (with fastpath serve running): curl -s 'http://{host}:{port}/v2.1/servers?limit=5' "
          f"-H 'X-Auth-Token: {user_id(0)}:{project_id(0)}'")
    return 0


__all__: Sequence[str] = ("seed_data_dir", "seed_main", "project_id", "user_id", "server_uuid")
