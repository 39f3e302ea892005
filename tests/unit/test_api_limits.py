"""GET /limits and GET /os-quota-sets/{project_id}[/detail|/defaults] against Nova's
samples per microversion; stored limits and usage; policy; one read transaction each."""

from __future__ import annotations

from typing import Any

import pytest

from fastpath.store import Batch, Upsert
from fastpath.store.changes import Catalog
from fastpath.store.samples import sample_record
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, Server, call, fault, sample, seed


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    return s


@pytest.mark.parametrize("folder,versions", [
    ("limits", ["2.1", "2.35"]), ("limits/v2.36", ["2.36", "2.38"]),
    ("limits/v2.39", ["2.39", "2.56"]), ("limits/v2.57", ["2.57", "latest"]),
])
def test_limits_samples(srv: Server, folder: str, versions: list[str]) -> None:
    want = sample(f"{folder}/limit-get-resp.json")
    for v in versions:
        r = call(srv, "/v2.1/limits", version=v)
        assert r.status == 200 and r.json() == want, v


def _put_servers(srv: Server, n: int, project: str = PROJECT) -> None:
    store = srv.plan.context.store
    store.apply(Batch([Upsert(rec["uuid"], 1, rec) for rec in
                       (sample_record(project_id=project, seed=i, version=1) for i in range(n))]))


def test_limits_stored(srv: Server) -> None:
    seed(srv, Catalog.QUOTA_LIMITS, {"": {"instances": 50, "cores": 100}, PROJECT: {"cores": 7}})
    _put_servers(srv, 3)
    a = call(srv, "/v2.1/limits").json()["limits"]["absolute"]
    assert (a["maxTotalInstances"], a["maxTotalCores"], a["maxTotalRAMSize"]) == (50, 7, 51200)
    assert (a["totalInstancesUsed"], a["totalCoresUsed"], a["totalRAMUsed"]) == (3, 3, 3 * 2048)
    # An admin reads another project's; anyone else is refused, even for their own.
    a = call(srv, "/v2.1/limits?tenant_id=other", ADMIN_TOKEN).json()["limits"]["absolute"]
    assert (a["maxTotalInstances"], a["maxTotalCores"], a["totalInstancesUsed"]) == (50, 100, 0)
    msg = fault(call(srv, f"/v2.1/limits?tenant_id={PROJECT}"), 403)
    assert msg == "Policy doesn't allow os_compute_api:limits:other_project to be performed."
    assert call(srv, "/v2.1/limits?foo=1", version="2.74").status == 200
    msg = fault(call(srv, "/v2.1/limits?foo=1", version="2.75"), 400)
    assert msg == "Additional properties are not allowed ('foo' was unexpected)"


@pytest.mark.parametrize("folder,versions", [
    ("os-quota-sets", ["2.1", "2.35"]), ("os-quota-sets/v2.36", ["2.36", "2.56"]),
    ("os-quota-sets/v2.57", ["2.57", "latest"]),
])
def test_quota_samples(srv: Server, folder: str, versions: list[str]) -> None:
    for v in versions:
        for name, suffix in (("quotas-show-get-resp.json", ""),
                             ("quotas-show-detail-get-resp.json", "/detail"),
                             ("quotas-show-defaults-get-resp.json", "/defaults")):
            want = sample(f"{folder}/{name}")
            r = call(srv, f"/v2.1/os-quota-sets/fake_tenant{suffix}", ADMIN_TOKEN, v)
            assert r.status == 200 and r.json() == want, (v, name)


def test_quota_stored_and_policy(srv: Server) -> None:
    seed(srv, Catalog.QUOTA_LIMITS, {"": {"instances": 50}, PROJECT: {"cores": 7}})
    _put_servers(srv, 2)
    qs = call(srv, f"/v2.1/os-quota-sets/{PROJECT}").json()["quota_set"]
    assert (qs["id"], qs["instances"], qs["cores"], qs["ram"]) == (PROJECT, 50, 7, 51200)
    d = call(srv, f"/v2.1/os-quota-sets/{PROJECT}/detail").json()["quota_set"]
    assert d["instances"] == {"in_use": 2, "limit": 50, "reserved": 0}
    assert d["cores"] == {"in_use": 2, "limit": 7, "reserved": 0}
    assert d["key_pairs"] == {"in_use": 0, "limit": 100, "reserved": 0}
    dd = call(srv, f"/v2.1/os-quota-sets/{PROJECT}/defaults").json()["quota_set"]
    assert (dd["instances"], dd["cores"]) == (50, 20)
    # Another project: admins only (defaults: anyone).
    for suffix, action in (("", "show"), ("/detail", "detail")):
        msg = fault(call(srv, f"/v2.1/os-quota-sets/other{suffix}"), 403)
        assert msg == f"Policy doesn't allow os_compute_api:os-quota-sets:{action} to be performed."
        assert call(srv, f"/v2.1/os-quota-sets/other{suffix}", ADMIN_TOKEN).status == 200
    assert call(srv, "/v2.1/os-quota-sets/other/defaults").status == 200
    assert call(srv, f"/v2.1/os-quota-sets/{PROJECT}?user_id=u1", version="2.75").status == 200
    fault(call(srv, f"/v2.1/os-quota-sets/{PROJECT}?foo=1", version="2.75"), 400)
    assert call(srv, f"/v2.1/os-quota-sets/{PROJECT}/defaults?foo=1", version="2.101").status == 200
    fault(call(srv, f"/v2.1/os-quota-sets/{PROJECT}/defaults?foo=1", version="2.102"), 400)
