"""The compiled route tree and noauth2 authentication, through the protocol.

The Worker here carries test routes under /v2.1 (conftest.TEST_ROUTES) whose handler echoes
what the core decided: route, captures, identity, microversion.
"""

from __future__ import annotations

from typing import Any

import pytest

from fastpath.api.routes import RouteSpec
from tests.unit.conftest import Server, request

TOKEN = "X-Auth-Token: alice:proj1"


def get(server: Server, target: str, *headers: str, method: str = "GET") -> Any:
    conn = server.exchange(request(target, *headers, method=method))
    if method == "HEAD":
        conn.heads.add(0)
    return conn.one()


# --------------------------------------------------------------------------------------
# Matching


def test_literal_beats_capture(server: Server) -> None:
    r = get(server, "/v2.1/things/detail", TOKEN)
    assert r.json()["route"] == "GET /v2.1/things/detail"
    assert r.json()["params"] == []
    r = get(server, "/v2.1/things/details", TOKEN)
    assert r.json()["route"] == "GET /v2.1/things/{thing_id}"
    assert r.json()["params"] == ["details"]


def test_nested_captures(server: Server) -> None:
    r = get(server, "/v2.1/things/t1/parts/p2", TOKEN)
    assert r.json()["route"] == "GET /v2.1/things/{thing_id}/parts/{part_id}"
    assert r.json()["params"] == ["t1", "p2"]


@pytest.mark.parametrize(
    ("segment", "decoded"),
    [
        ("a%20b", "a b"),
        ("a%2Fb", "a/b"),  # decoded after splitting: one segment
        ("%E2%82%AC", "€"),
        ("100%25", "100%"),
        ("plain", "plain"),
        ("a+b", "a+b"),  # '+' is not a space in a path
    ],
)
def test_captures_are_percent_decoded(server: Server, segment: str, decoded: str) -> None:
    r = get(server, f"/v2.1/things/{segment}", TOKEN)
    assert r.json()["params"] == [decoded]


def test_trailing_slash_is_optional(server: Server) -> None:
    for target in ("/v2.1/things", "/v2.1/things/", "/v2.1/things/x/", "/public/n/"):
        assert get(server, target, TOKEN).status == 200, target
    for target in ("/v2.1", "/v2.1/", "/v2", "/v2/"):
        assert get(server, target).status == 200, target


def test_query_strings_are_split_off(server: Server) -> None:
    r = get(server, "/v2.1/things/x?limit=1&marker=a/b", TOKEN)
    assert r.json()["params"] == ["x"] and r.json()["query"] == "limit=1&marker=a/b"
    r = get(server, "/public/x?", TOKEN)
    assert r.json()["params"] == ["x"] and r.json()["query"] == ""
    r = get(server, "/?x", TOKEN)
    assert r.status == 200 and "versions" in r.json()


@pytest.mark.parametrize(
    "target", ["/nowhere", "/v2.1x/", "/public", "/public/a/b", "//", "/public//", "/v2//",
               "/healthz/x", "/V2.1/"]
)
def test_unknown_paths_get_404_item_not_found(server: Server, target: str) -> None:
    r = get(server, target, TOKEN)
    assert r.status == 404
    assert r.json() == {"itemNotFound": {"code": 404, "message": "The resource could not be found."}}


def test_404_under_the_api_root_with_a_token(server: Server) -> None:
    for target in ("/v2.1/nothing", "/v2.1/things/x/nothing", "/v2.1/things/x/parts"):
        r = get(server, target, TOKEN)
        assert r.status == 404, target
        assert r.json()["itemNotFound"]["code"] == 404


def test_405_with_allow_and_bad_method(server: Server) -> None:
    r = get(server, "/v2.1/things/x", TOKEN, method="PUT")
    assert r.status == 405
    assert r["Allow"] == "DELETE, GET, HEAD"
    assert r.json() == {
        "badMethod": {"code": 405, "message": "The method is not allowed for this resource."}
    }
    r = get(server, "/v2.1/things", TOKEN, method="DELETE")
    assert r.status == 405 and r["Allow"] == "GET, HEAD, POST"
    r = get(server, "/", method="POST")
    assert r.status == 405 and r["Allow"] == "GET, HEAD"


