"""Catalogue writes -- keypairs, flavors and extra specs, quota sets -- against Nova's samples
and rules per microversion; their effect on the read routes (the flavor answers cached per
worker follow the generation bump); the budget: 1 read + 1 write transaction per accepted
write, no write when refused before the commit."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath.api import catalog_commands as CC
from fastpath.api.views import render_server
from fastpath.store import Batch, Upsert
from fastpath.store.changes import Catalog
from fastpath.store.samples import sample_record
from tests.unit.catalog_support import ADMIN_TOKEN, PROJECT, TOKEN, USER, Server, sample, seed
from tests.unit.command_support import cmd, err, get
from tests.unit.conftest import Response


@pytest.fixture
def srv(make_server: Any) -> Server:
    s: Server = make_server(extra_routes=False)
    return s


KP = f"/v2.1/{PROJECT}/os-keypairs"


# -- keypairs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("folder,version,status", [
    ("", "2.1", 200), ("v2.2/", "2.2", 201), ("v2.10/", "2.10", 201), ("v2.92/", "2.92", 201),
])
def test_keypair_import_samples(srv: Server, folder: str, version: str, status: int) -> None:
    req = sample(f"os-keypairs/{folder}keypairs-import-post-req.json")
    want = sample(f"os-keypairs/{folder}keypairs-import-post-resp.json")
    want["keypair"]["name"] = req["keypair"]["name"]  # the samples' names differ
    r = cmd(srv, "POST", KP, req, version=version)
    assert (r.status, r.json()) == (status, want)
    shown = get(srv, f"{KP}/{req['keypair']['name'].replace(' ', '%20')}", version=version).json()
    assert shown["keypair"]["fingerprint"] == want["keypair"]["fingerprint"]
    assert shown["keypair"]["public_key"] == req["keypair"]["public_key"]


def test_keypair_generation(srv: Server) -> None:
    r = cmd(srv, "POST", KP, {"keypair": {"name": "gen"}})
    k = r.json()["keypair"]
    assert r.status == 200 and set(k) == {"name", "public_key", "fingerprint", "user_id",
                                          "private_key"}
    assert k["private_key"].startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    assert k["public_key"].startswith("ssh-rsa ") and k["public_key"].endswith(" Generated-by-Nova\n")
    assert k["fingerprint"] == CC.ssh_fingerprint(k["public_key"])
    assert get(srv, f"{KP}/gen").json()["keypair"]["fingerprint"] == k["fingerprint"]
    r = cmd(srv, "POST", KP, {"keypair": {"name": "cert", "type": "x509"}}, version="2.2")
    k = r.json()["keypair"]
    assert r.status == 201 and k["type"] == "x509"
    assert k["public_key"].startswith("-----BEGIN CERTIFICATE-----")
    assert k["fingerprint"] == CC.x509_fingerprint(k["public_key"])
    # 2.92: import only.
    msg = err(cmd(srv, "POST", KP, {"keypair": {"name": "x"}}, version="2.92"), 400)
    assert msg == ("Invalid input for field/attribute keypair. Value: {'name': 'x'}. "
                   "'public_key' is a required property")


def test_keypair_rules(srv: Server) -> None:
    pub = sample("os-keypairs/keypairs-import-post-req.json")["keypair"]["public_key"]

    def post(name: str, version: str = "2.10", token: str = TOKEN, **extra: Any) -> Response:
        return cmd(srv, "POST", KP, {"keypair": {"name": name, "public_key": pub, **extra}},
                   token=token, version=version)

    assert err(post("a@b"), 400) == (
        "Invalid input for field/attribute name. Value: a@b. 'a@b' does not match "
        "'^[_\\\\- a-zA-Z0-9]+$'")
    assert err(post(" lead"), 400) == ("An invalid 'name' value was provided. The name must "
                                       "be: printable characters. Can not start or end with "
                                       "whitespace.")
    assert post("a@b.c", "2.92").status == 201
    assert err(post("a@b.c", "2.92"), 409) == "Key pair 'a@b.c' already exists."
    assert err(post("n" * 256), 400).startswith("Invalid input for field/attribute name.")
    assert err(post("", "2.10"), 400).startswith("Invalid input for field/attribute name.")
    assert err(post("k", type="rsa", version="2.2"), 400).startswith(
        "Invalid input for field/attribute type. Value: rsa.")
    assert err(post("k", type="ssh", version="2.1"), 400) == (
        "Invalid input for field/attribute keypair. Value: {'name': 'k', 'public_key': "
        f"'{pub}', 'type': 'ssh'}}. Additional properties are not allowed ('type' was unexpected)")
    assert err(cmd(srv, "POST", KP, {"keypair": {"name": "bad", "public_key": "ssh-rsa AAAA"}}),
               400) == "Keypair data is invalid: failed to generate fingerprint"
    # user_id (2.10): another user's keypair only for admins.
    assert err(post("k", user_id="other"), 403) == (
        "Policy doesn't allow os_compute_api:os-keypairs:create to be performed.")
    r = post("k", user_id="other", token=ADMIN_TOKEN)
    assert r.status == 201 and r.json()["keypair"]["user_id"] == "other"
    assert get(srv, f"{KP}/k?user_id=other", ADMIN_TOKEN, "2.10").status == 200
    # Quota key_pairs (the caller project's limit, per user).
    seed(srv, Catalog.QUOTA_LIMITS, {PROJECT: {"key_pairs": 2}})
    assert post("second").status == 201
    assert err(post("third"), 403) == "Quota exceeded, too many key pairs."


def test_keypair_delete(srv: Server) -> None:
    pub = sample("os-keypairs/keypairs-import-post-req.json")["keypair"]["public_key"]
    for name in ("a", "b"):
        cmd(srv, "POST", KP, {"keypair": {"name": name, "public_key": pub}})
    assert cmd(srv, "DELETE", f"{KP}/a").status == 202  # 2.1
    assert cmd(srv, "DELETE", f"{KP}/b", version="2.2").status == 204
    assert err(cmd(srv, "DELETE", f"{KP}/b", version="2.2"), 404) == (
        f"Keypair b not found for user {USER}")
    assert err(get(srv, f"{KP}/a"), 404) == f"Keypair a not found for user {USER}"
    # 2.10: ?user_id= for admins; 2.75: nothing else in the query.
    cmd(srv, "POST", KP, {"keypair": {"name": "c", "public_key": pub, "user_id": "u2"}},
        token=ADMIN_TOKEN, version="2.10")
    assert err(cmd(srv, "DELETE", f"{KP}/c?user_id=u2", version="2.10"), 403) == (
        "Policy doesn't allow os_compute_api:os-keypairs:delete to be performed.")
    assert err(cmd(srv, "DELETE", f"{KP}/c?user_id=u2&x=1", token=ADMIN_TOKEN, version="2.75"),
               400) == "Additional properties are not allowed ('x' was unexpected)"
    assert cmd(srv, "DELETE", f"{KP}/c?user_id=u2", token=ADMIN_TOKEN, version="2.75").status == 204


# -- flavors -------------------------------------------------------------------------------------
FL = f"/v2.1/{PROJECT}/flavors"


@pytest.mark.parametrize("folder,version", [
    ("", "2.1"), ("v2.55/", "2.55"), ("v2.61/", "2.61"), ("v2.75/", "2.75"), ("v2.102/", "2.102"),
])
def test_flavor_create_samples(srv: Server, folder: str, version: str) -> None:
    req = sample(f"flavor-manage/{folder}flavor-create-post-req.json")
    want = sample(f"flavor-manage/{folder}flavor-create-post-resp.json")
    r = cmd(srv, "POST", FL, req, token=ADMIN_TOKEN, version=version)
    assert (r.status, r.json()) == (200, want)
    shown = get(srv, f"{FL}/10", version=version)
    assert shown.json() == want


def test_flavor_cache_follows_writes(srv: Server) -> None:
    """The per-worker cache of flavor answers is renewed by the write's generation bump."""
    before = get(srv, f"{FL}/detail").json()["flavors"]
    assert get(srv, f"{FL}/detail").json()["flavors"] == before  # cached now
    body = {"flavor": {"name": "f1", "ram": 512, "vcpus": 1, "disk": 1, "id": "f1"}}
    assert cmd(srv, "POST", FL, body, token=ADMIN_TOKEN).status == 200
    assert [f["id"] for f in get(srv, f"{FL}/detail").json()["flavors"]] == [
        *[f["id"] for f in before], "f1"]
    assert cmd(srv, "PUT", f"{FL}/f1", {"flavor": {"description": "d"}}, token=ADMIN_TOKEN,
               version="2.55").json()["flavor"]["description"] == "d"
    assert get(srv, f"{FL}/f1", version="2.55").json()["flavor"]["description"] == "d"
    assert cmd(srv, "POST", f"{FL}/f1/os-extra_specs", {"extra_specs": {"hw:numa_nodes": 2}},
               token=ADMIN_TOKEN).json() == {"extra_specs": {"hw:numa_nodes": 2}}
    assert get(srv, f"{FL}/f1/os-extra_specs").json() == {"extra_specs": {"hw:numa_nodes": "2"}}
    assert get(srv, f"{FL}/f1", version="2.61").json()["flavor"]["extra_specs"] == {
        "hw:numa_nodes": "2"}
    assert cmd(srv, "DELETE", f"{FL}/f1", token=ADMIN_TOKEN).status == 202
    assert [f["id"] for f in get(srv, f"{FL}/detail").json()["flavors"]] == [
        f["id"] for f in before]
    assert err(get(srv, f"{FL}/f1"), 404) == "Flavor f1 could not be found."


