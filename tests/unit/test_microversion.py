"""Microversion negotiation, as Nova does it (nova/api/openstack/wsgi.py with
microversion_parse), through the protocol: request headers in, version headers out."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.conftest import Server, deliveries, request

TOKEN = "X-Auth-Token: u:p"
VARY = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"


def negotiate(server: Server, *headers: str, path: str = "/v2.1/things") -> Any:
    return server.exchange(request(path, TOKEN, *headers)).one()


def assert_version(r: Any, minor: int) -> None:
    assert r["OpenStack-API-Version"] == f"compute 2.{minor}"
    assert r["X-OpenStack-Nova-API-Version"] == f"2.{minor}"
    assert r["Vary"] == VARY


@pytest.mark.parametrize(
    ("headers", "minor"),
    [
        ((), 1),
        (("OpenStack-API-Version: compute 2.50",), 50),
        (("X-OpenStack-Nova-API-Version: 2.20",), 20),
        (("OpenStack-API-Version: compute latest",), 104),
        (("X-OpenStack-Nova-API-Version: latest",), 104),
        (("OpenStack-API-Version: compute 2.1",), 1),
        (("OpenStack-API-Version: compute 2.104",), 104),
        # both headers: the new one wins, either order
        (("OpenStack-API-Version: compute 2.60", "X-OpenStack-Nova-API-Version: 2.2"), 60),
        (("X-OpenStack-Nova-API-Version: 2.2", "OpenStack-API-Version: compute 2.60"), 60),
        # other services listed
        (("OpenStack-API-Version: volume 3.0, compute 2.30",), 30),
        (("OpenStack-API-Version: compute 2.30, volume 3.0",), 30),
        (("OpenStack-API-Version: volume 3.0", "OpenStack-API-Version: compute 2.31"), 31),
        (("OpenStack-API-Version: placement 1.39,identity 3.14,  compute   2.88 ",), 88),
        (("OpenStack-API-Version: COMPUTE 2.40",), 40),
        # the new header without compute: the legacy one, else the default
        (("OpenStack-API-Version: volume 3.0", "X-OpenStack-Nova-API-Version: 2.7"), 7),
        (("OpenStack-API-Version: volume 3.0",), 1),
        (("OpenStack-API-Version: computer 2.9",), 1),
        # microversion_parse: the last compute entry, an entry without version skipped,
        # the last item of the legacy header
        (("OpenStack-API-Version: compute 2.10, compute 2.11",), 11),
        (("OpenStack-API-Version: compute 2.10, compute",), 10),
        (("OpenStack-API-Version: compute", "X-OpenStack-Nova-API-Version: 2.3"), 3),
        (("X-OpenStack-Nova-API-Version: 2.5, 2.6",), 6),
        (("X-OpenStack-Nova-API-Version:  2.8 ",), 8),
        (("openstack-api-version: compute 2.12",), 12),
    ],
)
def test_negotiated_version(server: Server, headers: tuple[str, ...], minor: int) -> None:
    r = negotiate(server, *headers)
    assert r.status == 200
    assert r.json()["version"] == minor
    assert_version(r, minor)


@pytest.mark.parametrize(
    ("header", "text"),
    [
        ("OpenStack-API-Version: compute 2.105", "2.105"),
        ("OpenStack-API-Version: compute 3.0", "3.0"),
        ("OpenStack-API-Version: compute 1.1", "1.1"),
        ("OpenStack-API-Version: compute 2.0", "2.0"),
        ("X-OpenStack-Nova-API-Version: 2.999", "2.999"),
        ("X-OpenStack-Nova-API-Version: 10.1", "10.1"),
        ("OpenStack-API-Version: compute 2.99999999999", "2.99999999999"),
        ("OpenStack-API-Version: compute 99999999999.1", "99999999999.1"),
    ],
)
def test_versions_out_of_range_get_406(server: Server, header: str, text: str) -> None:
    r = negotiate(server, header)
    assert r.status == 406
    assert r.json() == {
        "computeFault": {
            "code": 406,
            "message": f"Version {text} is not supported by the API. "
            "Minimum is 2.1 and maximum is 2.104.",
        }
    }
    assert r.header("OpenStack-API-Version") is None  # no version was negotiated


@pytest.mark.parametrize(
    ("header", "text"),
    [
        ("OpenStack-API-Version: compute 2.x", "2.x"),
        ("OpenStack-API-Version: compute 2", "2"),
        ("OpenStack-API-Version: compute 2.01", "2.01"),
        ("OpenStack-API-Version: compute foo", "foo"),
        ("OpenStack-API-Version: compute 02.1", "02.1"),
        ("OpenStack-API-Version: compute 2.", "2."),
        ("OpenStack-API-Version: compute .1", ".1"),
        ("OpenStack-API-Version: compute 2.1.1", "2.1.1"),
        ("OpenStack-API-Version: compute 2.1 beta", "2.1 beta"),
        ("OpenStack-API-Version: compute -2.1", "-2.1"),
        ("OpenStack-API-Version: compute LATEST", "LATEST"),
        ("X-OpenStack-Nova-API-Version: 2.x", "2.x"),
        ("X-OpenStack-Nova-API-Version: v2.1", "v2.1"),
        ("X-OpenStack-Nova-API-Version: Latest", "Latest"),
        ("X-OpenStack-Nova-API-Version: 2.1,", ""),
    ],
)
def test_malformed_versions_get_400(server: Server, header: str, text: str) -> None:
    r = negotiate(server, header)
    assert r.status == 400
    assert r.json() == {
        "badRequest": {
            "code": 400,
            "message": f"API Version String {text} is of invalid format. "
            "Must be of format MajorNum.MinorNum.",
        }
    }


def test_version_headers_on_every_versioned_response(server: Server) -> None:
    asked = "OpenStack-API-Version: compute 2.42"
    for path in ("/v2.1/", "/v2.1/things", "/v2.1/conflict", "/v2.1/boom"):
        r = negotiate(server, asked, path=path)
        assert_version(r, 42)


def test_unversioned_routes_send_no_version_headers(server: Server) -> None:
    for path in ("/", "/v2/", "/healthz", "/public/x", "/nowhere"):
        r = negotiate(server, "OpenStack-API-Version: compute 2.42", path=path)
        assert r.header("OpenStack-API-Version") is None, path
        assert r.header("X-OpenStack-Nova-API-Version") is None, path
        assert r.header("Vary") is None, path


def test_unversioned_routes_ignore_bad_versions(server: Server) -> None:
    assert negotiate(server, "OpenStack-API-Version: compute 9.9", path="/").status == 200


def test_auth_comes_before_negotiation(server: Server) -> None:
    r = server.exchange(request("/v2.1/things", "OpenStack-API-Version: compute 9.9")).one()
    assert r.status == 401


def test_negotiation_with_fragmented_headers(server: Server) -> None:
    data = request("/v2.1/things", TOKEN, "OpenStack-API-Version: volume 3.0, compute 2.77")
    for how, chunks in deliveries(data):
        r = server.connect().send(*chunks).one()
        assert r.json()["version"] == 77, how
        assert_version(r, 77)


def test_pipelined_requests_negotiate_independently(server: Server) -> None:
    conn = server.exchange(
        request("/v2.1/things", TOKEN, "OpenStack-API-Version: compute 2.5")
        + request("/v2.1/things", TOKEN)
        + request("/v2.1/things", TOKEN, "X-OpenStack-Nova-API-Version: 2.6")
        + request("/v2.1/things", TOKEN, "X-OpenStack-Nova-API-Version: 2.x")
        + request("/v2.1/things", TOKEN, "OpenStack-API-Version: compute latest")
    )
    assert [r.status for r in conn.responses()] == [200, 200, 200, 400, 200]
    assert [r.header("X-OpenStack-Nova-API-Version") for r in conn.responses()] == [
        "2.5", "2.1", "2.6", None, "2.104",
    ]


def test_core_range_matches_the_version_documents(core: Any) -> None:
    from fastpath.api import versions

    assert (core.MIN_VERSION, core.MAX_VERSION) == (1, 104)
    assert versions.MIN_VERSION == f"2.{core.MIN_VERSION}"
    assert versions.MAX_VERSION == f"2.{core.MAX_VERSION}"