def test_unknown_methods_get_405(server: Server) -> None:
    for method in ("PROPFIND", "PATCH", "OPTIONS"):
        r = get(server, "/v2/", method=method)
        assert r.status == 405, method
        assert r["Allow"] == "GET, HEAD"


def test_head_falls_back_to_get(server: Server) -> None:
    r = get(server, "/v2.1/things/x", TOKEN, method="HEAD")
    assert r.status == 200 and r.body == b""
    counters = server.worker.counters()
    assert counters[(server.index["GET /v2.1/things/{thing_id}"], 200)] == 1


def test_each_method_reaches_its_route(server: Server) -> None:
    r = get(server, "/v2.1/things/x", TOKEN, method="DELETE")
    assert r.json()["route"] == "DELETE /v2.1/things/{thing_id}" and r.json()["method"] == "DELETE"
    r = get(server, "/v2.1/things", TOKEN, method="POST")
    assert r.status == 201


# --------------------------------------------------------------------------------------
# Legacy /v2.1/{project_id}/... form


def test_legacy_project_id_form(server: Server) -> None:
    r = get(server, "/v2.1/proj1/things/x", TOKEN)
    assert r.status == 200
    body = r.json()
    assert body["route"] == "GET /v2.1/things/{thing_id}"
    assert body["params"] == ["x"] and body["url_project"] == "proj1"
    r = get(server, "/v2.1/proj1/things/detail", TOKEN)
    assert r.json()["route"] == "GET /v2.1/things/detail"
    assert get(server, "/v2.1/things/x", TOKEN).json()["url_project"] is None


def test_legacy_project_id_must_match_the_token(server: Server) -> None:
    r = get(server, "/v2.1/other/things/x", TOKEN)
    assert r.status == 400
    assert r.json() == {
        "badRequest": {
            "code": 400,
            "message": "Malformed request URL: URL's project_id 'other' doesn't match "
            "Context's project_id 'proj1'",
        }
    }


def test_legacy_project_id_needs_a_token(server: Server) -> None:
    assert get(server, "/v2.1/proj1/things/x").status == 401


def test_legacy_form_takes_one_project_segment_only(server: Server) -> None:
    assert get(server, "/v2.1/proj1/proj1/things", TOKEN).status == 404


# --------------------------------------------------------------------------------------
# Authentication (noauth2)


def test_missing_token_under_the_api_root_is_401(server: Server) -> None:
    for target in ("/v2.1/things", "/v2.1/things/x", "/v2.1/nothing", "/v2.1/a/b/c"):
        r = get(server, target)
        assert r.status == 401, target
        assert r.json() == {
            "unauthorized": {
                "code": 401,
                "message": "The request you have made requires authentication.",
            }
        }


def test_public_routes_need_no_token(server: Server) -> None:
    for target in ("/", "/v2/", "/v2.1/", "/healthz", "/public/x"):
        assert get(server, target).status == 200, target
    r = get(server, "/public/x")
    assert r.json()["user"] is None and r.json()["project"] is None


@pytest.mark.parametrize(
    ("token", "user", "project", "admin"),
    [
        ("alice:proj1", "alice", "proj1", False),
        ("admin:proj2", "admin", "proj2", True),
        ("notused", "notused", "default", False),
        ("admin", "admin", "default", True),
        ("bob:p:q", "bob", "p:q", False),
        ("Admin:p", "Admin", "p", False),
    ],
)
def test_noauth2_tokens(server: Server, token: str, user: str, project: str, admin: bool) -> None:
    body = get(server, "/v2.1/things", f"X-Auth-Token: {token}").json()
    assert (body["user"], body["project"], body["is_admin"]) == (user, project, admin)


@pytest.mark.parametrize("token", [":x", "x:", ":", ""])
def test_malformed_tokens_are_401(server: Server, token: str) -> None:
    r = get(server, "/v2.1/things", f"X-Auth-Token: {token}")
    assert r.status == 401
    assert r.json()["unauthorized"]["code"] == 401


def test_auth_settings(make_server: Any) -> None:
    server = make_server(auth__default_project="sandbox", auth__admin_user="root")
    body = get(server, "/v2.1/things", "X-Auth-Token: notused").json()
    assert body["project"] == "sandbox"
    assert get(server, "/v2.1/things", "X-Auth-Token: root:p").json()["is_admin"] is True
    assert get(server, "/v2.1/things", "X-Auth-Token: admin:p").json()["is_admin"] is False


