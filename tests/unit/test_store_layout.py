"""The store's key encodings and the canonical record schema."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.errors import RecordError
from fastpath.store.samples import EPOCH_2024, sample_record

U1 = "0e44cc9c-e052-415d-afbf-469b0d384170"


# -- uuids and names --------------------------------------------------------------------------
def test_uuid_round_trip() -> None:
    k = L.uuid_key(U1)
    assert k == uuidlib.UUID(U1).bytes and len(k) == 16
    assert L.uuid_str(k) == U1
    assert L.parse_uuid(k) == k
    assert L.parse_uuid(U1.upper()) == k  # same server, whatever the case


@pytest.mark.parametrize(
    "bad",
    [
        "", "x", U1[:-1], U1 + "0", U1.replace("-", ""), U1.replace("-", " "),
        "0e44cc9c-e052-415d-afbf-469b0d38417g", "0e44cc9c-e052-415d-afbf-469b 0d38417",
        "0e44cc9c e052-415d-afbf-469b0d384170", b"short",
    ],
)
def test_not_a_uuid(bad: str | bytes) -> None:
    assert L.parse_uuid(bad) is None
    with pytest.raises(RecordError):
        L.uuid_key(bad)


def test_names_in_keys_refuse_nul_and_long() -> None:
    assert L.name_bytes("proj") == b"proj"
    assert L.name_bytes("é") == "é".encode()
    with pytest.raises(RecordError):
        L.name_bytes("a\x00b")
    with pytest.raises(RecordError):
        L.name_bytes("x" * 256)
    with pytest.raises(RecordError):
        L.name_bytes("")


# -- index orders -----------------------------------------------------------------------------
def _uuids(n: int) -> list[bytes]:
    return [uuidlib.UUID(int=(i * 0x9E3779B97F4A7C15) % 2**128).bytes for i in range(n)]


def test_by_project_order_is_created_desc_then_id_desc() -> None:
    rows = [(EPOCH_2024 + (i % 5) * 1_000_000, u) for i, u in enumerate(_uuids(40))]
    keys = sorted((L.by_project_key(b"p1", c, u), (c, u)) for c, u in rows)
    walked = [cu for _, cu in keys]
    assert walked == sorted(rows, key=lambda cu: (cu[0], cu[1]), reverse=True)
    # The key gives back its server and time.
    for key, (c, u) in keys:
        assert L.uuid_of_index_key(key) == u
        assert L.created_of_index_key(key) == c


def test_by_created_order_matches_by_project() -> None:
    rows = [(EPOCH_2024 + (i % 3), u) for i, u in enumerate(_uuids(30))]
    a = [L.uuid_of_index_key(k) for k in sorted(L.by_project_key(b"p", c, u) for c, u in rows)]
    b = [L.uuid_of_index_key(k) for k in sorted(L.by_created_key(c, u) for c, u in rows)]
    assert a == b


def test_projects_do_not_mix_even_with_shared_prefixes() -> None:
    u = _uuids(1)[0]
    keys = sorted(
        [L.by_project_key(b"ab", 0, u), L.by_project_key(b"abc", 2**62, u),
         L.by_project_key(b"a", 5, u), L.by_project_key(b"ab", 2**62, u)]
    )
    prefix = L.project_prefix(b"ab")
    inside = [k for k in keys if k.startswith(prefix)]
    assert len(inside) == 2
    # Every key of "ab" sorts before the first key after the prefix (project + b"\x01").
    assert all(k < b"ab\x01" for k in inside)
    assert all(not k.startswith(prefix) for k in keys if k not in inside)


def test_by_changed_and_tomb_age_are_time_ascending() -> None:
    us = _uuids(10)
    keys = sorted(L.by_changed_key(t, u) for t, u in zip(range(10, 0, -1), us, strict=True))
    assert [L.time_of_changed_key(k) for k in keys] == list(range(1, 11))
    assert L.uuid_of_changed_key(L.by_changed_key(7, us[0])) == us[0]
    assert L.tomb_age_key(7, us[0]) == L.by_changed_key(7, us[0])


def test_timestamps_out_of_range_are_refused() -> None:
    u = _uuids(1)[0]
    for bad in (-1, 2**63):
        with pytest.raises(RecordError):
            L.by_project_key(b"p", bad, u)
        with pytest.raises(RecordError):
            L.by_changed_key(bad, u)


def test_keypair_keys_group_by_user_then_name() -> None:
    keys = sorted([L.keypair_key("bob", "b"), L.keypair_key("al", "z"), L.keypair_key("bob", "a")])
    assert keys == [b"al\x00z", b"bob\x00a", b"bob\x00b"]
    assert all(k.startswith(L.keypair_prefix("bob")) for k in keys[1:])


def test_frame_round_trip() -> None:
    body = msgpack.packb({"a": 1})
    frame = L.pack_frame(7, 11, 13, b"proj", body)
    assert L.unpack_frame_head(frame) == (7, 11, 13, b"proj", L.FRAME_SIZE + 4)
    assert frame[L.FRAME_SIZE + 4 :] == body
    assert L.frame_version(frame) == 7
    assert L.FRAME_T.unpack_from(frame, 16)[0] == 13


# -- the record -------------------------------------------------------------------------------
def test_sample_record_is_complete_and_about_1_5_kb() -> None:
    rec = sample_record(U1, 3)
    R.validate(rec)
    assert set(rec) == set(R.FIELD_NAMES)
    assert rec["schema"] == R.SCHEMA_VERSION and rec["version"] == 3
    assert 1000 < len(R.pack(rec)) < 2000
    assert R.unpack(R.pack(rec)) == rec


def test_every_field_has_one_owner_and_pending_is_api_owned() -> None:
    assert set(R.API_FIELDS) | set(R.CELL_FIELDS) == set(R.FIELD_NAMES)
    assert not set(R.API_FIELDS) & set(R.CELL_FIELDS)
    assert R.API_FIELDS == ("pending",)
    assert len(R.FIELD_NAMES) == len(set(R.FIELD_NAMES))


def test_record_covers_every_server_field_of_the_api_samples() -> None:
    # Where each key of Nova's server view comes from (reference/nova-api/api_samples, every
    # microversion).  hostId, links and status are derived; adminPass only in create replies.
    nova_keys = {
        "OS-DCF:diskConfig": "disk_config", "OS-EXT-AZ:availability_zone": "availability_zone",
        "OS-EXT-SRV-ATTR:host": "host", "OS-EXT-SRV-ATTR:hostname": "hostname",
        "OS-EXT-SRV-ATTR:hypervisor_hostname": "node",
        "OS-EXT-SRV-ATTR:instance_name": "instance_name",
        "OS-EXT-SRV-ATTR:kernel_id": "kernel_id", "OS-EXT-SRV-ATTR:launch_index": "launch_index",
        "OS-EXT-SRV-ATTR:ramdisk_id": "ramdisk_id",
        "OS-EXT-SRV-ATTR:reservation_id": "reservation_id",
        "OS-EXT-SRV-ATTR:root_device_name": "root_device_name",
        "OS-EXT-SRV-ATTR:user_data": "user_data", "OS-EXT-STS:power_state": "power_state",
        "OS-EXT-STS:task_state": "task_state", "OS-EXT-STS:vm_state": "vm_state",
        "OS-SRV-USG:launched_at": "launched_at", "OS-SRV-USG:terminated_at": "terminated_at",
        "accessIPv4": "access_ip_v4", "accessIPv6": "access_ip_v6", "addresses": "addresses",
        "config_drive": "config_drive", "created": "created_at", "description": "description",
        "fault": "fault", "flavor": "flavor", "hostId": "host", "host_status": "host_status",
        "id": "uuid", "image": "image", "key_name": "key_name", "links": "uuid",
        "locked": "locked", "locked_reason": "locked_reason", "metadata": "metadata",
        "name": "name", "os-extended-volumes:volumes_attached": "volumes_attached",
        "pinned_availability_zone": "pinned_availability_zone", "progress": "progress",
        "scheduler_hints": "scheduler_hints", "security_groups": "security_groups",
        "server_groups": "server_groups", "status": "status", "tags": "tags",
        "tenant_id": "project_id", "trusted_image_certificates": "trusted_image_certificates",
        "updated": "updated_at", "user_data": "user_data", "user_id": "user_id",
    }
    assert set(nova_keys.values()) <= set(R.FIELD_NAMES)
    # Sub-structures carry what the samples show.
    assert {k for k, _ in R.FLAVOR_KEYS} >= {"vcpus", "ram", "disk", "ephemeral", "swap",
                                             "extra_specs", "name", "id"}
    assert {k for k, _ in R.ADDRESS_KEYS} == {"addr", "version", "mac", "type"}
    assert {k for k, _ in R.VOLUME_KEYS} == {"id", "delete_on_termination"}
    assert {k for k, _ in R.FAULT_KEYS} == {"code", "message", "details", "created"}


def test_make_record_fills_defaults_and_derives_status() -> None:
    rec = R.make_record(
        {
            "uuid": U1, "version": 0, "cell": "cell1", "project_id": "p", "user_id": "u",
            "name": "vm", "vm_state": "active", "task_state": "rebooting_hard",
            "created_at": EPOCH_2024, "updated_at": EPOCH_2024,
            "flavor": {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1,
                       "ephemeral": 0, "swap": 0, "extra_specs": {}},
        }
    )
    assert rec["status"] == "HARD_REBOOT"
    assert rec["metadata"] == {} and rec["tags"] == [] and rec["pending"] == {}
    assert rec["image"] is None and rec["fault"] is None and rec["locked"] is False


def test_make_record_names_every_problem() -> None:
    with pytest.raises(RecordError) as e:
        R.make_record({"uuid": U1, "locked": "yes", "flavor": {"id": 1}})
    text = str(e.value)
    for problem in ("version: missing", "locked: expected bool, got str",
                    "flavor: key 'id': expected str", "created_at: missing"):
        assert problem in text
    with pytest.raises(RecordError, match="unknown record field"):
        R.make_record({"uuid": U1, "colour": "red"})


@pytest.mark.parametrize(
    "field,value",
    [
        ("version", -1), ("version", True), ("created_at", -5), ("power_state", "1"),
        ("tags", ["a", 1]), ("metadata", {"a": 1}), ("addresses", {"n": [{"addr": "x"}]}),
        ("fault", {"code": 500}), ("image", {"id": "x"}), ("locked", 1),
        ("project_id", ""), ("project_id", "a\x00b"), ("cell", "x" * 256),
    ],
)
def test_validate_refuses_bad_values(field: str, value: object) -> None:
    rec = sample_record(U1)
    rec[field] = value
    with pytest.raises(RecordError, match=field):
        R.validate(rec)


@pytest.mark.parametrize(
    "vm,task,status",
    [
        ("active", None, "ACTIVE"), ("active", "rebooting", "REBOOT"),
        ("active", "resize_prep", "RESIZE"), ("building", "spawning", "BUILD"),
        ("stopped", None, "SHUTOFF"), ("stopped", "rebuilding", "REBUILD"),
        ("resized", None, "VERIFY_RESIZE"), ("resized", "resize_reverting", "REVERT_RESIZE"),
        ("paused", "migrating", "MIGRATING"), ("error", "rebuild_spawning", "REBUILD"),
        ("soft-delete", None, "SOFT_DELETED"), ("shelved_offloaded", None, "SHELVED_OFFLOADED"),
        ("deleted", None, "DELETED"), ("martian", None, "UNKNOWN"), ("active", "deleting", "ACTIVE"),
    ],
)
def test_status_from_state_is_novas_map(vm: str, task: str | None, status: str) -> None:
    assert R.status_from_state(vm, task) == status


def test_index_entry_projection() -> None:
    rec = sample_record(U1, tags=["a", "b"], locked=True)
    e = R.index_entry(rec)
    assert e.project_id == rec["project_id"] and e.created_at == rec["created_at"]
    assert e.flavor_id == "1" and e.image_id == rec["image"]["id"]
    assert e.tags == ["a", "b"] and e.locked is True and e.deleted is False
    assert e.ips == [a["addr"] for a in rec["addresses"]["private"]]
    assert (e.vcpus, e.ram) == (1, 2048)
    assert R.unpack_index(R.pack_index(e)) == e
    assert R.index_entry(rec, deleted=True).status == "DELETED"
    volume_booted = sample_record(U1, image=None)
    assert R.index_entry(volume_booted).image_id is None
    assert "updated_at" not in R.INDEX_FIELDS  # see record.py: updates then skip the index


def test_docs_describe_every_database_and_field() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "store.md").read_text()
    for name in L.DATABASES:
        assert f"| `{name.decode()}` |" in doc, name
    for field in R.FIELD_NAMES:
        assert f"| `{field}` |" in doc, field
    for field in R.INDEX_FIELDS:
        assert f"| `{field}` |" in doc, field
    for name in L.DATABASES:  # and the module docstring, the other home of the layout
        assert f"``{name.decode()}``" in (L.__doc__ or ""), name


# -- validate's quick pass decides as the full pass does ---------------------------------------
class _Dict(dict):  # type: ignore[type-arg]
    pass


class _Str(str):
    pass


_ODD_VALUES = [None, True, False, 0, 1, -1, 2**64, "", "x", "a\x00b", _Str("s"), 1.0, [], ["a"],
               ["a", 1], {}, {"a": "b"}, {"a": 1}, _Dict(), _Dict(a="b"),
               {"id": "1", "properties": {}}, {"n": [{"addr": "x"}]}]


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(R.FIELD_NAMES + ("colour",)),
                                st.sampled_from(range(len(_ODD_VALUES) + 1))),
                      max_size=3))
def test_validate_quick_pass_agrees_with_the_full_pass(edits: list[tuple[str, int]]) -> None:
    """The quick pass only ever accepts (exact types); whatever it does not accept the full
    pass decides, so validate (and make_record) accept exactly the records the full pass
    accepts."""
    rec = sample_record(U1, seed=len(edits))
    for name, i in edits:
        if i == len(_ODD_VALUES):
            rec.pop(name, None)
        else:
            rec[name] = _ODD_VALUES[i]
    try:
        R._validate_all(rec)
    except RecordError as e:
        with pytest.raises(RecordError) as got:
            R.validate(rec)
        assert str(got.value) == str(e)
        if set(R.FIELD_NAMES) <= set(rec):  # (a missing field make_record would fill in)
            with pytest.raises(RecordError):  # make_record checks as it builds: same verdict
                R.make_record(rec)
    else:
        R.validate(rec)
        assert R.make_record(rec) == rec


def test_validate_accepts_subclasses_as_before() -> None:
    rec = sample_record(U1)
    rec["metadata"] = _Dict(rec["metadata"])
    rec["name"] = _Str("vm")
    rec["flavor"] = _Dict(rec["flavor"], id=_Str("1"))
    R.validate(rec)