def test_flavor_rules(srv: Server) -> None:
    def post(flavor: dict[str, Any], token: str = ADMIN_TOKEN, version: str = "2.1") -> Response:
        base = {"name": "n", "ram": 512, "vcpus": 1, "disk": 1}
        return cmd(srv, "POST", FL, {"flavor": {**base, **flavor}}, token=token, version=version)

    # Validation comes first, then the admin policy.
    assert err(post({"ram": 0}, token=TOKEN), 400) == (
        "Invalid input for field/attribute ram. Value: 0. 0 is less than the minimum of 1")
    assert err(post({}, token=TOKEN), 403) == (
        "Policy doesn't allow os_compute_api:os-flavor-manage:create to be performed.")
    assert err(post({"ram": ""}), 400) == (
        "Invalid input for field/attribute ram. Value: . '' does not match '^[0-9]+$'")
    assert err(post({"disk": "-1"}), 400).startswith("Invalid input for field/attribute disk.")
    assert err(post({"id": " x"}), 400).startswith("Invalid input for field/attribute id.")
    assert err(post({"rxtx_factor": 0}), 400).startswith(
        "Invalid input for field/attribute rxtx_factor.")
    assert err(post({"rxtx_factor": 1.0}, version="2.102"), 400).endswith(
        "Additional properties are not allowed ('rxtx_factor' was unexpected)")
    assert err(post({"description": "d"}, version="2.54"), 400).endswith(
        "Additional properties are not allowed ('description' was unexpected)")
    assert err(post({"os-flavor-access:is_public": "maybe"}), 400).startswith(
        "Invalid input for field/attribute os-flavor-access:is_public.")
    # Auto id (a uuid), string numbers accepted, private flavors.
    r = post({"name": "auto", "ram": "256", "os-flavor-access:is_public": "false"})
    f = r.json()["flavor"]
    assert len(f["id"]) == 36 and f["ram"] == 256 and f["os-flavor-access:is_public"] is False
    assert err(get(srv, f"{FL}/{f['id']}"), 404)  # private: not for the project
    assert err(post({"name": "auto", "id": 7}), 409) == "Flavor with name auto already exists."
    assert post({"name": "seven", "id": 7}).json()["flavor"]["id"] == "7"
    assert err(post({"name": "other", "id": "7"}), 409) == "Flavor with ID 7 already exists."
    # Update (2.55) and delete.
    assert err(cmd(srv, "PUT", f"{FL}/7", {"flavor": {"description": "x"}}, token=ADMIN_TOKEN,
                   version="2.54"), 404) == "The resource could not be found."
    assert err(cmd(srv, "PUT", f"{FL}/7", {"flavor": {}}, token=ADMIN_TOKEN, version="2.55"),
               400) == "Invalid input for field/attribute flavor. Value: {}. " \
                       "'description' is a required property"
    assert err(cmd(srv, "PUT", f"{FL}/nope", {"flavor": {"description": None}},
                   token=ADMIN_TOKEN, version="2.55"), 404) == "Flavor nope could not be found."
    assert err(cmd(srv, "DELETE", f"{FL}/7"), 403) == (
        "Policy doesn't allow os_compute_api:os-flavor-manage:delete to be performed.")
    assert err(cmd(srv, "DELETE", f"{FL}/nope", token=ADMIN_TOKEN), 404) == (
        "Flavor nope could not be found.")


