"""render_server's bytes: pinned, independent of what its memos hold, exact on timestamps.

The digest below was taken from the renderer before the fast path (commit a2c1f7f, stdlib
json.dumps per fragment, no memo): the fast renderer must give the very same blobs.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from fastpath.api import views
from fastpath.api.views import table
from fastpath.store.samples import sample_record

GOLDEN = "ceba9da875cca38fb681daebcd2b80a1065a2702dd714833f7a73692e0845b84"


def golden_records() -> list[dict[str, Any]]:
    f = {"code": 500, "message": "No valid host", "details": "Traceback ...",
         "created": 1_378_181_000_000_000}
    return [sample_record(seed=i) for i in range(4)] + [
        sample_record(seed=9, name='Ünïcødé "q" \\ \x00S ☃ \U0001f600',
                      metadata={"ключ": "з", "c": "\x00\x01\n"}, description="d\u2028e"),
        sample_record(seed=10, vm_state="building", task_state="spawning", image=None,
                      launched_at=None, host=None, node=None),
        sample_record(seed=11, vm_state="error", fault=f, launched_at=1_704_067_205_000_001,
                      terminated_at=1_704_067_300_000_000),
        sample_record(seed=12, vm_state="stopped", power_state=4, security_groups=[], tags=[],
                      metadata={}, scheduler_hints={}, locked=True, locked_reason="r"),
    ]


def digest(records: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(views.render_server(r)[views.VIEW_ID])
    return h.hexdigest()


def test_blobs_are_pinned_cold_and_warm() -> None:
    table.clear_memos()
    assert digest(golden_records()) == GOLDEN  # every memo empty
    assert digest(golden_records()) == GOLDEN  # every memo hit


def test_memos_do_not_leak_between_servers() -> None:
    rnd = random.Random(5)
    values: list[Any] = [True, 1, 1.0, 0, False, None, "1", [1], [True], {"a": 1}, {"a": True}]
    recs = [sample_record(
        seed=i,
        image={"id": "img", "properties": {"p": rnd.choice(values)}},
        scheduler_hints=rnd.choice([{}, {"h": rnd.choice(values)}]),
        flavor={"id": "1", "name": "m1", "vcpus": i % 3 + 1, "ram": 512, "disk": 1,
                "ephemeral": 0, "swap": 0, "extra_specs": {"k": str(i % 2)}},
        vm_state=rnd.choice(["active", "stopped", "error"]), progress=rnd.choice([None, 0, 1]),
        fault=rnd.choice([None, {"code": 500, "message": "m", "details": "d", "created": 0}]),
    ) for i in range(300)]
    warm = [views.render_server(r)[views.VIEW_ID] for r in recs]
    for r, blob in zip(reversed(recs), reversed(warm), strict=True):
        table.clear_memos()
        assert views.render_server(r)[views.VIEW_ID] == blob
    for r, blob in zip(recs, warm, strict=True):
        d = json.loads(views.server_json(blob, 104, True, b"http://h"))
        assert d["image"]["properties"] == r["image"]["properties"]
        assert type(d["image"]["properties"]["p"]) is type(r["image"]["properties"]["p"])
        assert d["scheduler_hints"] == r["scheduler_hints"]
        assert d["flavor"]["vcpus"] == r["flavor"]["vcpus"]


@pytest.mark.parametrize("us", [0, 1, 999_999, 1_000_000, 86_399_999_999, 86_400_000_000,
                                1_704_067_200_000_000, 1_704_153_599_123_456,
                                253_402_300_799_999_999])  # 9999-12-31T23:59:59.999999
def test_timestamps_as_datetime_formats_them(us: int) -> None:
    dt = datetime.fromtimestamp(us // 1_000_000, UTC)
    assert table._isotime(us) == dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    naive = dt.replace(microsecond=us % 1_000_000, tzinfo=None)
    assert table._naive_iso(us) == naive.isoformat()


def test_scalars_as_json_dumps() -> None:
    for v in ["", "a\"b\\c", "\x00\x7f\x1f", "☃\U0001f600\u2028", 0, -5, 2**70, True, False,
              None, 1.5, [1, "x"], {"k": [None]}]:
        assert table._dumps(v) == json.dumps(v, ensure_ascii=True)


def test_unhashable_values_where_scalars_belong_still_render() -> None:
    # render_server takes any mapping; a list where a string belongs is rendered as JSON
    # (not kept), as the plain json.dumps renderer did.
    rec = sample_record(seed=2)
    rec["key_name"] = ["not", "a", "name"]
    blob = views.render_server(rec)[views.VIEW_ID]
    d = json.loads(views.server_json(blob, 104, True, b"http://h"))
    assert d["key_name"] == ["not", "a", "name"]
