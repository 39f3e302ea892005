"""GET /flavors, /flavors/detail, /flavors/{id}, /flavors/{id}/os-extra_specs[/{key}]
against Nova's samples, per microversion; filters, paging, visibility, errors; one read
transaction per request."""

from __future__ import annotations

from typing import Any

import pytest

from fastpath.api import flavors
from fastpath.store import Batch
from fastpath.store.changes import Catalog, CatalogPut
from tests.unit.catalog_support import (
    ADMIN_TOKEN,
    BASE,
    PROJECT,
    TOKEN,
    Server,
    call,
    fault,
    sample,
    seed,
)
from tests.unit.conftest import HOST, request

P = f"/v2.1/{PROJECT}"

# Nova's sample flavors (api_samples/flavors): the default set plus the two the sample
# tests create.
SAMPLE_FLAVORS: dict[str, dict[str, Any]] = {
    "1": {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1},
    "2": {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20},
    "3": {"id": "3", "name": "m1.medium", "vcpus": 2, "ram": 4096, "disk": 40},
    "4": {"id": "4", "name": "m1.large", "vcpus": 4, "ram": 8192, "disk": 80},
    "5": {"id": "5", "name": "m1.xlarge", "vcpus": 8, "ram": 16384, "disk": 160},
    "6": {"id": "6", "name": "m1.tiny.specs", "vcpus": 1, "ram": 512, "disk": 1,
          "extra_specs": {"hw:numa_nodes": "1"}},
    "7": {"id": "7", "name": "m1.small.description", "vcpus": 1, "ram": 2048, "disk": 20,
          "description": "test description",
          "extra_specs": {"hw:cpu_policy": "shared", "hw:numa_nodes": "1"}},
}


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    seed(s, Catalog.FLAVORS, SAMPLE_FLAVORS)
    return s


def _by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f for f in items}


@pytest.mark.parametrize("folder,version", [
    ("flavors", "2.1"), ("flavors", "2.54"), ("flavors/v2.55", "2.55"), ("flavors/v2.55", "2.60"),
    ("flavors/v2.61", "2.61"), ("flavors/v2.61", "2.74"), ("flavors/v2.75", "2.75"),
    ("flavors/v2.75", "2.101"), ("flavors/v2.102", "2.102"), ("flavors/v2.102", "latest"),
])
def test_samples(srv: Server, folder: str, version: str) -> None:
    for name, path in (("flavors-list-resp.json", "/flavors"),
                       ("flavors-detail-resp.json", "/flavors/detail")):
        want = sample(f"{folder}/{name}")
        r = call(srv, P + path, version=version)
        assert r.status == 200
        got = r.json()
        assert list(got) == ["flavors"]
        ids = [f["id"] for f in got["flavors"]]
        assert ids == sorted(SAMPLE_FLAVORS)
        mine = _by_id(got["flavors"])
        for f in want["flavors"]:
            assert mine[f["id"]] == f, (name, version)
    want = sample(f"{folder}/flavor-get-resp.json")
    fid = want["flavor"]["id"]
    r = call(srv, f"{P}/flavors/{fid}", version=version)
    assert r.status == 200 and r.json() == want


def test_links_without_project_in_url(srv: Server) -> None:
    f = call(srv, "/v2.1/flavors/1").json()["flavor"]
    assert f["links"] == [
        {"href": f"{BASE}/v2.1/flavors/1", "rel": "self"},
        {"href": f"{BASE}/flavors/1", "rel": "bookmark"},
    ]


def test_extra_specs(srv: Server) -> None:
    r = call(srv, P + "/flavors/7/os-extra_specs")
    assert r.status == 200 and r.json() == sample("flavor-extra-specs/flavor-extra-specs-list-resp.json")
    r = call(srv, "/v2.1/flavors/7/os-extra_specs/hw:numa_nodes")
    assert r.status == 200 and r.json() == sample("flavor-extra-specs/flavor-extra-specs-get-resp.json")
    assert call(srv, "/v2.1/flavors/1/os-extra_specs").json() == {"extra_specs": {}}
    msg = fault(call(srv, "/v2.1/flavors/7/os-extra_specs/nope"), 404)
    assert msg == "Flavor 7 has no extra specs with key nope."
    assert fault(call(srv, "/v2.1/flavors/99/os-extra_specs"), 404) == "Flavor 99 could not be found."
    assert fault(call(srv, "/v2.1/flavors/99/os-extra_specs/k"), 404) == "Flavor 99 could not be found."


def test_not_found(srv: Server) -> None:
    assert fault(call(srv, "/v2.1/flavors/99"), 404) == "Flavor 99 could not be found."


