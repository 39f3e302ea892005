"""GET /os-keypairs and /os-keypairs/{name} against Nova's samples (2.1, 2.2, 2.10, 2.35);
per-user scope, admin user_id, paging, errors; one read transaction per request."""

from __future__ import annotations

from typing import Any

import pytest

from fastpath.store.changes import Catalog
from tests.unit.catalog_support import (
    ADMIN_TOKEN,
    BASE,
    PROJECT,
    USER,
    Server,
    call,
    fault,
    sample,
    seed,
)

CREATED = 1399464373681238  # 2014-05-07T12:06:13.681238


def _entry(kp: dict[str, Any], user: str = USER, **extra: Any) -> dict[str, Any]:
    return {"name": kp["name"], "user_id": user, "public_key": kp["public_key"],
            "fingerprint": kp["fingerprint"], "type": "ssh", "id": 1, "created_at": CREATED,
            "updated_at": None, **extra}


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    return s


@pytest.mark.parametrize("folder,versions", [
    ("os-keypairs", ["2.1"]), ("os-keypairs/v2.2", ["2.2", "2.9"]),
    ("os-keypairs/v2.10", ["2.10", "2.34"]),
])
def test_samples(srv: Server, folder: str, versions: list[str]) -> None:
    got = sample(f"{folder}/keypairs-get-resp.json")["keypair"]
    listed = sample(f"{folder}/keypairs-list-resp.json")
    seed(srv, Catalog.KEYPAIRS, {(USER, got["name"]): _entry(got)})
    for v in versions:
        r = call(srv, f"/v2.1/os-keypairs/{got['name']}", version=v)
        assert r.status == 200 and r.json() == {"keypair": got}, v
    seed(srv, Catalog.KEYPAIRS, {(USER, got["name"]): None})
    kp = listed["keypairs"][0]["keypair"]
    seed(srv, Catalog.KEYPAIRS, {(USER, kp["name"]): _entry(kp)})
    for v in versions:
        r = call(srv, "/v2.1/os-keypairs", version=v)
        assert r.status == 200 and r.json() == listed, v


def test_samples_v235(srv: Server) -> None:
    want = sample("os-keypairs/v2.35/keypairs-list-resp.json")
    kp = want["keypairs"][0]["keypair"]
    entries = {(u, n): _entry(kp, u, name=n) for u in (USER, "user1", "user2")
               for n in ("a-first", kp["name"], "z-last")}
    seed(srv, Catalog.KEYPAIRS, entries)
    r = call(srv, f"/v2.1/{PROJECT}/os-keypairs?marker=a-first&limit=1", version="2.35")
    assert r.json() == want
    r = call(srv, f"/v2.1/{PROJECT}/os-keypairs?user_id=user2&marker=a-first&limit=1", ADMIN_TOKEN,
             "2.35")
    assert r.json() == sample("os-keypairs/v2.35/keypairs-list-user2-resp.json")
    # Without a limit (and fewer than max_limit keypairs) no next link.
    r = call(srv, f"/v2.1/{PROJECT}/os-keypairs?user_id=user1&marker=a-first", ADMIN_TOKEN, "2.35")
    body = r.json()
    assert [k["keypair"]["name"] for k in body["keypairs"]] == [kp["name"], "z-last"]
    assert "keypairs_links" not in body


def test_scope_paging_errors(srv: Server) -> None:
    kp = {"public_key": "ssh-rsa AAAA x", "fingerprint": "aa:bb"}
    seed(srv, Catalog.KEYPAIRS, {
        **{(USER, f"k{i}"): _entry({"name": f"k{i}", **kp}) for i in range(5)},
        ("other", "theirs"): _entry({"name": "theirs", **kp}, "other"),
    })

    def names(target: str, token: str | None = None, version: str = "latest") -> list[str]:
        r = call(srv, target, token or f"{USER}:{PROJECT}", version)
        assert r.status == 200, r.body
        return [k["keypair"]["name"] for k in r.json()["keypairs"]]

    assert names("/v2.1/os-keypairs") == ["k0", "k1", "k2", "k3", "k4"]
    assert names("/v2.1/os-keypairs", "other:p") == ["theirs"]
    assert names("/v2.1/os-keypairs?user_id=other", ADMIN_TOKEN) == ["theirs"]
    assert names("/v2.1/os-keypairs", ADMIN_TOKEN) == []  # the admin's own keypairs
    # Before 2.35 no paging: limit and marker are ignored (and user_id before 2.10).
    assert names("/v2.1/os-keypairs?limit=1&marker=k3", version="2.34") == ["k0", "k1", "k2", "k3", "k4"]
    assert names("/v2.1/os-keypairs?user_id=other", ADMIN_TOKEN, "2.9") == []
    r = call(srv, "/v2.1/os-keypairs?limit=2&marker=k0", version="2.35").json()
    assert [k["keypair"]["name"] for k in r["keypairs"]] == ["k1", "k2"]
    assert r["keypairs_links"] == [{"href": f"{BASE}/v2.1/os-keypairs?limit=2&marker=k2", "rel": "next"}]
    msg = fault(call(srv, "/v2.1/os-keypairs?marker=nope", version="2.35"), 400)
    assert msg == "Marker nope could not be found."
    msg = fault(call(srv, "/v2.1/os-keypairs?user_id=other", version="2.10"), 403)
    assert msg == "Policy doesn't allow os_compute_api:os-keypairs:index to be performed."
    msg = fault(call(srv, "/v2.1/os-keypairs/theirs?user_id=other", version="2.10"), 403)
    assert msg == "Policy doesn't allow os_compute_api:os-keypairs:show to be performed."
    assert call(srv, "/v2.1/os-keypairs/theirs?user_id=other", ADMIN_TOKEN, "2.10").status == 200
    msg = fault(call(srv, "/v2.1/os-keypairs/theirs"), 404)
    assert msg == f"Keypair theirs not found for user {USER}"
    fault(call(srv, "/v2.1/os-keypairs?foo=1", version="2.75"), 400)
    assert call(srv, "/v2.1/os-keypairs?foo=1", version="2.74").status == 200
    fault(call(srv, "/v2.1/os-keypairs/k1?foo=1", version="2.75"), 400)
    fault(call(srv, "/v2.1/os-keypairs?limit=x", version="2.35"), 400)
