"""The HTTP/1.1 protocol of _core, driven through a fake transport.

Every request shape is delivered whole, split in two at every point and byte by byte
(``deliveries``); the answers are read back with an independent response parser.
"""

from __future__ import annotations

import email.utils
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import (
    HOST,
    REQUEST_ID,
    Conn,
    Server,
    chunked,
    deliveries,
    parse_responses,
    request,
)

SAMPLES = Path("/work/shared/reference/nova-api/api_samples/versions")
SAMPLE_HOST = "http://openstack.example.com"


def sample(name: str, host: str = HOST) -> Any:
    text = (SAMPLES / name).read_text().replace(SAMPLE_HOST, f"http://{host}")
    return json.loads(text)


def each_delivery(server: Server, data: bytes) -> list[tuple[str, Conn]]:
    out = []
    for how, chunks in deliveries(data):
        out.append((how, server.connect().send(*chunks)))
    return out


# --------------------------------------------------------------------------------------
# Version documents, HEAD, common headers


@pytest.mark.parametrize(
    ("path", "sample_name"),
    [
        ("/", "versions-get-resp.json"),
        ("/v2.1/", "v21-version-get-resp.json"),
        ("/v2/", "v2-version-get-resp.json"),
    ],
)
def test_version_documents_equal_nova_samples(server: Server, path: str, sample_name: str) -> None:
    expected = sample(sample_name)
    for how, conn in each_delivery(server, request(path)):
        r = conn.one()
        assert r.status == 200, how
        assert r.json() == expected, how
        assert not conn.closed, how


def test_version_document_links_follow_the_host_header(server: Server) -> None:
    for host in ("localhost", "10.0.0.1:8774", "[::1]:8774"):
        r = server.exchange(request("/v2.1/", host=host)).one()
        assert r.json() == sample("v21-version-get-resp.json", host)


def test_version_document_without_host_uses_the_bind_address(server: Server) -> None:
    r = server.exchange(request("/", version="1.0", host=None)).one()
    assert r.json() == sample("versions-get-resp.json", "127.0.0.1:8774")


def test_public_url_setting_wins_over_host(make_server: Any) -> None:
    server = make_server(http__public_url="https://compute.example.com/")
    r = server.exchange(request("/v2/")).one()
    text = json.dumps(sample("v2-version-get-resp.json"))
    assert r.json() == json.loads(text.replace(f"http://{HOST}", "https://compute.example.com"))


def test_root_is_not_microversioned_but_v21_root_is(server: Server) -> None:
    r = server.exchange(request("/", "OpenStack-API-Version: compute 2.50")).one()
    assert r.header("OpenStack-API-Version") is None
    assert r.header("Vary") is None
    r = server.exchange(request("/v2.1/", "OpenStack-API-Version: compute 2.50")).one()
    assert r["OpenStack-API-Version"] == "compute 2.50"


@pytest.mark.parametrize("path", ["/", "/v2.1/", "/v2/", "/healthz", "/nowhere", "/v2.1/conflict"])
def test_head_has_no_body_and_the_get_content_length(server: Server, path: str) -> None:
    token = "X-Auth-Token: u:p"
    get = server.exchange(request(path, token)).one()
    for how, chunks in deliveries(request(path, token, method="HEAD")):
        conn = server.connect()
        conn.heads.add(0)
        conn.send(*chunks)
        r = conn.one()
        assert r.status == get.status, how
        assert r.body == b"", how
        assert r["Content-Length"] == str(len(get.body)), how
        assert r["Content-Type"] == get["Content-Type"], how
        assert bytes(conn.transport.out).endswith(b"\r\n\r\n"), how
        assert not conn.closed, how


def test_head_then_get_pipelined_frames_correctly(server: Server) -> None:
    conn = server.connect()
    conn.heads.add(0)
    conn.send(request("/v2/", method="HEAD") + request("/v2/"))
    head, get = conn.responses()
    assert head.body == b"" and int(head["Content-Length"]) == len(get.body) > 0


