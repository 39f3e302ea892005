"""The compiled servers paths (http/serverpath.pxi) answer byte for byte as the general
Python path does: each request below is made with the compiled paths on and off
(``servers.COMPILED``) and the two responses compared, status and body; the requests the
compiled paths are meant for are checked to be answered by them (not by the fallback)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from fastpath.api import servers, views
from fastpath.store import Batch, Tombstone, Upsert
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, Server, call
from tests.unit.test_api_servers import (
    EPOCH_2024,
    MINE,
    OTHER,
    OTHER_TOKEN,
    RECORDS,
    S,
    _rec,
    _uuid,
)

TOKEN = f"fake:{PROJECT}"
SOFT = _rec(20, vm_state="soft-delete")  # hidden from the default list
GONE = MINE[5]  # tombstoned: its uuid stays a valid marker
BARE = _rec(21)  # stored without views: the general path renders it


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    store = s.plan.context.store
    store.apply(Batch([Upsert(r["uuid"], r["version"], r) for r in [*RECORDS, SOFT]]),
                render=views.render_server)
    later = EPOCH_2024 + 1000 * S
    final = dict(GONE, vm_state="deleted", status="DELETED", version=2, deleted_at=later)
    store.apply(Batch([Tombstone(GONE["uuid"], 2, PROJECT, GONE["created_at"], later, final)]))
    return s


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the bodies the compiled paths produced (not None)."""
    seen = {"page": 0, "show": 0}
    core = servers._core

    class Spy:
        def servers_page(self, *a: Any) -> bytes | None:
            out = core.servers_page(*a)
            seen["page"] += out is not None
            return out

        def server_show(self, *a: Any) -> bytes | None:
            out = core.server_show(*a)
            seen["show"] += out is not None
            return out

    monkeypatch.setattr(servers, "_core", Spy())
    return seen


def both(srv: Server, target: str, token: str = TOKEN, version: str | None = "2.104") -> Any:
    servers.COMPILED = True
    try:
        fast = call(srv, target, token, version)
        servers.COMPILED = False
        slow = call(srv, target, token, version)
    finally:
        servers.COMPILED = True
    assert (fast.status, fast.body) == (slow.status, slow.body), target
    return fast


MARKERS = [MINE[0]["uuid"], MINE[4]["uuid"], MINE[-1]["uuid"], GONE["uuid"], SOFT["uuid"],
           MINE[1]["uuid"].upper()]
FAST_LISTS = [
    "", "?limit=1", "?limit=3", "?limit=0100", "?limit=12", "?limit=13", "?limit=14",
    *(f"?marker={m}" for m in MARKERS),
    *(f"?limit=2&marker={m}" for m in MARKERS),
    *(f"?marker={m}&limit=4" for m in MARKERS),
]
SLOW_LISTS = [
    "?limit=0", "?limit=", "?limit=-1", "?limit=x", "?limit=1&limit=2", "?limit=2&",
    "?&limit=2", f"?marker={_uuid(999)}", f"?marker={_uuid(100)}", "?marker=nope",
    "?limit=1000000000000", "?limit=%31", "?sort_dir=asc", "?name=vm", "?all_tenants=1",
    f"?marker={MINE[0]['uuid']}&marker={MINE[1]['uuid']}",
]


@pytest.mark.parametrize("detail", ["", "/detail"])
@pytest.mark.parametrize("token", [TOKEN, ADMIN_TOKEN, OTHER_TOKEN, "fake:nobody"])
def test_lists_match_the_general_path(srv: Server, compiled: dict[str, int], detail: str,
                                      token: str) -> None:
    for q in FAST_LISTS:
        for version in ("2.1", "2.47", "2.104"):
            both(srv, f"/v2.1/servers{detail}{q}", token, version)
    assert compiled["page"] > 0
    for q in SLOW_LISTS:
        both(srv, f"/v2.1/servers{detail}{q}", token)
    if token in (TOKEN, ADMIN_TOKEN):
        both(srv, f"/v2.1/{PROJECT}/servers{detail}?limit=2", token)


def test_the_default_lists_are_compiled(srv: Server, compiled: dict[str, int]) -> None:
    for q in FAST_LISTS:
        both(srv, "/v2.1/servers/detail" + q)
    # Markers of this project (live or tombstoned): every one is answered compiled.
    assert compiled["page"] == len(FAST_LISTS)
    for q in SLOW_LISTS:
        both(srv, "/v2.1/servers" + q)
    assert compiled["page"] == len(FAST_LISTS)


def test_paging_a_full_project(srv: Server, compiled: dict[str, int]) -> None:
    store = srv.plan.context.store
    many = [_rec(200 + i, created_at=EPOCH_2024 + (i % 7) * S) for i in range(120)]
    store.apply(Batch([Upsert(r["uuid"], r["version"], r) for r in many]), render=views.render_server)
    seen: list[str] = []
    target = "/v2.1/servers/detail?limit=25"
    while True:
        body = both(srv, target).json()
        seen += [s["id"] for s in body["servers"]]
        if "servers_links" not in body:
            break
        href = urlsplit(body["servers_links"][0]["href"])
        target = f"{href.path}?{href.query}"
    assert len(seen) == len(set(seen)) == 12 + 120  # 13 mine - GONE + 120, SOFT hidden
    assert compiled["page"] >= 6


def test_a_server_without_views_falls_back(srv: Server, compiled: dict[str, int]) -> None:
    srv.plan.context.store.apply(Batch([Upsert(BARE["uuid"], 1, BARE)]))  # no render
    both(srv, "/v2.1/servers/detail")
    both(srv, "/v2.1/servers")
    both(srv, f"/v2.1/servers/{BARE['uuid']}")


def test_show_matches_the_general_path(srv: Server, compiled: dict[str, int]) -> None:
    for u in (MINE[0]["uuid"], MINE[3]["uuid"], MINE[0]["uuid"].upper(), SOFT["uuid"]):
        for version in ("2.1", "2.47", "2.104"):
            for token in (TOKEN, ADMIN_TOKEN):
                both(srv, f"/v2.1/servers/{u}", token, version)
    assert compiled["show"] == 4 * 3 * 2
    both(srv, f"/v2.1/{PROJECT}/servers/{MINE[0]['uuid']}")
    for u in (_uuid(100), GONE["uuid"], _uuid(999), "nope", MINE[0]["uuid"][:-1]):
        both(srv, f"/v2.1/servers/{u}")
    both(srv, f"/v2.1/servers/{_uuid(100)}", ADMIN_TOKEN)
    both(srv, f"/v2.1/servers/{_uuid(100)}", OTHER_TOKEN)
    both(srv, f"/v2.1/servers/{MINE[0]['uuid']}?foo=1", TOKEN, "2.102")
    both(srv, f"/v2.1/servers/{MINE[0]['uuid']}?foo=1", TOKEN, "2.101")
    assert OTHER  # the other project's servers exist