def test_flavor_update_sample(srv: Server) -> None:
    seed(srv, Catalog.FLAVORS, {"1": {"id": "1", "name": "m1.tiny", "ram": 512, "vcpus": 1,
                                      "disk": 1}})
    for folder, version in (("v2.55/", "2.55"), ("v2.61/", "2.61"), ("v2.75/", "2.75")):
        req = sample(f"flavor-manage/{folder}flavor-update-req.json")
        want = sample(f"flavor-manage/{folder}flavor-update-resp.json")
        r = cmd(srv, "PUT", f"{FL}/1", req, token=ADMIN_TOKEN, version=version)
        assert (r.status, r.json()) == (200, want), version


def test_extra_specs(srv: Server) -> None:
    seed(srv, Catalog.FLAVORS, {"1": {"id": "1", "name": "m1.tiny", "ram": 512, "vcpus": 1,
                                      "disk": 1}})
    es = f"{FL}/1/os-extra_specs"
    req = sample("flavor-extra-specs/flavor-extra-specs-create-req.json")
    r = cmd(srv, "POST", es, req, token=ADMIN_TOKEN)
    assert (r.status, r.json()) == (200, sample("flavor-extra-specs/flavor-extra-specs-create-resp.json"))
    req = sample("flavor-extra-specs/flavor-extra-specs-update-req.json")
    r = cmd(srv, "PUT", es + "/hw:numa_nodes", req, token=ADMIN_TOKEN)
    assert (r.status, r.json()) == (200, sample("flavor-extra-specs/flavor-extra-specs-update-resp.json"))
    assert get(srv, es + "/hw:numa_nodes").json() == {"hw:numa_nodes": "2"}
    r = cmd(srv, "DELETE", es + "/hw:cpu_policy", token=ADMIN_TOKEN)
    assert (r.status, r.body) == (200, b"")  # Nova: no @wsgi.response, so 200
    assert get(srv, es).json() == {"extra_specs": {"hw:numa_nodes": "2"}}
    assert err(cmd(srv, "DELETE", es + "/hw:cpu_policy", token=ADMIN_TOKEN), 404) == (
        "Flavor 1 has no extra specs with key hw:cpu_policy.")
    assert err(cmd(srv, "PUT", es + "/a", {"b": "1"}, token=ADMIN_TOKEN), 400) == (
        "Request body and URI mismatch")
    assert err(cmd(srv, "PUT", es + "/a", {"a": "1", "b": "2"}, token=ADMIN_TOKEN), 400) == (
        "{'a': '1', 'b': '2'} has too many properties")
    assert err(cmd(srv, "POST", es, {"extra_specs": {"a": "1"}}), 403) == (
        "Policy doesn't allow os_compute_api:os-flavor-extra-specs:create to be performed.")
    assert err(cmd(srv, "POST", f"{FL}/nope/os-extra_specs", {"extra_specs": {"a": "1"}},
                   token=ADMIN_TOKEN), 404) == "Flavor nope could not be found."
    # 2.86: known extra specs are validated; unknown keys of Nova's namespaces refused.
    bad = {"extra_specs": {"hw:numa_nodes": "zero"}}
    assert cmd(srv, "POST", es, bad, token=ADMIN_TOKEN, version="2.85").status == 200
    assert err(cmd(srv, "POST", es, bad, token=ADMIN_TOKEN, version="2.86"), 400) == (
        "Validation failed; 'zero' is not a valid integer value.")
    for spec, message in ((("hw:numa_nodes", "0"), "'0' is less than the min value of '1'"),
                          (("hw:cpu_policy", "x"), "'x' is not one of: dedicated, shared, mixed"),
                          (("hw_rng:allowed", "maybe"), "'maybe' is not a valid boolean-like value"),
                          (("trait:HW_CPU_X86_AVX", "yes"), "'yes' is not one of: required, forbidden")):
        assert err(cmd(srv, "POST", es, {"extra_specs": dict([spec])}, token=ADMIN_TOKEN,
                       version="2.86"), 400) == f"Validation failed; {message}."
    assert cmd(srv, "POST", es, {"extra_specs": {"resources:VCPU": "2",
                                                 "trait:HW_CPU_X86_AVX": "required"}},
               token=ADMIN_TOKEN, version="2.86").status == 200
    assert err(cmd(srv, "POST", es, {"extra_specs": {"hw:nonsense": "1"}}, token=ADMIN_TOKEN,
                   version="2.86"), 400) == (
        "Validation failed; extra spec 'hw:nonsense' does not appear to be a valid extra spec.")
    assert cmd(srv, "POST", es, {"extra_specs": {"custom:thing": "1", "plain": "x"}},
               token=ADMIN_TOKEN, version="2.86").status == 200


