"""GET /images, /images/detail, /images/{id} (proxy API, up to 2.35) against Nova's
samples; filters, paging, visibility, the 2.36 cut-off; one read transaction each."""

from __future__ import annotations

from typing import Any

import pytest

from fastpath.store.changes import Catalog
from tests.unit.catalog_support import ADMIN_TOKEN, BASE, PROJECT, Server, call, fault, sample, seed

P = f"/v2.1/{PROJECT}"
T2011 = 1293843723000000  # 2011-01-01T01:02:03Z
GLANCE = "http://compute.test:9292"
SIZES: dict[str, int] = {}


def _ours(doc: Any) -> Any:
    """A sample with its alternate links pointing where ours do."""
    for img in doc.get("images", [doc.get("image")]):
        for link in img["links"]:
            if link["rel"] == "alternate":
                link["href"] = link["href"].replace("http://glance.openstack.example.com", GLANCE)
    return doc


def _entries() -> dict[str, dict[str, Any]]:
    out = {}
    for img in sample("images/images-details-get-resp.json")["images"]:
        out[img["id"]] = {"id": img["id"], "name": img["name"], "status": "active",
                          "size": img["OS-EXT-IMG-SIZE:size"], "min_ram": 0, "min_disk": 0,
                          "created_at": T2011, "updated_at": T2011, "properties": img["metadata"]}
    for img in sample("images/images-list-get-resp.json")["images"]:  # an older set
        out.setdefault(img["id"], {"id": img["id"], "name": img["name"], "status": "active",
                                   "created_at": T2011, "updated_at": T2011})
    return out


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    seed(s, Catalog.IMAGES, _entries())
    return s


def _by_id(body: dict[str, Any]) -> dict[str, Any]:
    return {i["id"]: i for i in body["images"]}


@pytest.mark.parametrize("version", ["2.1", "2.35"])
def test_samples(srv: Server, version: str) -> None:
    for name, path in (("images-list-get-resp.json", "/images"),
                       ("images-details-get-resp.json", "/images/detail")):
        want = _ours(sample(f"images/{name}"))
        got = call(srv, P + path, version=version).json()
        assert list(got) == ["images"] and len(got["images"]) == len(_entries())
        mine = _by_id(got)
        for img in want["images"]:  # the older list sample holds fewer images
            assert mine[img["id"]] == img, name
    want = _ours(sample("images/image-get-resp.json"))
    r = call(srv, f"{P}/images/{want['image']['id']}", version=version)
    assert r.status == 200 and r.json() == want


def test_gone_from_236(srv: Server) -> None:
    iid = next(iter(_entries()))
    for path in ("/images", "/images/detail", f"/images/{iid}", "/images/nope"):
        assert fault(call(srv, "/v2.1" + path, version="2.36"), 404) == "The resource could not be found."


def test_order_paging_filters(srv: Server) -> None:
    seed(srv, Catalog.IMAGES, {
        "new1": {"id": "new1", "name": "snap", "status": "queued", "created_at": T2011 + 2,
                 "updated_at": T2011 + 10_000_000, "min_ram": 512, "min_disk": 10,
                 "properties": {"instance_uuid": "abc", "image_type": "snapshot"}},
        "priv": {"id": "priv", "name": "mine", "status": "active", "created_at": T2011 + 1,
                 "updated_at": T2011, "visibility": "private", "owner": "other"},
    })

    def ids(q: str, token: str | None = None) -> list[str]:
        kw = {"token": token} if token else {}
        r = call(srv, "/v2.1/images" + q, **kw)
        assert r.status == 200, r.body
        return [i["id"] for i in r.json()["images"]]

    every = sorted(_entries(), reverse=True)
    assert ids("") == ["new1", *every]
    assert ids("", ADMIN_TOKEN) == ["new1", "priv", *every]
    assert ids("", "x:other") == ["new1", "priv", *every]
    assert ids("?name=snap") == ids("?status=QUEUED") == ids("?type=snapshot") == ["new1"]
    assert ids("?server=http://x/servers/abc") == ids("?minRam=100") == ids("?minDisk=5") == ["new1"]
    assert ids("?changes-since=2011-01-01T01:02:05Z") == ["new1"]
    nokernel = [i for i, e in _entries().items()
                if (e.get("properties") or {}).get("kernel_id") == "nokernel"]
    assert len(nokernel) == 6
    assert ids("?property-kernel_id=nokernel") == sorted(nokernel, reverse=True)
    body = call(srv, "/v2.1/images/detail?limit=2").json()
    assert [i["id"] for i in body["images"]] == ["new1", every[0]]
    assert body["images_links"] == [{
        "href": f"{BASE}/v2.1/images/detail?limit=2&marker={every[0]}", "rel": "next"}]
    assert ids(f"?marker={every[0]}&limit=1") == [every[1]]
    new1 = call(srv, "/v2.1/images/new1").json()["image"]
    assert (new1["status"], new1["progress"], new1["minRam"]) == ("SAVING", 25, 512)
    assert new1["server"] == {"id": "abc", "links": [
        {"href": f"{BASE}/v2.1/servers/abc", "rel": "self"},
        {"href": f"{BASE}/servers/abc", "rel": "bookmark"}]}
    assert "OS-DCF:diskConfig" not in new1
    assert fault(call(srv, "/v2.1/images/priv"), 404) == "Image not found."
    assert call(srv, "/v2.1/images/priv", "x:other").status == 200
    assert fault(call(srv, "/v2.1/images/nope"), 404) == "Image not found."
    msg = fault(call(srv, "/v2.1/images?limit=0"), 400)
    assert msg == "Invalid input for query parameters limit. Value: 0. 0 is less than the minimum of 1"
    fault(call(srv, "/v2.1/images?marker=nope"), 400)
    fault(call(srv, "/v2.1/images?changes-since=yesterday"), 400)
    fault(call(srv, "/v2.1/images?minRam=x"), 400)