def test_token_header_name_is_case_insensitive(server: Server) -> None:
    assert get(server, "/v2.1/things", "x-auth-token: a:b").json()["user"] == "a"
    assert get(server, "/v2.1/things", "X-AUTH-TOKEN: a:b").json()["project"] == "b"


def test_plan_authenticator_replaces_noauth2(make_server: Any) -> None:
    server = make_server()
    seen: list[bytes] = []

    def authenticator(token: bytes) -> tuple[str, str, bool] | None:
        seen.append(token)
        return ("carol", "pc", True) if token == b"good" else None

    server.plan.authenticator = authenticator
    server.worker.__init__(server.plan, server.shm.buf, server.shm.slot_offset(0), server.loop)
    assert get(server, "/v2.1/things", "X-Auth-Token: bad").status == 401
    body = get(server, "/v2.1/things", "X-Auth-Token: good").json()
    assert (body["user"], body["project"], body["is_admin"]) == ("carol", "pc", True)
    assert seen == [b"bad", b"good"]


# --------------------------------------------------------------------------------------
# Building the tree


def test_route_indexes_follow_the_plan(server: Server) -> None:
    routes = server.worker.routes
    assert [r.index for r in routes] == list(range(1, len(routes) + 1))
    assert [r.name for r in routes] == [f"{s.method} {s.template}" for s in server.plan.routes]
    first = routes[0]
    assert (first.name, first.auth, first.versioned) == ("GET /", False, False)


def _rebuild(server: Server, routes: list[RouteSpec]) -> None:
    server.plan.routes = routes
    server.worker.__init__(server.plan, server.shm.buf, server.shm.slot_offset(0), server.loop)


def test_duplicate_routes_are_refused(server: Server) -> None:
    routes = [*server.plan.routes, RouteSpec("GET", "/public/{other}", lambda r: (200, b"{}"))]
    with pytest.raises(ValueError, match="duplicate route GET /public/{other}"):
        _rebuild(server, routes)


def test_unknown_core_handler_is_refused(server: Server) -> None:
    with pytest.raises(ValueError, match="unknown core handler"):
        _rebuild(server, [*server.plan.routes, RouteSpec("GET", "/x", "core:nope")])


def test_unknown_method_is_refused(server: Server) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        _rebuild(server, [*server.plan.routes, RouteSpec("BREW", "/x", lambda r: (200, b""))])


def test_api_root_must_exist(server: Server) -> None:
    server.plan.api_roots = ["/v3"]
    with pytest.raises(ValueError, match="no route below /v3"):
        _rebuild(server, server.plan.routes)



def test_a_literal_dead_end_falls_back_to_the_capture(server: Server) -> None:
    """/servers/detail/ips is the ips of a server whose id is "detail" (Nova's routes
    match it so, and the server is then not found), not a path without a route."""
    store = server.plan.context.store
    reads = store.read_txns
    r = server.exchange(request("/v2.1/servers/detail/ips", "X-Auth-Token: a:b")).one()
    assert r.status == 404
    assert r.json()["itemNotFound"]["message"] == "Instance detail could not be found."
    assert store.read_txns == reads + 1  # the ips handler ran
    # the literal still wins where it leads somewhere
    r = server.exchange(request("/v2.1/servers/detail", "X-Auth-Token: a:b")).one()
    assert r.status == 200 and r.json() == {"servers": []}
    # and a dead end with no capture to fall back to stays a plain 404
    r = server.exchange(request("/v2.1/flavors/detail/nothing", "X-Auth-Token: a:b")).one()
    assert r.status == 404


def test_tokens_with_characters_unsafe_in_urls_or_json_are_refused(server: Server) -> None:
    for token in ('u:b"c', "u:b\\c", "u:a/b", "u:a%22", "us er:p", "u:caf\xc3\xa9"):
        raw = request("/v2.1/servers", "X-Auth-Token: " + token)
        r = server.exchange(raw).one()
        assert r.status == 401, token
    r = server.exchange(request("/v2.1/servers", "X-Auth-Token: user-1.a_b:proj-9")).one()
    assert r.status == 200