def test_paging(srv: Server) -> None:
    seen: list[str] = []
    target = "/v2.1/flavors?limit=3"
    pages = 0
    while True:
        body = call(srv, target.replace(BASE, "")).json()
        pages += 1
        seen += [f["id"] for f in body["flavors"]]
        links = body.get("flavors_links")
        if not links:
            break
        assert links[0]["rel"] == "next"
        target = links[0]["href"]
    assert seen == sorted(SAMPLE_FLAVORS) and pages == 3
    body = call(srv, "/v2.1/flavors/detail?limit=2&marker=2&minRam=1").json()
    assert [f["id"] for f in body["flavors"]] == ["3", "4"]
    assert body["flavors_links"] == [{
        "href": f"{BASE}/v2.1/flavors/detail?limit=2&marker=4&minRam=1", "rel": "next"}]
    body = call(srv, f"{P}/flavors?limit=7").json()
    assert body["flavors_links"][0]["href"] == f"{BASE}/v2.1/{PROJECT}/flavors?limit=7&marker=7"
    assert "flavors_links" not in call(srv, "/v2.1/flavors?limit=8").json()
    assert call(srv, "/v2.1/flavors?limit=0").json() == {"flavors": []}
    msg = fault(call(srv, "/v2.1/flavors?marker=99"), 400)
    assert msg == "marker [99] not found"


def test_paging_max_limit(make_server: Any) -> None:
    s = make_server(extra_routes=False, api__max_limit=2)
    seed(s, Catalog.FLAVORS, SAMPLE_FLAVORS)
    body = call(s, "/v2.1/flavors").json()
    assert [f["id"] for f in body["flavors"]] == ["1", "2"]
    assert body["flavors_links"][0]["href"] == f"{BASE}/v2.1/flavors?marker=2"
    body = call(s, "/v2.1/flavors?limit=50").json()
    assert body["flavors_links"][0]["href"] == f"{BASE}/v2.1/flavors?limit=50&marker=2"


def test_sort_and_filters(srv: Server) -> None:
    def ids(q: str, version: str | None = None, token: str | None = None) -> list[str]:
        kw: dict[str, Any] = {"version": version}
        if token:
            kw["token"] = token
        r = call(srv, "/v2.1/flavors" + q, **kw)
        assert r.status == 200, r.body
        return [f["id"] for f in r.json()["flavors"]]

    assert ids("?sort_key=memory_mb&sort_dir=desc") == ["5", "4", "3", "7", "2", "6", "1"]
    assert ids("?sort_key=name") == ["4", "3", "2", "7", "1", "6", "5"]
    assert ids("?sort_dir=desc") == ["7", "6", "5", "4", "3", "2", "1"]
    assert ids("?sort_key=memory_mb&marker=2") == ["7", "3", "4", "5"]
    assert ids("?minRam=4096") == ["3", "4", "5"]
    assert ids("?minDisk=40&minRam=8192") == ["4", "5"]
    assert ids("?name=small", "2.102") == ["2", "7"]
    assert ids("?name=^m1.t", "2.102") == ["1", "6"]
    assert fault(call(srv, "/v2.1/flavors?minRam=x"), 400) == "Invalid minRam filter [x]"
    assert fault(call(srv, "/v2.1/flavors?minDisk=1.5"), 400) == "Invalid minDisk filter [1.5]"
    msg = fault(call(srv, "/v2.1/flavors?sort_key=bogus"), 400)
    assert msg.startswith("Invalid input for query parameters sort_key. Value: bogus. 'bogus' is not one of [")
    msg = fault(call(srv, "/v2.1/flavors?sort_dir=up"), 400)
    assert msg == "Invalid input for query parameters sort_dir. Value: up. 'up' is not one of ['asc', 'desc']"
    msg = fault(call(srv, "/v2.1/flavors?limit=-1"), 400)
    assert msg == "Invalid input for query parameters limit. Value: -1. '-1' does not match '^[0-9]*$'"
    fault(call(srv, "/v2.1/flavors?sort_key=rxtx_factor", version="2.102"), 400)
    assert call(srv, "/v2.1/flavors?sort_key=rxtx_factor", version="2.101").status == 200
    # Unknown parameters: ignored before 2.75, refused from 2.75; name only from 2.102.
    assert ids("?foo=1", "2.74") == sorted(SAMPLE_FLAVORS)
    msg = fault(call(srv, "/v2.1/flavors?foo=1", version="2.75"), 400)
    assert msg == "Additional properties are not allowed ('foo' was unexpected)"
    fault(call(srv, "/v2.1/flavors?name=x", version="2.101"), 400)
    assert ids("?name=zzz", "2.74") == sorted(SAMPLE_FLAVORS)
    fault(call(srv, "/v2.1/flavors/1?foo=1", version="2.102"), 400)
    assert call(srv, "/v2.1/flavors/1?foo=1", version="2.101").status == 200