def test_every_response_has_date_type_length_and_request_ids(server: Server) -> None:
    data = b"".join(
        [
            request("/"),
            request("/nowhere"),
            request("/v2.1/", "OpenStack-API-Version: compute 3.0"),
            request("/v2.1/things"),
            request("/debug/echo", method="POST", body=b"{}"),
            request("/v2.1/conflict", "X-Auth-Token: a:b"),
        ]
    )
    conn = server.exchange(data)
    responses = conn.responses()
    assert [r.status for r in responses] == [200, 404, 406, 401, 200, 409]
    ids = set()
    for r in responses:
        date = email.utils.parsedate_to_datetime(r["Date"])
        assert r["Date"].endswith(" GMT") and date.tzinfo is not None
        assert r["Content-Type"] == "application/json"
        assert int(r["Content-Length"]) == len(r.body)
        rid = r["X-OpenStack-Request-ID"]
        assert REQUEST_ID.match(rid), rid
        assert r["X-Compute-Request-ID"] == rid
        ids.add(rid)
    assert len(ids) == len(responses)


def test_request_ids_are_unique_across_workers(make_server: Any) -> None:
    a = make_server().exchange(request("/")).one()["X-OpenStack-Request-ID"]
    b = make_server().exchange(request("/")).one()["X-OpenStack-Request-ID"]
    assert a != b


