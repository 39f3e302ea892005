"""Server metadata and tags writes: Nova's validation, limits, states and error bodies; the
pending overlay (visible at once) and the outbox entry with docs/commands.md's payload; the
budget -- 1 read + 1 write transaction per accepted command, 0 writes when refused before
the write."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.api.views import render_server
from fastpath.store import Batch, Upsert
from fastpath.store.changes import Catalog, CatalogPut
from fastpath.store.samples import sample_record
from tests.unit import command_support
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, TOKEN, Server
from tests.unit.command_support import err
from tests.unit.conftest import Response, request

U = "1f0e5b7a-3c55-4a43-9f0e-6f6b7a3c2d10"
MD = f"/v2.1/servers/{U}/metadata"
TAGS = f"/v2.1/servers/{U}/tags"


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    put_server(s)
    return s


def put_server(s: Server, uuid: str = U, version: int = 1, **fields: Any) -> None:
    rec = sample_record(uuid, version=version, seed=1, **fields)
    s.plan.context.store.apply(Batch([Upsert(uuid, version, rec)]), render_server)


def cmd(s: Server, method: str, target: str, body: Any = None, token: str = TOKEN,
        version: str = "2.26", budget: tuple[int, int] | None = None,
        noop_ok: bool = False) -> Response:
    return command_support.cmd(s, method, target, body, token, version, budget, noop_ok)


def get(s: Server, target: str, token: str = TOKEN, version: str = "2.26") -> Any:
    r = command_support.get(s, target, token, version)
    assert r.status == 200, r.body
    return r.json()


def outbox(s: Server) -> list[dict[str, Any]]:
    store = s.plan.context.store
    with store.read() as r:
        return [msgpack.unpackb(v, raw=False) for _, v in r.txn.cursor(db=r.dbs.outbox)]


def pending(s: Server) -> dict[str, Any]:
    with s.plan.context.store.read() as r:
        rec = r.get_server(U)
    assert rec is not None
    return dict(rec["pending"])


ORIGINAL = {"My Server Name": "Apache1", "role": "web", "owner": "team-a"}


def test_metadata_writes_follow_nova_and_show_at_once(srv: Server) -> None:
    r = cmd(srv, "POST", MD, {"metadata": {"role": "db", "new": "x"}})
    assert r.status == 200
    merged = {**ORIGINAL, "role": "db", "new": "x"}
    assert r.json() == {"metadata": merged}
    assert get(srv, f"/v2.1/servers/{U}")["server"]["metadata"] == merged
    r = cmd(srv, "PUT", MD + "/role", {"meta": {"role": "cache"}})
    assert (r.status, r.json()) == (200, {"meta": {"role": "cache"}})
    r = cmd(srv, "DELETE", MD + "/new")
    assert (r.status, r.body) == (204, b"")
    want = {**ORIGINAL, "role": "cache"}
    assert get(srv, f"/v2.1/servers/{U}")["server"]["metadata"] == want
    r = cmd(srv, "PUT", MD, {"metadata": {"only": "this"}})
    assert (r.status, r.json()) == (200, {"metadata": {"only": "this"}})
    assert get(srv, f"/v2.1/servers/{U}")["server"]["metadata"] == {"only": "this"}
    assert get(srv, MD) == {"metadata": {"only": "this"}}
    assert get(srv, MD + "/only") == {"meta": {"only": "this"}}
    # One pending entry and one outbox entry per command, in order, with the payloads of
    # docs/commands.md.
    entries = outbox(srv)
    assert [e["payload"]["op"] for e in entries] == ["merge", "set", "delete", "replace"]
    first = entries[0]
    assert (first["cell"], first["server"]) == ("cell1", U)
    assert first["payload"] == {"action": "metadata", "op": "merge",
                                "metadata": {"role": "db", "new": "x"}, "project_id": PROJECT,
                                "user_id": "fake", "request_id": first["id"]}
    assert entries[1]["payload"]["key"] == "role" and entries[1]["payload"]["value"] == "cache"
    assert entries[2]["payload"]["key"] == "new"
    assert entries[3]["payload"]["metadata"] == {"only": "this"}
    p = pending(srv)
    assert set(p) == {e["id"] for e in entries}
    assert len({e["id"] for e in entries}) == 4


def test_metadata_validation(srv: Server) -> None:
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", MD, b"{not json", "Malformed request body"),
        ("POST", MD, None, "None is not of type 'object'"),
        ("POST", MD, {}, "'metadata' is a required property"),
        ("POST", MD, {"metadata": {}, "x": 1},
         "Additional properties are not allowed ('x' was unexpected)"),
        ("POST", MD, {"metadata": {"a": 1}},
         "Invalid input for field/attribute a. Value: 1. 1 is not of type 'string'"),
        ("PUT", MD, {"metadata": {"a": "v" * 256}},
         f"Invalid input for field/attribute a. Value: {'v' * 256}. '{'v' * 256}' is too long"),
        ("PUT", MD + "/k", {"meta": {"k": "v", "j": "w"}},
         "Invalid input for field/attribute meta. Value: {'k': 'v', 'j': 'w'}. "
         "{'k': 'v', 'j': 'w'} has too many properties"),
        ("PUT", MD + "/k", {"meta": {"j": "w"}}, "Request body and URI mismatch"),
    ]
    for method, target, body, message in cases:
        got = err(cmd(srv, method, target, body), 400)
        assert got == message, (method, target, body)
    got = err(cmd(srv, "POST", MD, {"metadata": {"bad/key": "v"}}), 400)
    assert got.startswith("Invalid input for field/attribute metadata. Value: {'bad/key': 'v'}.")
    assert outbox(srv) == [] and pending(srv) == {}


def test_metadata_limits_states_and_scope(srv: Server) -> None:
    store = srv.plan.context.store
    store.apply(Batch(catalog=[CatalogPut(Catalog.QUOTA_LIMITS, PROJECT, {"metadata_items": 4})]))
    assert err(cmd(srv, "POST", MD, {"metadata": {"a": "1", "b": "2"}}), 403) == (
        "Maximum number of metadata items exceeds 4")
    assert cmd(srv, "POST", MD, {"metadata": {"a": "1"}}).status == 200  # 4 items: at the limit
    assert cmd(srv, "PUT", MD, {"metadata": {str(i): "v" for i in range(4)}}).status == 200
    assert err(cmd(srv, "PUT", MD + "/x", {"meta": {"x": "v"}}), 403) == (
        "Maximum number of metadata items exceeds 4")
    # Missing key, missing server, another project's server.
    assert err(cmd(srv, "DELETE", MD + "/nope"), 404) == "Metadata item was not found"
    other = "2a0e5b7a-3c55-4a43-9f0e-6f6b7a3c2d10"
    assert err(cmd(srv, "POST", f"/v2.1/servers/{other}/metadata", {"metadata": {}}), 404) == (
        f"Instance {other} could not be found.")
    assert err(cmd(srv, "POST", MD, {"metadata": {"a": "b"}}, token="fake:elsewhere"), 404)
    # A locked server refuses non-admins; an admin goes through.  (The cell's new version
    # does not echo the commands yet: their pending metadata -- 4 items -- still shows.)
    put_server(srv, version=2, locked=True, locked_by="admin")
    assert err(cmd(srv, "POST", MD, {"metadata": {"0": "b"}}), 409) == f"Instance {U} is locked"
    r = cmd(srv, "POST", MD, {"metadata": {"0": "b"}}, token=ADMIN_TOKEN)
    assert r.json() == {"metadata": {"0": "b", "1": "v", "2": "v", "3": "v"}}
    # vm_state and task_state.
    put_server(srv, version=3, vm_state="building", task_state="spawning")
    assert err(cmd(srv, "POST", MD, {"metadata": {"a": "b"}}), 409) == (
        f"Cannot 'update metadata' instance {U} while it is in vm_state building")
    put_server(srv, version=4, vm_state="active", task_state="rebooting")
    assert err(cmd(srv, "DELETE", MD + "/a"), 409) == (
        f"Cannot 'delete metadata' instance {U} while it is in task_state rebooting")


def test_tags_writes(srv: Server) -> None:
    r = cmd(srv, "PUT", TAGS, {"tags": ["b", "a", "b"]})
    assert (r.status, r.json()) == (200, {"tags": ["a", "b"]})
    assert get(srv, TAGS) == {"tags": ["a", "b"]}
    r = cmd(srv, "PUT", TAGS + "/c")
    assert (r.status, r.body) == (201, b"")
    assert r["Location"] == f"http://compute.test:8774/v2.1/servers/{U}/tags/c"
    r = cmd(srv, "PUT", TAGS + "/c", budget=(1, 0))  # already there: 204, nothing written
    assert r.status == 204
    assert get(srv, TAGS) == {"tags": ["a", "b", "c"]}
    assert get(srv, "/v2.1/servers?tags=c")["servers"][0]["id"] == U  # the index follows
    assert cmd(srv, "DELETE", TAGS + "/a").status == 204
    assert err(cmd(srv, "DELETE", TAGS + "/a"), 404) == f"Instance {U} has no tag 'a'"
    assert get(srv, TAGS) == {"tags": ["b", "c"]}
    assert cmd(srv, "DELETE", TAGS).status == 204
    assert get(srv, TAGS) == {"tags": []}
    assert [(e["payload"]["action"], e["payload"]["op"]) for e in outbox(srv)] == [
        ("tags", "replace"), ("tags", "add"), ("tags", "delete"), ("tags", "clear")]
    assert outbox(srv)[0]["payload"]["tags"] == ["a", "b"]
    assert outbox(srv)[1]["payload"]["tag"] == "c"


def test_tags_validation_and_limits(srv: Server) -> None:
    assert err(cmd(srv, "PUT", TAGS, {"tags": ["a"]}, version="2.25"), 404) == (
        "The resource could not be found.")
    assert err(cmd(srv, "PUT", TAGS + "/x", version="2.25"), 404)
    msg = err(cmd(srv, "PUT", TAGS, {"tags": ["a,b"]}), 400)
    assert msg == "Invalid input for field/attribute 0. Value: a,b. 'a,b' does not match '^[^,/]*$'"
    assert err(cmd(srv, "PUT", TAGS, {"tags": [str(i) for i in range(51)]}), 400).startswith(
        "Invalid input for field/attribute tags.")
    assert err(cmd(srv, "PUT", TAGS + "/x", {"a": 1}), 400) == "{'a': 1} is not of type 'null'"
    msg = err(cmd(srv, "PUT", TAGS + "/" + "t" * 61), 400)
    assert msg == (f"Tag '{'t' * 61}' is invalid. It must be a non empty string without "
                   f"characters '/' and ','. Validation error message: '{'t' * 61}' is too long")
    assert cmd(srv, "PUT", TAGS, {"tags": [f"t{i:02d}" for i in range(50)]}).status == 200
    assert err(cmd(srv, "PUT", TAGS + "/one-more"), 400) == (
        "The number of tags exceeded the per-server limit 50")
    # Scope: no server; another project's server (policy on the mapping's project: 403).
    other = "2a0e5b7a-3c55-4a43-9f0e-6f6b7a3c2d10"
    assert err(cmd(srv, "DELETE", f"/v2.1/servers/{other}/tags"), 404) == (
        f"Instance {other} has no mapping to a cell.")
    assert err(cmd(srv, "DELETE", TAGS, token="fake:elsewhere"), 403) == (
        "Policy doesn't allow os_compute_api:os-server-tags:delete_all to be performed.")
    put_server(srv, version=2, vm_state="error")
    assert err(cmd(srv, "PUT", TAGS + "/z"), 409) == (
        f"Cannot 'update tag' instance {U} while it is in vm_state error")


def test_commands_of_one_group_see_each_other(srv: Server) -> None:
    """Two merges sent at once share a group commit: the second sees the first's pending
    metadata (the re-check inside the write transaction), so neither is lost."""
    conns = [srv.connect() for _ in range(2)]
    for c, item in zip(conns, ({"x": "1"}, {"y": "2"}), strict=True):
        body = json.dumps({"metadata": item}).encode()
        c.send(request(MD, f"X-Auth-Token: {TOKEN}", "OpenStack-API-Version: compute 2.26",
                       method="POST", body=body))
    rs = [c.wait(1)[0] for c in conns]
    assert [r.status for r in rs] == [200, 200]
    final = get(srv, f"/v2.1/servers/{U}")["server"]["metadata"]
    assert final == {**ORIGINAL, "x": "1", "y": "2"}
    assert srv.plan.context.committer is not None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from([("POST", MD, "metadata"), ("PUT", MD, "metadata"),
                              ("PUT", MD + "/k", "meta"), ("PUT", TAGS, "tags"),
                              ("PUT", TAGS + "/t", None)]),
       data=st.data())
def test_fuzz_bodies(srv: Server, route: tuple[str, str, str | None], data: Any) -> None:
    """Any JSON body: a Nova answer, never a 500; a refusal writes nothing (cmd checks)."""
    method, target, top = route
    body = data.draw((st.builds(lambda v: {top: v}, _JSON) if top else st.nothing()) | _JSON)
    # The server is shared by the examples: a tag an earlier example added makes a later
    # PUT of it a 204 that writes nothing, as in Nova.
    r = cmd(srv, method, target, body, noop_ok=True)
    assert r.status < 500, (method, target, body, r.body)
