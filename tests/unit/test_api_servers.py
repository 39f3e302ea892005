"""GET /servers, /servers/detail, /servers/{id} and its ips, metadata and tags, in process:
paging, Nova's filters and sorts, tenancy, error bodies, microversion behaviour -- and, for
every request, exactly one store read transaction and no write (``call`` asserts it)."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.api import views
from fastpath.store import Batch, Tombstone, Upsert
from fastpath.store.samples import EPOCH_2024, sample_record
from tests.unit.catalog_support import ADMIN_TOKEN, BASE, PROJECT, Server, call, fault

OTHER = "0ther0000000000000000000000000000"
OTHER_TOKEN = f"someone:{OTHER}"
S = 1_000_000  # a second in the record's unit
N = 13  # servers of PROJECT


def _uuid(i: int) -> str:
    return str(uuidlib.UUID(int=(0x5E << 120) + i))


def _rec(i: int, project: str = PROJECT, **over: Any) -> dict[str, Any]:
    # created_at: pairs of servers share a second (the uuid breaks the tie).
    values: dict[str, Any] = dict(
        project_id=project, created_at=EPOCH_2024 + (i // 2) * S, seed=i, name=f"vm-{i:02d}",
        tags=["even" if i % 2 == 0 else "odd", f"t{i % 3}"],
    )
    values.update(over)
    return sample_record(_uuid(i), 1, **values)


def _records() -> list[dict[str, Any]]:
    recs = [_rec(i) for i in range(N)]
    recs[3] = _rec(3, vm_state="stopped", power_state=4)
    recs[4] = _rec(4, vm_state="error", locked=True, locked_by="owner")
    recs[5] = _rec(5, vm_state="active", task_state="rebooting")
    recs[6] = _rec(6, flavor=dict(recs[6]["flavor"], id="42"), availability_zone="az2",
                   image=None, host="special-host")
    recs[7] = _rec(7, addresses={"public": [
        {"addr": "10.9.8.7", "version": 4, "mac": None, "type": "fixed"},
        {"addr": "172.24.4.9", "version": 4, "mac": None, "type": "floating"}]})
    recs += [_rec(100 + i, OTHER, name=f"other-{i}") for i in range(3)]
    return recs


RECORDS = _records()
MINE = [r for r in RECORDS if r["project_id"] == PROJECT]
# Nova's default order: created_at desc, then (our stand-in for id) uuid desc.
DEFAULT_ORDER = [r["uuid"] for r in sorted(MINE, key=lambda r: (r["created_at"], r["uuid"]),
                                           reverse=True)]


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    store = s.plan.context.store
    store.apply(Batch([Upsert(r["uuid"], r["version"], r) for r in RECORDS]),
                render=views.render_server)
    return s


def ids(r: Any) -> list[str]:
    assert r.status == 200, (r.status, r.body)
    return [s["id"] for s in r.json()["servers"]]


def get(srv: Server, path: str, token: str | None = None, version: str | None = None) -> Any:
    return call(srv, "/v2.1" + path, token or f"fake:{PROJECT}", version)


def walk(srv: Server, first: str, token: str | None = None, version: str | None = None
         ) -> tuple[list[str], int]:
    """Follow servers_links from ``first``: every id seen, pages read."""
    seen: list[str] = []
    target = "/v2.1" + first
    pages = 0
    while True:
        r = call(srv, target, token or f"fake:{PROJECT}", version)
        pages += 1
        seen += ids(r)
        links = r.json().get("servers_links")
        if not links:
            return seen, pages
        assert links[0]["rel"] == "next"
        href = links[0]["href"]
        assert href.startswith(BASE + "/v2.1/servers")
        u = urlsplit(href)
        target = u.path + "?" + u.query


# -- show ----------------------------------------------------------------------------------


def test_show_is_the_views_assembly(srv: Server) -> None:
    u = MINE[0]["uuid"]
    for version in ("2.1", "2.47", "latest"):
        r = get(srv, f"/servers/{u}", version=version)
        assert r.status == 200
        body = r.json()
        assert list(body) == ["server"]
        assert body["server"]["id"] == u
        assert body["server"]["name"] == "vm-00"
        assert {"rel": "self", "href": f"{BASE}/v2.1/servers/{u}"} in body["server"]["links"]
    admin = get(srv, f"/servers/{u}", token=ADMIN_TOKEN).json()["server"]
    user = get(srv, f"/servers/{u}").json()["server"]
    assert "OS-EXT-SRV-ATTR:host" in admin and "OS-EXT-SRV-ATTR:host" not in user


def test_show_tenancy_and_unknown(srv: Server) -> None:
    theirs = _uuid(100)
    for path in (f"/servers/{theirs}", f"/servers/{theirs}/ips", f"/servers/{theirs}/ips/private",
                 f"/servers/{theirs}/metadata", f"/servers/{theirs}/metadata/role"):
        assert fault(get(srv, path), 404) == f"Instance {theirs} could not be found.", path
    # An admin sees any project's server.
    assert get(srv, f"/servers/{theirs}", token=ADMIN_TOKEN).json()["server"]["id"] == theirs
    assert get(srv, f"/servers/{theirs}", token=OTHER_TOKEN).status == 200
    for bad in ("not-a-uuid", _uuid(999)):
        assert fault(get(srv, f"/servers/{bad}"), 404) == f"Instance {bad} could not be found."


def test_show_query_strict_from_2_102(srv: Server) -> None:
    u = MINE[0]["uuid"]
    assert get(srv, f"/servers/{u}?foo=1", version="2.101").status == 200
    msg = fault(get(srv, f"/servers/{u}?foo=1", version="2.102"), 400)
    assert msg == "Additional properties are not allowed ('foo' was unexpected)"


# -- list, detail, paging ---------------------------------------------------------------------


def test_list_default_order_and_shape(srv: Server) -> None:
    r = get(srv, "/servers")
    assert ids(r) == DEFAULT_ORDER
    body = r.json()
    assert list(body) == ["servers"]  # no next link: the page is not full
    first = body["servers"][0]
    assert sorted(first) == ["id", "links", "name"]
    d = get(srv, "/servers/detail").json()
    assert [s["id"] for s in d["servers"]] == DEFAULT_ORDER
    assert "status" in d["servers"][0] and "flavor" in d["servers"][0]


@pytest.mark.parametrize("path", ["/servers", "/servers/detail"])
@pytest.mark.parametrize("limit", [1, 2, 5, N, N + 1])
def test_paging_lists_every_server_once(srv: Server, path: str, limit: int) -> None:
    seen, pages = walk(srv, f"{path}?limit={limit}")
    assert seen == DEFAULT_ORDER
    # Nova adds a next link whenever a page is full: an exact multiple costs one empty page.
    assert pages == N // limit + 1


def test_paging_reverse_and_other_sorts(srv: Server) -> None:
    seen, _ = walk(srv, "/servers?limit=4&sort_key=created_at&sort_dir=asc")
    assert seen == list(reversed(DEFAULT_ORDER))
    by_name = sorted(MINE, key=lambda r: r["name"])
    seen, _ = walk(srv, "/servers?limit=3&sort_key=display_name&sort_dir=asc")
    assert seen == [r["uuid"] for r in by_name]
    seen, _ = walk(srv, "/servers?limit=5&sort_key=display_name")  # desc by default
    assert seen == [r["uuid"] for r in reversed(by_name)]
    # A record-only key (the records are decoded, same transaction).
    seen, _ = walk(srv, "/servers?limit=4&sort_key=launch_index&sort_key=uuid&sort_dir=asc")
    assert seen == sorted(r["uuid"] for r in MINE)


def test_next_link_keeps_parameters(srv: Server) -> None:
    r = get(srv, "/servers/detail?name=vm&limit=2&foo=bar&sort_dir=desc")
    href = r.json()["servers_links"][0]["href"]
    u = urlsplit(href)
    assert u.path == "/v2.1/servers/detail"
    # Sorted, the unknown parameter stripped (before 2.75), the marker last.
    assert parse_qsl(u.query) == [("limit", "2"), ("name", "vm"), ("sort_dir", "desc"),
                                  ("marker", DEFAULT_ORDER[1])]


def test_max_limit(srv: Server, make_server: Any) -> None:
    r = get(srv, "/servers?limit=100000")
    assert ids(r) == DEFAULT_ORDER
    s = make_server(extra_routes=False, api__max_limit=4)
    s.plan.context.store.apply(Batch([Upsert(x["uuid"], 1, x) for x in MINE]),
                               render=views.render_server)
    r = call(s, "/v2.1/servers", f"fake:{PROJECT}")
    assert ids(r) == DEFAULT_ORDER[:4]
    assert "marker=" + DEFAULT_ORDER[3] in r.json()["servers_links"][0]["href"]


def test_limit_zero(srv: Server) -> None:
    assert get(srv, "/servers?limit=0").json() == {"servers": []}


def test_bad_limit_and_marker(srv: Server) -> None:
    assert fault(get(srv, "/servers?limit=-1"), 400) == (
        "Invalid input for query parameters limit. Value: -1. '-1' does not match '^[0-9]*$'")
    assert fault(get(srv, "/servers/detail?limit=abc"), 400) == (
        "Invalid input for query parameters limit. Value: abc. 'abc' does not match '^[0-9]*$'")
    for marker in ("nope", _uuid(999), _uuid(100)):  # unknown, absent, another project's
        assert fault(get(srv, f"/servers?marker={marker}"), 400) == f"marker [{marker}] not found"
        assert fault(get(srv, f"/servers?marker={marker}&sort_key=display_name"), 400) == (
            f"marker [{marker}] not found")


def test_bad_sort(srv: Server) -> None:
    msg = fault(get(srv, "/servers?sort_key=bogus"), 400)
    assert msg.startswith("Invalid input for query parameters sort_key. Value: bogus. "
                          "'bogus' is not one of [")
    assert fault(get(srv, "/servers?sort_dir=up"), 400) == (
        "Invalid input received: Unknown sort direction, must be 'desc' or 'asc'")
    assert fault(get(srv, "/servers?sort_key=host"), 403) == "Only administrators can sort servers by host"
    assert ids(get(srv, "/servers?sort_key=host", token=ADMIN_TOKEN))
    # Ignored keys (Nova's SERVER_LIST_IGNORE_SORT_KEY) fall back to the default order.
    assert ids(get(srv, "/servers?sort_key=id")) == DEFAULT_ORDER


# -- filters ---------------------------------------------------------------------------------------


def _mine(pred: Any) -> list[str]:
    return [u for u in DEFAULT_ORDER if pred(next(r for r in MINE if r["uuid"] == u))]


def test_name_regex(srv: Server) -> None:
    assert ids(get(srv, "/servers?name=vm-1")) == _mine(lambda r: r["name"].startswith("vm-1"))
    assert ids(get(srv, "/servers?name=0%5B35%5D$")) == _mine(lambda r: r["name"] in ("vm-03", "vm-05"))
    assert fault(get(srv, "/servers?name=%5B"), 400) == (
        "Invalid input for query parameters name. Value: [. '[' is not a 'regex'")


def test_status(srv: Server) -> None:
    assert ids(get(srv, "/servers?status=SHUTOFF")) == [_uuid(3)]
    assert ids(get(srv, "/servers?status=REBOOT")) == [_uuid(5)]
    # Nova filters on the vm states and the task states separately: with ERROR (task state
    # 'default') in the list no task state is filtered, so every active server matches.
    assert ids(get(srv, "/servers?status=error&status=REBOOT")) == _mine(
        lambda r: r["vm_state"] in ("active", "error"))
    # ACTIVE is vm_state active whatever the task state (Nova's 'default' task entry).
    assert _uuid(5) in ids(get(srv, "/servers?status=ACTIVE"))
    assert fault(get(srv, "/servers?status=bogus", version="2.38"), 400) == "Invalid status value"
    assert get(srv, "/servers?status=bogus", version="2.37").json() == {"servers": []}
    assert fault(get(srv, "/servers?status=DELETED"), 403) == (
        "Only administrators may list deleted instances")


def test_flavor_image_ip_az(srv: Server) -> None:
    assert ids(get(srv, "/servers?flavor=42")) == [_uuid(6)]
    image = MINE[0]["image"]["id"]
    assert ids(get(srv, f"/servers?image={image}")) == _mine(lambda r: r["image"] is not None)
    assert ids(get(srv, "/servers?ip=10%5C.9")) == [_uuid(7)]
    assert ids(get(srv, "/servers?ip=172.24.4.9")) == []  # floating addresses do not count
    assert ids(get(srv, "/servers?ip6=fd00::", version="2.5")) == _mine(
        lambda r: any(a["version"] == 6 for n in r["addresses"].values() for a in n))
    assert ids(get(srv, "/servers?ip6=fd00::")) == DEFAULT_ORDER  # not a user filter before 2.5
    # availability_zone: a non-admin filter from 2.83, ignored before.
    assert ids(get(srv, "/servers?availability_zone=az2", version="2.83")) == [_uuid(6)]
    assert ids(get(srv, "/servers?availability_zone=az2", version="2.82")) == DEFAULT_ORDER


def test_tags_filters(srv: Server) -> None:
    def q(s: str, version: str = "2.26") -> list[str]:
        return ids(get(srv, "/servers?" + s, version=version))

    def has(r: dict[str, Any], t: str) -> bool:
        return t in r["tags"]

    assert q("tags=even,t0") == _mine(lambda r: has(r, "even") and has(r, "t0"))
    assert q("tags-any=odd,t0") == _mine(lambda r: has(r, "odd") or has(r, "t0"))
    assert q("not-tags=even,t0") == _mine(lambda r: not (has(r, "even") and has(r, "t0")))
    assert q("not-tags-any=odd,t0") == _mine(lambda r: not (has(r, "odd") or has(r, "t0")))
    assert q("tags=even", version="2.25") == DEFAULT_ORDER  # unknown before 2.26: stripped


def test_locked(srv: Server) -> None:
    assert ids(get(srv, "/servers?locked=true", version="2.73")) == [_uuid(4)]
    assert _uuid(4) not in ids(get(srv, "/servers?locked=0", version="2.73"))
    assert ids(get(srv, "/servers?locked=true", version="2.72")) == DEFAULT_ORDER
    assert fault(get(srv, "/servers?locked=maybe", version="2.73"), 400) == (
        "Invalid input received: Unrecognized value 'maybe', acceptable values are: "
        "'0', '1', 'f', 'false', 'n', 'no', 'off', 'on', 't', 'true', 'y', 'yes'")


def test_unknown_filters(srv: Server) -> None:
    # Before 2.75 unknown parameters are stripped; a non-admin's admin filters are ignored.
    assert ids(get(srv, "/servers?foo=bar")) == DEFAULT_ORDER
    assert ids(get(srv, "/servers?host=special-host")) == DEFAULT_ORDER
    assert ids(get(srv, "/servers?host=special-host", token=ADMIN_TOKEN)) == [_uuid(6)]
    assert fault(get(srv, "/servers?foo=bar&baz=1", version="2.75"), 400) == (
        "Additional properties are not allowed ('baz', 'foo' were unexpected)")
    assert fault(get(srv, "/servers?metadata=x", token=ADMIN_TOKEN), 400) == (
        "Invalid filter field: metadata.")
    assert ids(get(srv, "/servers?metadata=x")) == DEFAULT_ORDER


def test_all_tenants(srv: Server) -> None:
    assert fault(get(srv, "/servers?all_tenants=1"), 403) == (
        "Policy doesn't allow os_compute_api:servers:index:get_all_tenants to be performed.")
    assert fault(get(srv, "/servers/detail?all_tenants"), 403) == (
        "Policy doesn't allow os_compute_api:servers:detail:get_all_tenants to be performed.")
    assert ids(get(srv, "/servers?all_tenants=0")) == DEFAULT_ORDER
    # An admin without all_tenants: the admin's own project only.
    assert ids(get(srv, "/servers", token=ADMIN_TOKEN)) == DEFAULT_ORDER
    everything = ids(get(srv, "/servers?all_tenants=1", token=ADMIN_TOKEN))
    assert sorted(everything) == sorted(r["uuid"] for r in RECORDS)
    theirs = ids(get(srv, f"/servers?all_tenants=1&project_id={OTHER}", token=ADMIN_TOKEN))
    assert sorted(theirs) == sorted(_uuid(100 + i) for i in range(3))
    seen, _ = walk(srv, "/servers?all_tenants=true&limit=4", token=ADMIN_TOKEN)
    assert seen == everything
    # project_id without all_tenants is ignored (lp:1185290)
    assert ids(get(srv, f"/servers?project_id={OTHER}", token=ADMIN_TOKEN)) == DEFAULT_ORDER


def test_changes_since_lists_deleted(srv: Server) -> None:
    store = srv.plan.context.store
    gone = MINE[2]
    later = EPOCH_2024 + 1000 * S
    final = dict(gone, vm_state="deleted", status="DELETED", version=2, deleted_at=later)
    store.apply(Batch([Tombstone(gone["uuid"], 2, PROJECT, gone["created_at"], later, final)]))
    upd = dict(MINE[0], version=3, updated_at=later + S, name="renamed")
    store.apply(Batch([Upsert(upd["uuid"], 3, upd)]), render=views.render_server)
    assert gone["uuid"] not in ids(get(srv, "/servers"))
    r = get(srv, "/servers/detail?changes-since=2024-01-01T00:16:00Z")
    servers = {s["id"]: s for s in r.json()["servers"]}
    assert list(servers) == [MINE[2]["uuid"], MINE[0]["uuid"]]  # created_at desc
    assert servers[gone["uuid"]]["status"] == "DELETED"
    assert servers[MINE[0]["uuid"]]["name"] == "renamed"
    assert ids(get(srv, "/servers?changes-since=2024-01-01T00:16:00Z&changes-before=2024-01-01T00:16:40.5Z",
                   version="2.66")) == [gone["uuid"]]
    assert fault(get(srv, "/servers?changes-since=yesterday"), 400) == (
        "Invalid input for query parameters changes-since. Value: yesterday. "
        "'yesterday' is not a 'date-time'")
    assert fault(get(srv, "/servers?changes-since=2024-02-01&changes-before=2024-01-01",
                     version="2.66"), 400) == (
        "The value of changes-since must be less than or equal to changes-before.")
    # The marker of a deleted server still pages while its tombstone lasts.
    assert ids(get(srv, f"/servers?marker={gone['uuid']}")) == DEFAULT_ORDER[DEFAULT_ORDER.index(gone["uuid"]) + 1:]


# -- sub-resources -------------------------------------------------------------------------------


def test_ips(srv: Server) -> None:
    rec = MINE[0]
    u = rec["uuid"]
    want = {n: [{"version": a["version"], "addr": a["addr"]} for a in e]
            for n, e in rec["addresses"].items()}
    assert get(srv, f"/servers/{u}/ips").json() == {"addresses": want}
    assert get(srv, f"/servers/{u}/ips/private").json() == {"private": want["private"]}
    assert fault(get(srv, f"/servers/{u}/ips/nowhere"), 404) == (
        "Instance is not a member of specified network")


def test_metadata(srv: Server) -> None:
    u = MINE[0]["uuid"]
    assert get(srv, f"/servers/{u}/metadata").json() == {"metadata": MINE[0]["metadata"]}
    assert get(srv, f"/servers/{u}/metadata/role").json() == {"meta": {"role": "web"}}
    assert get(srv, f"/servers/{u}/metadata/My%20Server%20Name").json() == {
        "meta": {"My Server Name": "Apache1"}}
    assert fault(get(srv, f"/servers/{u}/metadata/nope"), 404) == "Metadata item was not found"


def test_tags(srv: Server) -> None:
    u = MINE[0]["uuid"]
    assert get(srv, f"/servers/{u}/tags", version="2.26").json() == {"tags": ["even", "t0"]}
    r = get(srv, f"/servers/{u}/tags/even", version="2.26")
    assert (r.status, r.body) == (204, b"")
    assert fault(get(srv, f"/servers/{u}/tags/odd", version="2.26"), 404) == (
        f"Server {u} has no tag 'odd'")
    assert fault(get(srv, f"/servers/{u}/tags", version="2.25"), 404) == (
        "The resource could not be found.")
    assert fault(get(srv, f"/servers/{u}/tags/even", version="2.25"), 404) == (
        "The resource could not be found.")
    theirs = _uuid(100)
    assert fault(get(srv, f"/servers/{theirs}/tags", version="2.26"), 404) == (
        f"Instance {theirs} has no mapping to a cell.")


def test_legacy_project_url(srv: Server) -> None:
    r = call(srv, f"/v2.1/{PROJECT}/servers?limit=2", f"fake:{PROJECT}")
    assert ids(r) == DEFAULT_ORDER[:2]
    href = r.json()["servers_links"][0]["href"]
    assert href.startswith(f"{BASE}/v2.1/{PROJECT}/servers?")
    assert r.json()["servers"][0]["links"][0]["href"] == f"{BASE}/v2.1/{PROJECT}/servers/{DEFAULT_ORDER[0]}"


# -- fuzzing: no query string or path id makes a 500 -------------------------------------------

_PARAMS = ["limit", "marker", "sort_key", "sort_dir", "name", "status", "changes-since",
           "changes-before", "tags", "not-tags-any", "locked", "all_tenants", "ip", "host",
           "deleted", "project_id", "uuid", "_x", "metadata", "flavor", "launch_index"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(st.tuples(st.sampled_from(_PARAMS) | st.text(max_size=5),
                             st.text(max_size=8) | st.sampled_from(["1", "-1", "asc", "2024-01-01"])),
                   max_size=4),
    version=st.integers(1, 104),
    admin=st.booleans(),
    detail=st.booleans(),
)
def test_fuzz_list_query(srv: Server, pairs: list[tuple[str, str]], version: int, admin: bool,
                         detail: bool) -> None:
    qs = urlencode(pairs)
    path = "/servers/detail" if detail else "/servers"
    r = get(srv, f"{path}?{qs}", token=ADMIN_TOKEN if admin else None, version=f"2.{version}")
    assert r.status in (200, 400, 403), (qs, r.status, r.body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ident=st.text(min_size=1, max_size=40), sub=st.sampled_from(
    ["", "/ips", "/ips/private", "/metadata", "/metadata/role", "/tags", "/tags/x"]))
def test_fuzz_server_id(srv: Server, ident: str, sub: str) -> None:
    r = get(srv, f"/servers/{quote(ident, safe='')}{sub}", version="2.26")
    assert r.status in (200, 204, 400, 404), (ident, r.status, r.body)