def test_make_request_id_has_nova_shape(core: Any) -> None:
    ids = {core.make_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(REQUEST_ID.match(i) for i in ids)


def test_error_bodies_have_nova_shape(server: Server) -> None:
    r = server.exchange(request("/nowhere")).one()
    assert r.status == 404
    assert r.json() == {"itemNotFound": {"code": 404, "message": "The resource could not be found."}}


# --------------------------------------------------------------------------------------
# Connection management: keep-alive, close, HTTP/1.0


def test_keep_alive_serves_requests_one_after_the_other(server: Server) -> None:
    conn = server.connect()
    for i in range(1, 5):
        conn.send(request("/healthz"))
        assert len(conn.responses()) == i
        assert not conn.closed
    assert all(r.header("Connection") is None for r in conn.responses())


def test_connection_close_closes_after_the_answer(server: Server) -> None:
    data = request("/", "Connection: close")
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 200, how
        assert r["Connection"] == "close", how
        assert conn.closed, how


def test_connection_close_drops_what_is_pipelined_after_it(server: Server) -> None:
    conn = server.exchange(request("/", "Connection: close") + request("/v2/"))
    assert [r.status for r in conn.responses()] == [200]
    assert conn.closed


def test_http10_closes_unless_keep_alive_is_asked(server: Server) -> None:
    for how, conn in each_delivery(server, request("/", version="1.0")):
        r = conn.one()
        assert r.version == "1.1"
        assert r.status == 200, how
        assert r["Connection"] == "close", how
        assert conn.closed, how


def test_http10_keep_alive_is_announced_and_kept(server: Server) -> None:
    data = request("/", "Connection: keep-alive", version="1.0")
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 200, how
        assert r["Connection"] == "keep-alive", how
        assert not conn.closed, how
    conn = server.exchange(data, data, request("/v2/", version="1.0"))
    assert [r.header("Connection") for r in conn.responses()] == ["keep-alive", "keep-alive", "close"]
    assert conn.closed


def test_http11_keep_alive_is_not_announced(server: Server) -> None:
    r = server.exchange(request("/", "Connection: keep-alive")).one()
    assert r.header("Connection") is None


# --------------------------------------------------------------------------------------
# Pipelining


PIPELINE = [
    request("/public/one"),
    request("/v2/"),
    request("/public/two?x=1"),
    request("/v2.1/things/abc", "X-Auth-Token: u:p", "X-OpenStack-Nova-API-Version: 2.20"),
    request("/debug/echo", method="POST", body=b"12345"),
    request("/public/three"),
]


def check_pipeline(responses: list[Any], how: str) -> None:
    assert [r.status for r in responses] == [200] * len(PIPELINE), how
    bodies = [r.json() for r in responses]
    assert bodies[0]["params"] == ["one"], how
    assert bodies[1]["version"]["id"] == "v2.0", how
    assert bodies[2]["params"] == ["two"] and bodies[2]["query"] == "x=1", how
    assert bodies[3]["params"] == ["abc"] and bodies[3]["version"] == 20, how
    assert responses[3]["X-OpenStack-Nova-API-Version"] == "2.20", how
    assert bodies[4] == {"length": 5}, how
    assert bodies[5]["params"] == ["three"], how


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    data = b"".join(PIPELINE)
    for how, conn in each_delivery(server, data):
        check_pipeline(conn.responses(), how)
        assert not conn.closed, how


def test_pipelining_behind_an_async_handler_keeps_the_order(server: Server) -> None:
    data = request("/debug/sleep?ms=2") + b"".join(PIPELINE)
    conn = server.exchange(data)
    assert conn.responses() == []  # all wait behind the sleep
    assert not conn.transport.reading  # the queue holds reading back
    responses = conn.wait(1 + len(PIPELINE))
    assert responses[0].json()["slept_ms"] == 2
    check_pipeline(responses[1:], "whole")
    server.settle()
    assert conn.transport.reading and not conn.closed
    # and the connection goes on
    assert conn.send(request("/healthz")).responses()[-1].status == 200


@pytest.mark.parametrize("how", ["split", "byte by byte"])
def test_pipelining_behind_an_async_handler_fragmented(server: Server, how: str) -> None:
    data = request("/public/a") + request("/debug/sleep?ms=1") + b"".join(PIPELINE)
    if how == "split":
        cases = [[data[:i], data[i:]] for i in range(1, len(data), 7)]
    else:
        cases = [[data[i : i + 1] for i in range(len(data))]]
    for chunks in cases:
        conn = server.connect().send(*chunks)
        responses = conn.wait(2 + len(PIPELINE))
        assert responses[0].json()["params"] == ["a"]
        assert responses[1].json()["slept_ms"] == 1
        check_pipeline(responses[2:], f"{how} {len(chunks[0])}")
        server.settle()
        assert conn.transport.reading and not conn.closed


def test_two_async_requests_in_a_row(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=2") + request("/debug/sleep?ms=1"))
    a, b = conn.wait(2)
    assert (a.json()["slept_ms"], b.json()["slept_ms"]) == (2, 1)


def test_half_close_after_pipelined_async_still_answers_then_closes(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=1") + request("/public/z"))
    assert conn.proto.eof_received() is True  # keep the transport open to answer
    responses = conn.wait(2)
    assert [r.status for r in responses] == [200, 200]
    assert conn.closed


def test_half_close_when_idle_lets_the_transport_close(server: Server) -> None:
    conn = server.exchange(request("/"))
    assert not conn.proto.eof_received()


# --------------------------------------------------------------------------------------
# Request bodies


@pytest.mark.parametrize(
    "data",
    [
        request("/debug/echo", method="POST", body=b'{"a": "' + b"x" * 40 + b'"}'),
        request("/debug/echo", "Transfer-Encoding: chunked", method="POST")
        + chunked(b'{"a": "', b"x" * 40, b'"}'),
    ],
    ids=["content-length", "chunked"],
)
def test_request_bodies(server: Server, data: bytes) -> None:
    for how, conn in each_delivery(server, data + request("/public/after")):
        first, second = conn.responses()
        assert first.json() == {"length": 49}, how
        assert second.json()["params"] == ["after"], how


@pytest.mark.parametrize("te", ["content-length", "chunked"])
def test_large_bodies_are_not_taken_for_headers(server: Server, te: str) -> None:
    body = b"x" * 200_000  # no LF anywhere: a body read must never count as a header line
    if te == "chunked":
        data = request("/debug/echo", "Transfer-Encoding: chunked", method="POST")
        data += chunked(body[:70_000], body[70_000:])
    else:
        data = request("/debug/echo", method="POST", body=body)
    data += request("/public/next")
    splits = [[data], [data[:100], data[100:]], [data[:50_000], data[50_000:]]]
    splits.append([data[i : i + 4096] for i in range(0, len(data), 4096)])
    splits.append([data[i : i + 65536] for i in range(0, len(data), 65536)])
    for chunks in splits:
        first, second = server.connect().send(*chunks).responses()
        assert first.json() == {"length": 200_000}, len(chunks)
        assert second.json()["params"] == ["next"], len(chunks)


def test_empty_bodies(server: Server) -> None:
    conn = server.exchange(
        request("/debug/echo", method="POST"),
        request("/debug/echo", method="POST", body=b""),
        request("/debug/echo", "Transfer-Encoding: chunked", method="POST") + chunked(),
    )
    assert [r.json() for r in conn.responses()] == [{"length": 0}] * 3


def test_trailers_are_counted_but_never_taken_for_headers(make_server: Any) -> None:
    head = request("/v2.1/echo", "X-Auth-Token: u:p", "Transfer-Encoding: chunked", method="POST")
    body = chunked(b"abc").removesuffix(b"\r\n") + b"X-Auth-Token: admin:admin\r\n\r\n"
    for how, conn in each_delivery(make_server(), head + body):
        r = conn.one()
        assert r.status == 200, how
        assert (r.json()["user"], r.json()["is_admin"]) == ("u", False), how
    server = make_server(http__max_header_size=1024)
    body = chunked(b"abc").removesuffix(b"\r\n") + b"X-Trailer: " + b"t" * 2000 + b"\r\n\r\n"
    assert_431(server.exchange(head + body))
    assert_431(server.exchange(head, body[:-4]))  # a trailer that never ends


def test_expect_100_continue_gets_an_interim_answer_then_the_answer(server: Server) -> None:
    head = request("/debug/echo", "Expect: 100-continue", "Content-Length: 3", method="POST")
    conn = server.exchange(head)
    assert bytes(conn.transport.out) == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"abc")
    interim, final = conn.responses()
    assert interim.status == 100 and interim.body == b""
    assert final.status == 200 and final.json() == {"length": 3}
    for how, conn in each_delivery(server, head + b"abc"):
        assert [r.status for r in conn.responses()] == [100, 200], how


def test_expect_100_continue_over_the_body_limit_gets_413_without_100(make_server: Any) -> None:
    server = make_server(http__max_body_size=10)
    head = request("/debug/echo", "Expect: 100-continue", "Content-Length: 11", method="POST")
    conn = server.exchange(head)
    r = conn.one()
    assert r.status == 413 and conn.closed


def test_other_expectations_get_417_and_close(server: Server) -> None:
    data = request("/debug/echo", "Expect: something-else", method="POST", body=b"x")
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 417, how
        assert r["Connection"] == "close", how
        assert conn.closed, how


# --------------------------------------------------------------------------------------
# Limits


def big_header_request(total: int) -> bytes:
    """A GET whose request line plus headers (what the limit counts) is ``total`` bytes."""
    base = request("/", "X-Big: ")
    return request("/", "X-Big: " + "a" * (total - len(base)))


def assert_431(conn: Conn, how: str = "") -> None:
    r = conn.one()
    assert r.status == 431, how
    assert r["Connection"] == "close", how
    assert r.json()["computeFault"]["code"] == 431, how
    assert conn.closed, how


def test_headers_at_the_limit_pass(make_server: Any) -> None:
    server = make_server(http__max_header_size=2048)
    data = big_header_request(2048)
    for how, chunks in [("whole", [data]), ("byte by byte", [bytes([b]) for b in data])]:
        conn = server.connect().send(*chunks)
        assert conn.one().status == 200, how


def test_headers_over_the_limit_get_431_and_close(make_server: Any) -> None:
    server = make_server(http__max_header_size=2048)
    data = big_header_request(2049 + 8)
    for how, conn in each_delivery(server, data):
        assert_431(conn, how)


def test_headers_over_the_default_16k_limit(server: Server) -> None:
    assert server.exchange(big_header_request(16 * 1024)).one().status == 200
    assert_431(server.exchange(big_header_request(16 * 1024 + 100)))
    data = big_header_request(17 * 1024)
    assert_431(server.connect().send(*[data[i : i + 1] for i in range(len(data))]))


def test_long_request_line_gets_431(make_server: Any) -> None:
    server = make_server(http__max_header_size=1024)
    data = request("/public/" + "a" * 1100)
    for how, chunks in [("whole", [data]), ("byte by byte", [bytes([b]) for b in data])]:
        assert_431(server.connect().send(*chunks), how)


@pytest.mark.parametrize("packets", [1, 2, 10, 1000])
def test_a_header_that_never_ends_gets_431_before_the_timeout(server: Server, packets: int) -> None:
    # One header line of 40 KiB that never ends: the parser holds it; fastpath must not.
    data = request("/", host=None).removesuffix(b"\r\n") + b"X-Stall: " + b"s" * 40_000
    step = -(-len(data) // packets)
    conn = server.connect().send(*[data[i : i + step] for i in range(0, len(data), step)])
    assert_431(conn, f"{packets} packets")


def test_stalled_header_after_complete_headers_in_the_same_packet(server: Server) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20))
        + b"X-Stall: " + b"s" * 20_000
    )
    assert_431(server.exchange(data))