def test_visibility(srv: Server) -> None:
    seed(srv, Catalog.FLAVORS, {
        "p1": {"id": "p1", "name": "private", "vcpus": 1, "ram": 1, "disk": 1, "is_public": False,
               "projects": [PROJECT]},
        "p2": {"id": "p2", "name": "private2", "vcpus": 1, "ram": 1, "disk": 1, "is_public": False},
        "d1": {"id": "d1", "name": "disabled", "vcpus": 1, "ram": 1, "disk": 1, "disabled": True},
    })
    public = sorted(SAMPLE_FLAVORS)

    def ids(q: str = "", token: str | None = None) -> list[str]:
        kw = {"token": token} if token else {}
        return [f["id"] for f in call(srv, "/v2.1/flavors" + q, **kw).json()["flavors"]]

    assert ids() == public + ["p1"]
    assert ids(token="bob:other") == public
    assert ids("?is_public=false") == public + ["p1"]  # not an admin: the filter is ignored
    assert ids(token=ADMIN_TOKEN) == public + ["d1", "p1"]
    assert ids("?is_public=none", ADMIN_TOKEN) == public + ["d1", "p1", "p2"]
    assert ids("?is_public=false", ADMIN_TOKEN) == ["p1", "p2"]
    assert ids("?is_public=yes", ADMIN_TOKEN) == public + ["d1", "p1"]
    assert fault(call(srv, "/v2.1/flavors?is_public=maybe", ADMIN_TOKEN), 400) == (
        "Invalid is_public filter [maybe]")
    assert call(srv, "/v2.1/flavors/p1").status == 200
    assert call(srv, "/v2.1/flavors/d1").status == 200
    assert fault(call(srv, "/v2.1/flavors/p2"), 404) == "Flavor p2 could not be found."
    assert call(srv, "/v2.1/flavors/p2", ADMIN_TOKEN).status == 200
    assert fault(call(srv, "/v2.1/flavors?marker=p2"), 400) == "marker [p2] not found"
    assert ids("?marker=p2", ADMIN_TOKEN) == []


def test_swap_and_rxtx(srv: Server) -> None:
    seed(srv, Catalog.FLAVORS, {"s": {"id": "s", "name": "s", "vcpus": 1, "ram": 1, "disk": 1,
                                      "swap": 512, "rxtx_factor": 2.5}})
    f = call(srv, "/v2.1/flavors/s", version="2.74").json()["flavor"]
    assert (f["swap"], f["rxtx_factor"]) == (512, 2.5)
    f = call(srv, "/v2.1/flavors/1", version="2.74").json()["flavor"]
    assert f["swap"] == ""
    f = call(srv, "/v2.1/flavors/1", version="2.75").json()["flavor"]
    assert f["swap"] == 0


def test_no_flavors(make_server: Any) -> None:
    s = make_server(extra_routes=False)
    assert call(s, "/v2.1/flavors/detail").json() == {"flavors": []}
    assert fault(call(s, "/v2.1/flavors/1"), 404) == "Flavor 1 could not be found."


# -- the per-worker cache of answers (flavors.BodyCache) ----------------------------------------