# -- quota sets -----------------------------------------------------------------------------------
QS = f"/v2.1/{PROJECT}/os-quota-sets/{PROJECT}"


@pytest.mark.parametrize("folder,version", [("", "2.1"), ("v2.36/", "2.36"), ("v2.57/", "2.57")])
def test_quota_update_samples(srv: Server, folder: str, version: str) -> None:
    for kind in ("quotas-update-post", "quotas-update-force-post"):
        req = sample(f"os-quota-sets/{folder}{kind}-req.json")
        want = sample(f"os-quota-sets/{folder}{kind}-resp.json")
        cmd(srv, "DELETE", QS, token=ADMIN_TOKEN, version=version, budget=(0, 1))
        r = cmd(srv, "PUT", QS, req, token=ADMIN_TOKEN, version=version)
        assert (r.status, r.json()) == (200, want), kind
        shown = get(srv, QS, ADMIN_TOKEN, version).json()["quota_set"]
        assert shown == {"id": PROJECT, **want["quota_set"]}


def test_quota_rules(srv: Server) -> None:
    store = srv.plan.context.store
    for i in range(3):  # usage: 3 instances, 3 cores, 6144 MB
        u = f"00000000-0000-4000-8000-00000000000{i}"
        store.apply(Batch([Upsert(u, 1, sample_record(u, seed=i))]), render_server)
    assert err(cmd(srv, "PUT", QS, {"quota_set": {"instances": 2}}, token=ADMIN_TOKEN), 400) == (
        "Quota limit 2 for instances must be greater than or equal to already used and "
        "reserved 3.")
    assert cmd(srv, "PUT", QS, {"quota_set": {"instances": 3, "cores": -1}},
               token=ADMIN_TOKEN).json()["quota_set"]["cores"] == -1
    r = cmd(srv, "PUT", QS, {"quota_set": {"instances": 1, "force": True}}, token=ADMIN_TOKEN)
    assert r.json()["quota_set"]["instances"] == 1
    limits = get(srv, "/v2.1/limits").json()["limits"]["absolute"]
    assert (limits["maxTotalInstances"], limits["maxTotalCores"]) == (1, -1)
    assert err(cmd(srv, "PUT", QS, {"quota_set": {"instances": 5}}), 403) == (
        "Policy doesn't allow os_compute_api:os-quota-sets:update to be performed.")
    for v in ("2.1", "2.36"):  # the networks quota is gone (Train): not in any schema
        assert err(cmd(srv, "PUT", QS, {"quota_set": {"networks": 5}}, token=ADMIN_TOKEN,
                       version=v), 400).endswith("('networks' was unexpected)")
    assert err(cmd(srv, "PUT", QS, {"quota_set": {"fixed_ips": 5}}, token=ADMIN_TOKEN,
                   version="2.36"), 400).endswith("('fixed_ips' was unexpected)")
    assert err(cmd(srv, "PUT", QS, {"quota_set": []}, token=ADMIN_TOKEN), 400) == (
        "Invalid input for field/attribute quota_set. Value: []. [] is not of type 'object'")
    assert err(cmd(srv, "PUT", QS, {"quota_set": {"ram": -2}}, token=ADMIN_TOKEN), 400) == (
        "Invalid input for field/attribute ram. Value: -2. -2 is less than the minimum of -1")
    assert err(cmd(srv, "PUT", QS, {"quota_set": {"ram": "x"}}, token=ADMIN_TOKEN), 400) == (
        "Invalid input for field/attribute ram. Value: x. 'x' does not match '^-?[0-9]+$'")
    assert err(cmd(srv, "DELETE", QS), 403) == (
        "Policy doesn't allow os_compute_api:os-quota-sets:delete to be performed.")
    assert cmd(srv, "DELETE", QS, token=ADMIN_TOKEN, budget=(0, 1)).status == 202
    assert get(srv, QS, ADMIN_TOKEN).json()["quota_set"]["instances"] == 10  # the default


