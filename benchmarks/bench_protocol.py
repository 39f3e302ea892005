"""The HTTP protocol layer: bytes in (``data_received``) to bytes out (``transport.write``).

One call = one packet handed to the protocol, parsed by httptools, routed, answered inline
and written with one ``write``; no event loop and no socket.  This is the per-request CPU
of a worker minus the kernel and uvloop (see load.py for those).  Every benchmark checks
its answer once before timing it, so a broken route cannot produce a fast figure.
"""

from __future__ import annotations

from _harness import FakeTransport, request, status_of

V21 = request(b"/v2.1/")
V21_MV = request(b"/v2.1/", b"OpenStack-API-Version: compute 2.79")
HEALTHZ = request(b"/healthz")
NOT_FOUND = request(b"/nope")
NOT_FOUND_API = request(b"/v2.1/nope", b"X-Auth-Token: demo:demo")
# What openstacksdk/keystoneauth sends (auth_type: none): more headers to walk past.
V21_SDK = request(
    b"/v2.1/",
    b"User-Agent: openstacksdk/4.1.0 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.11.7",
    b"Accept-Encoding: gzip, deflate",
    b"Accept: application/json",
    b"Connection: keep-alive",
    b"X-Auth-Token: notused",
    b"OpenStack-API-Version: compute 2.95",
    b"X-OpenStack-Nova-API-Version: 2.95",
)
PIPELINE = 8
V21_X8 = V21 * PIPELINE


def _run_keepalive(benchmark, connect, data: bytes, status: int, group: str) -> bytes:
    proto, transport = connect()
    proto.data_received(data)
    response = transport.out[-1]
    assert status_of(response) == status, response[:200]
    benchmark.group = group
    benchmark.extra_info["request_bytes"] = len(data)
    benchmark.extra_info["response_bytes"] = len(response)
    benchmark(proto.data_received, data)
    assert not transport.closed
    assert status_of(transport.out[-1]) == status
    return response


def bench_get_v21(benchmark, connect):
    """GET /v2.1/, no microversion header (negotiates 2.1): the load benchmark's request."""
    body = _run_keepalive(benchmark, connect, V21, 200, "protocol: keep-alive request")
    assert b'"id": "v2.1"' in body


def bench_get_v21_microversion(benchmark, connect):
    """GET /v2.1/ with ``OpenStack-API-Version: compute 2.79``."""
    body = _run_keepalive(benchmark, connect, V21_MV, 200, "protocol: keep-alive request")
    assert b"OpenStack-API-Version: compute 2.79\r\n" in body


def bench_get_v21_sdk_headers(benchmark, connect):
    """GET /v2.1/ with the eight headers openstacksdk sends (token, both version headers)."""
    body = _run_keepalive(benchmark, connect, V21_SDK, 200, "protocol: keep-alive request")
    assert b"OpenStack-API-Version: compute 2.95\r\n" in body


def bench_get_healthz(benchmark, connect):
    """GET /healthz: unversioned, no auth, a constant body."""
    _run_keepalive(benchmark, connect, HEALTHZ, 200, "protocol: keep-alive request")


def bench_not_found(benchmark, connect):
    """GET /nope: no route, a rendered Nova fault body (itemNotFound)."""
    body = _run_keepalive(benchmark, connect, NOT_FOUND, 404, "protocol: keep-alive request")
    assert b"itemNotFound" in body


def bench_not_found_under_api_root(benchmark, connect):
    """GET /v2.1/nope with a token: authenticated, then 404."""
    body = _run_keepalive(benchmark, connect, NOT_FOUND_API, 404, "protocol: keep-alive request")
    assert b"itemNotFound" in body


def bench_pipelined_8(benchmark, connect):
    """Eight GET /v2.1/ in one packet: eight inline answers, eight writes.

    Divide by 8 for the per-request cost (``extra_info.requests_per_call``).
    """
    proto, transport = connect(keep=PIPELINE)
    proto.data_received(V21_X8)
    assert len(transport.out) == PIPELINE
    assert all(status_of(r) == 200 for r in transport.out)
    benchmark.group = "protocol: pipelined"
    benchmark.extra_info["requests_per_call"] = PIPELINE
    benchmark(proto.data_received, V21_X8)
    assert not transport.closed


def bench_fragmented(benchmark, connect):
    """GET /v2.1/ (SDK headers) arriving in three packets: request line, headers, blank line."""
    proto, transport = connect()
    cut1 = V21_SDK.index(b"\r\n") + 2
    cut2 = len(V21_SDK) - 2
    parts = (V21_SDK[:cut1], V21_SDK[cut1:cut2], V21_SDK[cut2:])
    feed = proto.data_received

    def three_packets() -> None:
        feed(parts[0])
        feed(parts[1])
        feed(parts[2])

    three_packets()
    assert status_of(transport.out[-1]) == 200
    benchmark.group = "protocol: keep-alive request"
    benchmark(three_packets)
    assert not transport.closed


def bench_connection_per_request(benchmark, harness):
    """connection_made + GET /v2.1/ with ``Connection: close`` + connection_lost.

    The per-connection cost (parser, registration, close) on top of one request: what a
    client without keep-alive pays, before the kernel's accept/close.
    """
    data = request(b"/v2.1/", b"Connection: close")
    factory = harness.worker.protocol_factory

    def one_connection() -> FakeTransport:
        transport = FakeTransport(1)
        proto = factory()
        proto.connection_made(transport)
        proto.data_received(data)
        proto.connection_lost(None)
        return transport

    t = one_connection()
    assert t.closed and status_of(t.out[-1]) == 200
    assert b"Connection: close\r\n" in t.out[-1]
    benchmark.group = "protocol: connection"
    t = benchmark(one_connection)
    assert t.closed