def _count_flavor_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a handler read flavor entries (a cache miss reads them, a hit does not)."""
    from fastpath.store.reader import Reader

    n = [0]
    one, every = Reader.flavor, Reader.flavors

    def flavor(self: Reader, flavor_id: str) -> Any:
        n[0] += 1
        return one(self, flavor_id)

    def flavors(self: Reader) -> Any:
        n[0] += 1
        return every(self)

    monkeypatch.setattr(Reader, "flavor", flavor)
    monkeypatch.setattr(Reader, "flavors", flavors)
    return n


def test_cache_hits_cost_one_read_txn_and_no_decoding(srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _count_flavor_reads(monkeypatch)
    targets = ["/v2.1/flavors", "/v2.1/flavors/detail", "/v2.1/flavors/7", "/v2.1/flavors/7/os-extra_specs",
               "/v2.1/flavors/7/os-extra_specs/hw:numa_nodes", P + "/flavors/detail?limit=2"]
    first = [call(srv, t).body for t in targets]  # call() checks: one read txn each
    assert reads[0] > 0
    reads[0] = 0
    assert [call(srv, t).body for t in targets] == first
    assert reads[0] == 0
    # Errors are answered afresh each time, in one read transaction too.
    for _ in range(2):
        assert fault(call(srv, "/v2.1/flavors/99"), 404) == "Flavor 99 could not be found."
        assert fault(call(srv, "/v2.1/flavors?minRam=x"), 400) == "Invalid minRam filter [x]"


def test_cache_follows_flavor_changes(srv: Server) -> None:
    assert call(srv, "/v2.1/flavors/1").json()["flavor"]["name"] == "m1.tiny"
    names = [f["name"] for f in call(srv, "/v2.1/flavors/detail").json()["flavors"]]
    seed(srv, Catalog.FLAVORS, {"1": {**SAMPLE_FLAVORS["1"], "name": "m1.renamed"}})
    assert call(srv, "/v2.1/flavors/1").json()["flavor"]["name"] == "m1.renamed"
    got = [f["name"] for f in call(srv, "/v2.1/flavors/detail").json()["flavors"]]
    assert got == ["m1.renamed"] + names[1:]
    srv.plan.context.store.apply(Batch(catalog=[CatalogPut(Catalog.FLAVORS, "1", None)]))
    assert fault(call(srv, "/v2.1/flavors/1"), 404) == "Flavor 1 could not be found."
    assert [f["id"] for f in call(srv, "/v2.1/flavors").json()["flavors"]] == sorted(SAMPLE_FLAVORS)[1:]


def test_cache_keys_role_band_host_and_url_project(srv: Server) -> None:
    seed(srv, Catalog.FLAVORS, {"d1": {"id": "d1", "name": "disabled", "vcpus": 1, "ram": 1, "disk": 1,
                                       "disabled": True}})
    ids = [f["id"] for f in call(srv, "/v2.1/flavors").json()["flavors"]]
    assert "d1" not in ids
    assert "d1" in [f["id"] for f in call(srv, "/v2.1/flavors", ADMIN_TOKEN).json()["flavors"]]
    assert "d1" not in [f["id"] for f in call(srv, "/v2.1/flavors").json()["flavors"]]
    f = call(srv, "/v2.1/flavors/7", version="2.54").json()["flavor"]
    assert "description" not in f
    assert call(srv, "/v2.1/flavors/7", version="2.55").json()["flavor"]["description"] == "test description"
    assert "description" not in call(srv, "/v2.1/flavors/7", version="2.54").json()["flavor"]
    store = srv.plan.context.store
    for host in ("other.test:1", HOST, "other.test:1"):
        reads = store.read_txns
        r = srv.exchange(request("/v2.1/flavors/1", f"X-Auth-Token: {TOKEN}", host=host)).one()
        assert store.read_txns - reads == 1
        assert r.json()["flavor"]["links"][1]["href"] == f"http://{host}/flavors/1"
    assert call(srv, P + "/flavors/1").json()["flavor"]["links"][1]["href"] == f"{BASE}/{PROJECT}/flavors/1"
    assert call(srv, "/v2.1/flavors/1").json()["flavor"]["links"][1]["href"] == f"{BASE}/flavors/1"


@pytest.mark.parametrize("owner_first", [True, False])
def test_cache_leaks_no_private_flavor_across_projects(srv: Server, owner_first: bool) -> None:
    other = "bob:other"
    targets = ["/v2.1/flavors", "/v2.1/flavors/detail", "/v2.1/flavors?is_public=none"]
    # Warm the cache with no private flavor (project not in the key), then add one.
    for t in targets:
        call(srv, t, other)
    seed(srv, Catalog.FLAVORS, {"p1": {"id": "p1", "name": "private", "vcpus": 1, "ram": 1, "disk": 1,
                                       "is_public": False, "projects": [PROJECT]}})
    order = [TOKEN, other] if owner_first else [other, TOKEN]
    for _ in range(2):
        for token in order:
            mine = token == TOKEN
            for t in targets:
                assert ("p1" in [f["id"] for f in call(srv, t, token).json()["flavors"]]) == mine
            r = call(srv, "/v2.1/flavors/p1", token)
            assert r.status == (200 if mine else 404)
            r = call(srv, "/v2.1/flavors/p1/os-extra_specs", token)
            assert r.status == (200 if mine else 404)
    assert call(srv, "/v2.1/flavors/p1", "admin:other").status == 200


def test_cached_answers_equal_fresh_ones_at_every_microversion(
        srv: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(srv, Catalog.FLAVORS, {"p1": {"id": "p1", "name": "private", "vcpus": 1, "ram": 1, "disk": 1,
                                       "is_public": False, "projects": [PROJECT], "swap": 5}})
    targets = ["/v2.1/flavors", "/v2.1/flavors/detail", "/v2.1/flavors/detail?limit=3&sort_key=name",
               "/v2.1/flavors/7", "/v2.1/flavors/p1", "/v2.1/flavors/7/os-extra_specs",
               "/v2.1/flavors/7/os-extra_specs/hw:numa_nodes", "/v2.1/flavors?name=small"]
    requests = [(t, token, f"2.{v}") for v in range(1, 105) for t in targets
                for token in (TOKEN, ADMIN_TOKEN, "bob:other")]

    def answers() -> list[tuple[int, bytes]]:
        return [(r.status, r.body) for r in (call(srv, t, tok, ver) for t, tok, ver in requests)]

    monkeypatch.setattr(flavors.BodyCache, "max_entries", 0)  # nothing kept: every answer fresh
    fresh = answers()
    monkeypatch.undo()
    assert answers() == fresh