def test_odd_ids_are_nova_errors_not_500s(srv: Server) -> None:
    """Ids the store cannot key (over 255 bytes, NUL) answer 400/404, never 500."""
    long = "x" * 600
    for method, path, body, status in [
        ("DELETE", f"{FL}/{long}", None, 404),
        ("PUT", f"{FL}/{long}", {"flavor": {"description": "d"}}, 404),
        ("POST", f"{FL}/{long}/os-extra_specs", {"extra_specs": {"a": "b"}}, 404),
        ("DELETE", f"{FL}/{long}/os-extra_specs/a", None, 404),
        ("DELETE", f"{KP}/{long}", None, 404),
        ("DELETE", f"{KP}/k%00x", None, 404),
    ]:
        assert cmd(srv, method, path, body, token=ADMIN_TOKEN, version="2.60").status == status
    qs = f"/v2.1/os-quota-sets/{'p' * 300}"
    assert err(cmd(srv, "PUT", qs, {"quota_set": {"cores": 3}}, token=ADMIN_TOKEN), 400) == (
        f"Project ID {'p' * 300} is not a valid project.")
    assert err(cmd(srv, "DELETE", qs, token=ADMIN_TOKEN), 400).startswith("Project ID p")
    for user in ("u" * 300, "a\x00b"):
        body = {"keypair": {"name": "k", "public_key": "ssh-rsa AAAA", "user_id": user}}
        assert err(cmd(srv, "POST", KP, body, token=ADMIN_TOKEN, version="2.10"), 400) == (
            f"Keypair data is invalid: user_id {user} is not a valid user id")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)
