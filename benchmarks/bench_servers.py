"""The read API in process: one request from ``data_received`` to ``transport.write``.

The session's Worker store is seeded once with SEED_SERVERS sample servers of one project
and six flavors (``_harness.seed_batches``, the data of ``load.py``'s read scenarios),
rendered with ``views.render_server`` as cellsync renders them.  One timed call is the
whole request: httptools parse, routing, token, microversion, the handler (one read
transaction: index walk, view gets, assembly of the JSON), the response head and one
``transport.write``.  Every benchmark checks its answer once before timing.

Where the time of ``GET /servers/detail?limit=100`` goes, stage by stage:
``python benchmarks/breakdown_servers.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from _harness import SEED_PROJECT, newest_of_project, request, seed_batches, seed_uuid, status_of

SEED_SERVERS = 1000
MV = b"OpenStack-API-Version: compute 2.104"
TOKEN = b"X-Auth-Token: fake:" + SEED_PROJECT.encode()
SHOW_ID = seed_uuid(newest_of_project(SEED_SERVERS, 1))


def read_request(path: str) -> bytes:
    return request(path.encode(), TOKEN, MV)


SHOW = read_request(f"/v2.1/servers/{SHOW_ID}")
DETAIL = read_request("/v2.1/servers/detail?limit=100")
LIST = read_request("/v2.1/servers?limit=100")
FLAVORS = read_request("/v2.1/flavors/detail")


@pytest.fixture(scope="module")
def seeded(harness: Any) -> Any:
    from fastpath.api import views

    store = harness.plan.context.store
    with store.read() as r:
        present = r.head(SHOW_ID) is not None
    if not present:
        for batch in seed_batches(SEED_SERVERS, 1):
            store.apply(batch, render=views.render_server)
    return harness


def _body(response: bytes) -> Any:
    return json.loads(response[response.index(b"\r\n\r\n") + 4 :])


def _run(benchmark: Any, seeded: Any, data: bytes) -> Any:
    proto, transport = seeded.connect()
    try:
        proto.data_received(data)
        response = transport.out[-1]
        assert status_of(response) == 200, response[:300]
        benchmark.group = "read API: whole request"
        benchmark.extra_info["response_bytes"] = len(response)
        benchmark(proto.data_received, data)
        assert status_of(transport.out[-1]) == 200
        return _body(response)
    finally:
        seeded.disconnect_all()


def bench_server_show(benchmark, seeded):
    """GET /v2.1/servers/{id} at 2.104, the owner's token (~2.1 KB body)."""
    body = _run(benchmark, seeded, SHOW)
    assert body["server"]["id"] == SHOW_ID


def bench_servers_detail_100(benchmark, seeded):
    """GET /v2.1/servers/detail?limit=100 at 2.104 (~204 KB body)."""
    body = _run(benchmark, seeded, DETAIL)
    assert len(body["servers"]) == 100 and body["servers"][0]["id"] == SHOW_ID
    assert body["servers_links"][0]["rel"] == "next"


def bench_servers_list_100(benchmark, seeded):
    """GET /v2.1/servers?limit=100 at 2.104 (~28 KB body)."""
    body = _run(benchmark, seeded, LIST)
    assert len(body["servers"]) == 100 and body["servers"][0]["id"] == SHOW_ID


def bench_flavors_detail(benchmark, seeded):
    """GET /v2.1/flavors/detail at 2.104: six flavors, JSON encoded per request."""
    body = _run(benchmark, seeded, FLAVORS)
    assert len(body["flavors"]) == 6
