"""Every catalogue route: the one-read-transaction budget on success and on every kind of
error answer, and no 500 whatever the query string or path id (Hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.api import catalog
from fastpath.store.changes import Catalog
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, USER, Server, call, seed

FILLED = {
    "{flavor_id}": "1", "{key}": "k", "{keypair_name}": "kp", "{project_id}": PROJECT,
    "{image_id}": "img",
}


def _seeded(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    seed(s, Catalog.FLAVORS, {"1": {"id": "1", "name": "f", "vcpus": 1, "ram": 1, "disk": 1,
                                    "extra_specs": {"k": "v"}}})
    seed(s, Catalog.KEYPAIRS, {(u, "kp"): {"name": "kp", "user_id": u, "public_key": "p",
                                           "fingerprint": "f"} for u in (USER, "admin")})
    seed(s, Catalog.IMAGES, {"img": {"id": "img", "name": "i", "status": "active"}})
    seed(s, Catalog.AZS, {"nova": {"name": "nova"}})
    return s


def _paths(ctx: Any) -> list[str]:
    out = []
    for spec in catalog.routes(ctx):
        path = spec.template
        for k, v in FILLED.items():
            path = path.replace(k, v)
        out.append(path)
    return out


def test_every_route_one_read(make_server: Any) -> None:
    s = _seeded(make_server)
    paths = _paths(s.plan.context)
    assert len(paths) == 16
    for path in paths:
        # call() asserts exactly one read transaction and no write, whatever the answer.
        ok = call(s, path, ADMIN_TOKEN, "2.35")
        assert ok.status == 200, (path, ok.body)
        assert call(s, path + "?foo=1&limit=-1", version="2.102").status in (400, 403, 404)
        assert call(s, path.replace("/1", "/nope").replace("/kp", "/nope"), version="2.1").status < 500
        assert call(s, path, f"other:{PROJECT}x", "latest").status in (200, 403, 404)


_query_text = st.text(alphabet=st.sampled_from("ab=&%+-_.:/0123456789Zz é~"), max_size=24)
_names = st.sampled_from(["limit", "marker", "sort_key", "sort_dir", "minRam", "minDisk",
                          "is_public", "name", "user_id", "tenant_id", "changes-since",
                          "status", "server", "type", "property-x", "page_size", "offset"])


def test_fuzz_no_500(make_server: Any) -> None:
    s = _seeded(make_server)
    paths = _paths(s.plan.context)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), pairs=st.lists(st.tuples(_names, _query_text), max_size=4),
           junk=_query_text,
           version=st.sampled_from(["2.1", "2.35", "2.36", "2.75", "2.102", "latest"]),
           token=st.sampled_from([ADMIN_TOKEN, f"{USER}:{PROJECT}"]))
    def one(path: str, pairs: list[tuple[str, str]], junk: str, version: str, token: str) -> None:
        qs = "&".join(f"{k}={v}" for k, v in pairs) + ("&" + junk if junk else "")
        qs = qs.replace(" ", "%20").replace("é", "%C3%A9")
        r = call(s, f"{path}?{qs}", token, version)
        assert r.status < 500, (path, qs, r.body)

    one()