_ROUTES = [
    ("POST", KP, "keypair", ("name", "public_key", "type", "user_id")),
    ("POST", FL, "flavor", ("name", "id", "ram", "vcpus", "disk", "swap", "rxtx_factor",
                            "OS-FLV-EXT-DATA:ephemeral", "os-flavor-access:is_public",
                            "description")),
    ("PUT", f"{FL}/1", "flavor", ("description",)),
    ("POST", f"{FL}/1/os-extra_specs", "extra_specs", ("hw:numa_nodes", "a", "trait:X")),
    ("PUT", f"/v2.1/os-quota-sets/{PROJECT}", "quota_set", ("cores", "force", "ram", "x")),
]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(_ROUTES), data=st.data(),
       version=st.sampled_from(["2.1", "2.2", "2.10", "2.55", "2.86", "2.92", "2.102"]))
def test_fuzz_bodies(srv: Server, route: tuple[str, str, str, tuple[str, ...]], data: Any,
                     version: str) -> None:
    """Any JSON body: a Nova answer, never a 500; a refusal writes nothing (cmd checks)."""
    method, path, top, keys = route
    inner = data.draw(st.dictionaries(st.sampled_from(keys), _JSON, max_size=4) | _JSON)
    body = data.draw(st.just({top: inner}) | _JSON)
    r = cmd(srv, method, path, body, token=ADMIN_TOKEN, version=version)
    assert r.status < 500, (method, path, body, r.body)