def test_stalled_header_behind_a_pipelined_request(server: Server) -> None:
    data = request("/public/a") + b"GET / HTTP/1.1\r\nX-Stall: " + b"s" * 20_000
    conn = server.exchange(data)
    a, b = conn.responses()
    assert a.status == 200 and b.status == 431 and conn.closed


def test_pipelined_batch_larger_than_the_header_limit_is_fine(make_server: Any) -> None:
    server = make_server(http__max_header_size=1024)
    data = b"".join(request(f"/public/{i}", "X-Pad: " + "p" * 200) for i in range(40))
    for how, chunks in [("whole", [data]), ("4 KiB", [data[i : i + 4096] for i in range(0, len(data), 4096)])]:
        conn = server.connect().send(*chunks)
        assert [r.status for r in conn.responses()] == [200] * 40, how


def test_more_than_max_headers_get_431(make_server: Any) -> None:
    server = make_server(http__max_headers=10)
    ok = request("/", *[f"X-{i}: v" for i in range(9)])  # + Host = 10
    assert server.exchange(ok).one().status == 200
    data = request("/", *[f"X-{i}: v" for i in range(10)])
    for how, conn in each_delivery(server, data):
        assert_431(conn, how)


def test_body_over_the_limit_by_content_length_is_refused_before_reading(make_server: Any) -> None:
    server = make_server(http__max_body_size=100)
    ok = request("/debug/echo", method="POST", body=b"x" * 100)
    assert server.exchange(ok).one().json() == {"length": 100}
    head = request("/debug/echo", "Content-Length: 101", method="POST")
    for how, conn in each_delivery(server, head):  # no body byte sent: answered at once
        r = conn.one()
        assert r.status == 413, how
        assert r.json()["overLimit"]["code"] == 413, how
        assert r["Connection"] == "close" and conn.closed, how


def test_chunked_body_over_the_limit_gets_413(make_server: Any) -> None:
    server = make_server(http__max_body_size=100)
    head = request("/debug/echo", "Transfer-Encoding: chunked", method="POST")
    ok = head + chunked(*[b"x" * 10] * 10)
    assert server.exchange(ok).one().json() == {"length": 100}
    data = head + chunked(*[b"x" * 10] * 11)
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 413, how
        assert conn.closed, how
    # refused as the chunks arrive, not at the end
    conn = server.exchange(head, b"40\r\n" + b"x" * 64 + b"\r\n", b"40\r\n" + b"x" * 64)
    assert conn.one().status == 413 and conn.closed


# --------------------------------------------------------------------------------------
# Malformed requests, request targets, upgrades


@pytest.mark.parametrize(
    "data",
    [
        b"BLAH\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /debug/echo HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /debug/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n X-Folded: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nX Y: a\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(server: Server, data: bytes) -> None:
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 400, how
        assert r.json()["badRequest"]["code"] == 400, how
        assert r["Connection"] == "close", how
        assert conn.closed, how


def test_malformed_request_after_good_ones_answers_them_first(server: Server) -> None:
    conn = server.exchange(request("/public/a") + request("/public/b") + b"BLAH\r\n\r\n")
    assert [r.status for r in conn.responses()] == [200, 200, 400]
    assert conn.closed


def test_malformed_request_behind_an_async_one_answers_in_order(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=1") + request("/public/b") + b"BLAH\r\n\r\n")
    responses = conn.wait(3)
    assert [r.status for r in responses] == [200, 200, 400]
    assert conn.closed


def test_absolute_form_target(server: Server) -> None:
    data = request("http://other.example:9999/v2.1/?x=1", host="ignored:1")
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 200, how
        # RFC 9112 3.2.2: the authority of an absolute-form target replaces Host.
        assert r.json() == sample("v21-version-get-resp.json", "other.example:9999"), how
    r = server.exchange(request("http://other.example", host=None)).one()
    assert r.status == 200 and r.json() == sample("versions-get-resp.json", "other.example")
    r = server.exchange(request("https://h/public/x%20y?q")).one()
    assert r.json()["params"] == ["x y"] and r.json()["query"] == "q"


def test_asterisk_form_is_refused(server: Server) -> None:
    r = server.exchange(request("*", method="OPTIONS")).one()
    assert r.status == 400


def test_upgrade_requests_are_answered_then_closed(server: Server) -> None:
    data = request("/", "Connection: Upgrade", "Upgrade: h2c") + request("/v2/")
    for how, conn in each_delivery(server, data):
        r = conn.one()
        assert r.status == 200, how
        assert r["Connection"] == "close", how
        assert conn.closed, how


# --------------------------------------------------------------------------------------
# Timeouts (the worker's tick sweeps deadlines; the clock is moved forward)


def test_header_timeout_answers_408_and_closes(server: Server) -> None:
    conn = server.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n")
    server.tick(9)
    assert not conn.closed
    server.tick(2)
    r = conn.one()
    assert r.status == 408 and r["Connection"] == "close"
    assert r.json()["computeFault"]["code"] == 408
    assert conn.closed


def test_header_timeout_is_not_extended_by_dribbling_bytes(server: Server) -> None:
    conn = server.exchange(b"GET / HTTP/1.1\r\n")
    for _ in range(11):
        conn.send(b"X-A: b\r\n")
        server.tick(1)
    assert conn.one().status == 408 and conn.closed


def test_silent_new_connection_closes_without_answer(server: Server) -> None:
    conn = server.connect()
    server.tick(11)
    assert conn.closed and conn.transport.out == b""


def test_idle_keep_alive_connection_closes_without_answer(server: Server) -> None:
    conn = server.exchange(request("/"))
    server.tick(29)
    assert not conn.closed
    server.tick(2)
    assert conn.closed
    assert len(conn.responses()) == 1


def test_keep_alive_timeout_setting(make_server: Any) -> None:
    server = make_server(http__keepalive_timeout=2.0)
    conn = server.exchange(request("/"))
    server.tick(1.5)
    assert not conn.closed
    server.tick(1)
    assert conn.closed


def test_body_timeout_answers_408(server: Server) -> None:
    conn = server.exchange(request("/debug/echo", "Content-Length: 10", method="POST") + b"abc")
    server.tick(20)
    conn.send(b"def")  # each piece of body refreshes the deadline
    server.tick(20)
    assert not conn.closed
    server.tick(11)
    assert conn.one().status == 408 and conn.closed


def test_keep_alive_timeout_runs_again_after_an_async_answer(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=1"))
    conn.wait(1)
    server.tick(29)
    assert not conn.closed
    server.tick(2)
    assert conn.closed and len(conn.responses()) == 1


def test_no_timeout_while_an_async_handler_works(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=1"))
    server.tick(100)
    assert not conn.closed
    assert conn.wait(1)[0].status == 200


# --------------------------------------------------------------------------------------
# Connection cap, back-pressure, shutdown


def test_connection_cap_answers_503(make_server: Any) -> None:
    server = make_server(http__max_connections=2)
    a, b = server.connect(), server.connect()
    c = server.connect()
    r = c.one()
    assert r.status == 503 and r["Connection"] == "close"
    assert r.json()["serviceUnavailable"]["code"] == 503
    assert c.closed and not a.closed and not b.closed
    server.settle()  # c's connection_lost
    a.send(request("/", "Connection: close"))
    server.settle()
    d = server.connect()
    assert not d.closed and d.send(request("/")).one().status == 200
    assert server.worker.connection_count() == 2


def test_write_back_pressure_pauses_and_resumes_reading(server: Server) -> None:
    conn = server.exchange(request("/"))
    conn.proto.pause_writing()
    assert not conn.transport.reading and conn.transport.pause_calls == 1
    conn.send(request("/v2/"))  # held back by the transport while paused
    assert len(conn.responses()) == 1
    conn.proto.resume_writing()
    assert conn.transport.reading and conn.transport.resume_calls == 1
    server.settle()
    assert len(conn.responses()) == 2


def test_write_pause_and_queue_pause_combine(server: Server) -> None:
    conn = server.exchange(request("/debug/sleep?ms=1") + request("/public/x"))
    assert not conn.transport.reading
    conn.proto.pause_writing()
    conn.wait(2)
    server.settle()
    assert not conn.transport.reading  # still paused for writing
    conn.proto.resume_writing()
    assert conn.transport.reading
    assert conn.transport.pause_calls == 1 and conn.transport.resume_calls == 1


def test_large_responses_are_written_whole(server: Server) -> None:
    conn = server.exchange(request("/v2.1/big", "X-Auth-Token: a:b") + request("/"))
    big, small = conn.responses()
    assert len(big.body) == 100_002 and small.status == 200


def test_long_handler_headers_fit_the_response_buffer(server: Server) -> None:
    # small first: the buffer is sized by the first answers, then must grow for these
    sizes = [0, 10, 3000, 100, 20_000, 5000, 70_000]
    conn = server.exchange(*[request(f"/public/long/head?{n}") for n in sizes])
    responses = conn.responses()
    for n, r in zip(sizes, responses, strict=True):
        assert r.status == 200 and r.body == b"{}"
        assert r["Content-Type"] == "text/x-" + "t" * n
        assert r["X-Extra"] == "e" * n


def test_graceful_shutdown_closes_idle_and_finishes_in_flight(server: Server) -> None:
    idle = server.exchange(request("/"))
    fresh = server.connect()
    busy = server.exchange(request("/debug/sleep?ms=5"))
    done: list[bool] = []
    server.worker.begin_shutdown(10.0, lambda: done.append(True))
    # A connection that has not sent its first request yet is not idle: its request may
    # be in flight (accepted just before the listener closed).  It is served, then closed.
    assert idle.closed and not fresh.closed and not busy.closed
    late = server.connect()
    assert not late.closed
    for conn in (fresh, late):
        conn.send(request("/"))
        r = conn.one()
        assert r.status == 200 and r["Connection"] == "close" and conn.closed
    server.settle()
    assert not done
    r = busy.wait(1)[0]
    assert r.status == 200 and r["Connection"] == "close"
    server.settle()
    assert busy.closed and done == [True]


def test_graceful_shutdown_with_nothing_open_is_done_at_once(server: Server) -> None:
    done: list[bool] = []
    server.worker.begin_shutdown(10.0, lambda: done.append(True))
    assert done == [True]


def test_graceful_shutdown_gives_up_after_the_grace(server: Server) -> None:
    conn = server.exchange(b"GET / HTTP/1.1\r\n")
    done: list[bool] = []
    server.worker.begin_shutdown(5.0, lambda: done.append(True))
    assert not conn.closed and not done
    server.tick(6)
    assert done == [True]


def test_shutdown_during_a_partial_request_answers_it(server: Server) -> None:
    conn = server.exchange(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n")
    server.worker.begin_shutdown(10.0, lambda: None)
    assert not conn.closed
    r = conn.send(b"\r\n").one()
    assert r.status == 200 and r["Connection"] == "close" and conn.closed


def test_close_all(server: Server) -> None:
    conns = [server.exchange(request("/")) for _ in range(3)]
    server.worker.close_all()
    assert all(c.closed for c in conns)


# --------------------------------------------------------------------------------------
# Handler errors and counters


def test_handler_exception_is_a_logged_500_and_the_connection_lives(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    data = request("/v2.1/boom", "X-Auth-Token: a:b") + request("/public/after")
    with caplog.at_level(logging.ERROR, logger="fastpath.http"):
        conn = server.exchange(data)
    r, after = conn.responses()
    assert r.status == 500
    assert r.json() == {
        "computeFault": {
            "code": 500,
            "message": "An unexpected error occurred while handling the request.",
        }
    }
    assert r["OpenStack-API-Version"] == "compute 2.1"
    assert after.status == 200 and not conn.closed
    assert any("handler bug" in rec.exc_text for rec in caplog.records if rec.exc_text)


def test_async_handler_exception_is_a_logged_500(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="fastpath.http"):
        conn = server.exchange(request("/v2.1/async-boom", "X-Auth-Token: a:b") + request("/"))
        r, after = conn.wait(2)
    assert r.status == 500 and r.json()["computeFault"]["code"] == 500
    assert after.status == 200 and not conn.closed
    assert any("async handler bug" in rec.exc_text for rec in caplog.records if rec.exc_text)


def test_async_failure_after_the_client_left_is_logged_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    import gc

    with caplog.at_level(logging.ERROR):
        conn = server.exchange(request("/v2.1/async-boom", "X-Auth-Token: a:b"))
        conn.proto.connection_lost(ConnectionResetError())
        server.settle()
        gc.collect()
        server.settle()
    messages = [rec.getMessage() for rec in caplog.records]
    assert not any("never retrieved" in m for m in messages), messages
    assert sum("async-boom" in m for m in messages) == 1, messages
    assert conn.transport.out == b""


def test_handler_returning_a_bad_result_is_a_500(server: Server, caplog: Any) -> None:
    with caplog.at_level(logging.ERROR, logger="fastpath.http"):
        conn = server.exchange(request("/v2.1/bad-result", "X-Auth-Token: a:b") + request("/"))
    r, after = conn.responses()
    assert r.status == 500 and after.status == 200 and not conn.closed
    assert caplog.records


@pytest.mark.parametrize(("path", "message", "retry"), [
    ("/v2.1/conflict", "Conflict in state", "1"),
    ("/v2.1/async-conflict", "Async conflict", "2"),
])
def test_http_faults_keep_their_status_and_headers(
    server: Server, path: str, message: str, retry: str
) -> None:
    conn = server.exchange(request(path, "X-Auth-Token: a:b", "OpenStack-API-Version: compute 2.7"))
    r = conn.wait(1)[0]
    assert r.status == 409
    assert r.json() == {"conflictingRequest": {"code": 409, "message": message}}
    assert r["Retry-After"] == retry
    assert r["OpenStack-API-Version"] == "compute 2.7"


def test_handler_extra_headers(server: Server) -> None:
    r = server.exchange(request("/v2.1/things", "X-Auth-Token: a:b", method="POST")).one()
    assert r.status == 201 and r["Location"] == "http://x/1"


def test_counters_count_by_route_and_status(server: Server) -> None:
    idx = server.index
    before = server.worker.counters()
    server.exchange(
        request("/") + request("/") + request("/nowhere") + request("/v2.1/things")
        + request("/v2.1/things", "X-Auth-Token: a:b")
        + request("/v2.1/", "OpenStack-API-Version: compute 9.9")
    )
    after = server.worker.counters()
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert delta == {
        (idx["GET /"], 200): 2,
        (0, 404): 1,
        (idx["GET /v2.1/things"], 401): 1,
        (idx["GET /v2.1/things"], 200): 1,
        (idx["GET /v2.1/"], 406): 1,
    }


def test_counters_live_in_shared_memory(server: Server, core: Any) -> None:
    server.exchange(request("/healthz"), request("/healthz"))
    sums = core.sum_counters(server.shm.buf, server.shm.nslots, len(server.index) + 1, 1)
    from fastpath.master.shm import NSTATUS, status_index

    assert sums[server.index["GET /healthz"] * NSTATUS + status_index(200)] == 2


def test_healthz_reports_the_compiled_core(server: Server, core: Any) -> None:
    body = server.exchange(request("/healthz")).one().json()
    assert body["core"] == "compiled" and body["source"] == core.SOURCE_HASH


def test_responses_parse_with_a_strict_parser(server: Server) -> None:
    raw = bytes(server.exchange(request("/"), request("/nowhere")).transport.out)
    assert len(parse_responses(raw)) == 2
    assert raw.count(b"\r\n\r\n") == 2


def test_expect_100_continue_is_refused_before_the_body_when_the_request_cannot_succeed(
    server: Server,
) -> None:
    cases = [
        (request("/nowhere", "Expect: 100-continue", "Content-Length: 3", method="POST"), 404),
        (request("/v2.1/servers", "Expect: 100-continue", "Content-Length: 3", method="POST"), 401),
        (request("/healthz", "Expect: 100-continue", "Content-Length: 3", method="POST"), 405),
    ]
    for head, status in cases:
        conn = server.exchange(head)
        r = conn.one()  # the final answer, and no "100 Continue" before it
        assert r.status == status and conn.closed, (head, r.status)


def test_invalid_or_repeated_host_is_refused(server: Server) -> None:
    """The Host goes into the links of JSON bodies: nothing that could break out of a JSON
    string may pass (RFC 9112 3.2: invalid or repeated Host gets 400)."""
    for host in (b'a"b', b"a\\b", b"a b", b"x\x01y"):
        conn = server.exchange(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        r = conn.one()
        assert r.status == 400 and conn.closed, host
    conn = server.exchange(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert conn.one().status == 400
    for host in (b"[::1]:8774", b"compute.example.com", b"10.0.0.1:80", b"xn--bcher-kva.example"):
        conn = server.exchange(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        r = conn.one()
        assert r.status == 200 and host.decode() in r.body.decode(), host
