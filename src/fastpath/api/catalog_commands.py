"""Catalogue writes: keypairs, flavors (with extra specs) and quota sets
(nova/api/openstack/compute/keypairs.py, flavor_manage.py, flavors_extraspecs.py,
quota_sets.py; compute.KeypairAPI, compute/flavors.py).

================================================  ========  ===========================
route                                             status    who
================================================  ========  ===========================
``POST   /os-keypairs``                           200/201   the user (2.10: admin for
                                                            another ``user_id``)
``DELETE /os-keypairs/{name}``                    202/204   likewise (``?user_id=``)
``POST   /flavors``                               200       admin
``PUT    /flavors/{id}``  (2.55: description)     200       admin
``DELETE /flavors/{id}``                          202       admin
``POST   /flavors/{id}/os-extra_specs``           200       admin
``PUT    /flavors/{id}/os-extra_specs/{key}``     200       admin
``DELETE /flavors/{id}/os-extra_specs/{key}``     200       admin
``PUT    /os-quota-sets/{project_id}``            200       admin
``DELETE /os-quota-sets/{project_id}``            202       admin
================================================  ========  ===========================

This data belongs to the API (no cell owns it): a write is one catalogue put in the worker's
group commit, no outbox entry.  Each request validates its body first (no store call),
then what the store decides (duplicates, quota, usage, existence) in its one read
transaction -- a refusal there writes nothing -- and submits one ``work`` that checks the
same again inside the write transaction (a command of the same group may have taken the
name meanwhile) and puts the entry.  The put raises the table's generation, so every
worker's cached flavor answers (``api/flavors.py``) are renewed by the next request that
reads the new generation.

Keypair generation (before 2.92, no ``public_key``) uses ``cryptography`` (already what
Nova uses for fingerprints; OpenSSL's RSA, no subprocess), in a thread: a 2048-bit RSA key
costs ~100 ms of CPU, which must not stall the event loop.  It runs before the commit is
submitted (a work may run twice: nothing random inside it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from fastpath.api import common as C
from fastpath.api import flavors as F
from fastpath.api import keypairs as K
from fastpath.api import limits
from fastpath.api import query as Q
from fastpath.api import validation as V
from fastpath.api.context import ApiContext
from fastpath.api.links import Links
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, Conflict, Forbidden, NotFound
from fastpath.store import layout as L
from fastpath.store import record as R
from fastpath.store.apply import catalog_key
from fastpath.store.changes import Catalog
from fastpath.store.commands import CommandTxn
from fastpath.store.errors import RecordError
from fastpath.store.reader import Reader

MAX_INT = 0x7FFFFFFF  # nova.db.constants.MAX_INT
SQL_SP_FLOAT_MAX = 3.40282e38


async def _commit(ctx: ApiContext, work: Callable[[CommandTxn], Any]) -> Any:
    committer = ctx.committer
    assert committer is not None, "the worker has no committer"
    return await committer.submit(work)


def _project_key(project: str) -> str:
    """nova.api.openstack.identity.verify_project_id: a project id the store cannot key is
    not a project (400)."""
    try:
        L.name_bytes(project, "project")
    except RecordError:
        raise BadRequest(f"Project ID {project} is not a valid project.") from None
    return project


def _admin(req: Any, rule: str) -> None:
    """Nova's admin-only policies (``rule:admin_api``)."""
    if not req.is_admin:
        raise C.forbidden(rule)


def _json(req: Any, schema: V.Schema) -> Any:
    body = V.json_body(req)
    schema.validate(body)
    return body


# == keypairs =================================================================================
def _keypair_schema(version: int) -> V.Schema:
    """create (2.1), create_v22 (type), create_v210 (user_id), create_v292 (import only, the
    wider name charset)."""
    # parameter_types.keypair_name_special_chars (_v292: also '@' and '.').
    chars = r"^[_\-\@\. a-zA-Z0-9]+$" if version >= 92 else r"^[_\- a-zA-Z0-9]+$"
    props: dict[str, Any] = {"name": {"allOf": [V.name(), {
        "type": "string", "pattern": chars, "minLength": 1, "maxLength": 255}]}}
    if version >= 2:
        props["type"] = {"type": "string", "enum": ["ssh", "x509"]}
    props["public_key"] = {"type": "string"}
    if version >= 10:
        props["user_id"] = {"type": "string"}
    required = ["name", "public_key"] if version >= 92 else ["name"]
    return V.Schema({
        "type": "object",
        "properties": {"keypair": {"type": "object", "properties": props, "required": required,
                                   "additionalProperties": False}},
        "required": ["keypair"], "additionalProperties": False,
    })


_KEYPAIR_SCHEMAS = {v: _keypair_schema(v) for v in (1, 2, 10, 92)}


def _keypair_schema_at(version: int) -> V.Schema:
    return _KEYPAIR_SCHEMAS[92 if version >= 92 else 10 if version >= 10 else 2 if version >= 2 else 1]


def _invalid_keypair(reason: str) -> BadRequest:
    return BadRequest(f"Keypair data is invalid: {reason}")


def _colon_hex(digest: str) -> str:
    return ":".join(a + b for a, b in zip(digest[::2], digest[1::2], strict=True))


def ssh_fingerprint(public_key: str) -> str:
    """nova.crypto.generate_fingerprint: the key must load; MD5 of its blob, colon hex."""
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_ssh_public_key(public_key.encode("utf-8"))
        blob = base64.b64decode(public_key.split(" ")[1])
    except Exception:  # noqa: BLE001 - any failure is Nova's one message
        raise _invalid_keypair("failed to generate fingerprint") from None
    return _colon_hex(hashlib.md5(blob, usedforsecurity=False).hexdigest())


def x509_fingerprint(pem: str) -> str:
    """nova.crypto.generate_x509_fingerprint: SHA-1 of the certificate, colon hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(pem.encode("utf-8"))
        raw = binascii.hexlify(cert.fingerprint(hashes.SHA1())).decode("ascii")
    except (ValueError, TypeError, binascii.Error) as ex:
        raise _invalid_keypair(f"failed to generate X509 fingerprint. Error message: {ex}") from None
    return _colon_hex(raw)


def generate_ssh_keypair(bits: int = 2048) -> tuple[str, str, str]:
    """(private key PEM, public key, fingerprint), as nova.crypto.generate_key_pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode("ascii")
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode("ascii")
    public = f"{blob} Generated-by-Nova\n"
    return private, public, ssh_fingerprint(public)


def generate_x509_keypair(user_id: str, bits: int = 2048) -> tuple[str, str, str]:
    """(private key PEM, certificate PEM, fingerprint): nova.crypto.generate_winrm_x509_cert,
    a self-signed client certificate for ``user_id`` valid for ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user_id)])
    now = dt.datetime.now(dt.UTC)
    upn = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")  # Microsoft UPN, as Nova's openssl config
    der_upn = b"\x0c" + bytes([len(f"{user_id}@localhost")]) + f"{user_id}@localhost".encode()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.OtherName(upn, der_upn)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return private, pem, x509_fingerprint(pem)


def _keypair_quota(r: Reader, user: str, project: str) -> None:
    """Quotas.check_deltas(key_pairs: +1) for the user, against the caller's project limit.

    PERF: the user's keypairs are counted by key, without decoding them, and only up to the
    limit (a user with thousands of keypairs and no limit costs nothing here)."""
    allowed = limits.project_limits(r, project)["key_pairs"]
    if allowed >= 0 and _count_keypairs(r, user, allowed) + 1 > allowed:
        raise Forbidden("Quota exceeded, too many key pairs.")


def _count_keypairs(r: Reader, user: str, cap: int) -> int:
    """How many keypairs ``user`` has, counting at most ``cap``."""
    try:
        prefix = L.keypair_prefix(user)
    except RecordError:
        return 0
    cur = r.txn.cursor(db=r.dbs.keypairs)
    n = 0
    if not cur.set_range(prefix):
        return 0
    for key in cur.iternext(keys=True, values=False):
        if n >= cap or bytes(key[: len(prefix)]) != prefix:
            break
        n += 1
    return n


def _keypair_exists(name: str) -> Conflict:
    return Conflict(f"Key pair '{name}' already exists.")


class CatalogRoutes:
    """The catalogue write handlers of one worker."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    # -- keypairs ---------------------------------------------------------------------------
    async def create_keypair(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        params = _json(req, _keypair_schema_at(version))["keypair"]
        name = str(params["name"]).strip()  # common.normalize_name
        key_type = params.get("type", "ssh") if version >= 2 else "ssh"
        user = (params.get("user_id") if version >= 10 else None) or req.user or ""
        if user != req.user and not req.is_admin:
            raise C.forbidden("os_compute_api:os-keypairs:create")
        try:
            L.keypair_key(user, name)
        except RecordError:  # Nova's user_id column holds 255 characters
            raise _invalid_keypair(f"user_id {user} is not a valid user id") from None
        project = req.project or ""
        with self.store.read() as r:
            _keypair_quota(r, user, project)
            taken = r.keypair(user, name) is not None
        private: str | None = None
        if "public_key" in params:
            public = params["public_key"]
            fingerprint = (x509_fingerprint(public) if key_type == "x509"
                           else ssh_fingerprint(public))
        else:  # generation (2.1-2.91): OpenSSL in a thread, before the commit
            loop = asyncio.get_running_loop()
            if key_type == "x509":
                private, public, fingerprint = await loop.run_in_executor(
                    None, generate_x509_keypair, user)
            else:
                private, public, fingerprint = await loop.run_in_executor(
                    None, generate_ssh_keypair)
        if taken:
            raise _keypair_exists(name)
        now = R.now_us()
        entry = {"name": name, "user_id": user, "public_key": public, "fingerprint": fingerprint,
                 "type": key_type, "id": secrets.randbelow(MAX_INT) + 1, "created_at": now,
                 "updated_at": None}

        def work(c: CommandTxn) -> None:
            _keypair_quota(c.reader, user, project)
            if c.reader.keypair(user, name) is not None:
                raise _keypair_exists(name)
            c.put_catalog(Catalog.KEYPAIRS, (user, name), entry)

        await _commit(self.ctx, work)
        view: dict[str, Any] = {"name": name, "public_key": public, "fingerprint": fingerprint,
                                "user_id": user}
        if private is not None:
            view["private_key"] = private
        if version >= 2:
            view["type"] = key_type
        return (201 if version >= 2 else 200), C.dumps({"keypair": view})

    async def delete_keypair(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        q = Q.Query.of(req)
        if version >= 10:
            q = Q.validate(q, {"user_id": Q.any_string}, version < 75)
        user = K._user(req, q, "delete")
        name = req.params[0]

        def missing() -> NotFound:
            return NotFound(f"Keypair {name} not found for user {user}")

        with self.store.read() as r:
            if r.keypair(user, name) is None:
                raise missing()

        def work(c: CommandTxn) -> None:
            if c.reader.keypair(user, name) is None:
                raise missing()
            c.put_catalog(Catalog.KEYPAIRS, (user, name), None)

        await _commit(self.ctx, work)
        return (204 if version >= 2 else 202), b""

    # -- flavors ----------------------------------------------------------------------------
    async def create_flavor(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        vals = _json(req, _flavor_schema_at(version))["flavor"]
        _admin(req, "os_compute_api:os-flavor-manage:create")
        entry = flavor_entry(vals, version)
        fid, name = entry["id"], entry["name"]

        def check(r: Reader) -> None:
            if r.flavor(fid) is not None:
                raise Conflict(f"Flavor with ID {fid} already exists.")
            if any(f["name"] == name for f in r.flavors()):
                raise Conflict(f"Flavor with name {name} already exists.")

        with self.store.read() as r:
            check(r)

        def work(c: CommandTxn) -> None:
            check(c.reader)
            c.put_catalog(Catalog.FLAVORS, fid, entry)

        links = Links(req)  # (the request's fields are read before the await)
        await _commit(self.ctx, work)
        return 200, C.dumps({"flavor": F.show_view(F.full(entry), version, links)})

    async def update_flavor(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        if version < 55:
            raise NotFound(C.RESOURCE_NOT_FOUND)
        description = _json(req, _FLAVOR_UPDATE)["flavor"]["description"]
        _admin(req, "os_compute_api:os-flavor-manage:update")
        fid = req.params[0]
        with self.store.read() as r:
            _flavor(r, fid)
        now = R.now_us()

        def work(c: CommandTxn) -> dict[str, Any]:
            f = {**_flavor(c.reader, fid), "description": description, "updated_at": now}
            c.put_catalog(Catalog.FLAVORS, fid, f)
            return f

        links = Links(req)
        f = await _commit(self.ctx, work)
        return 200, C.dumps({"flavor": F.show_view(F.full(f), version, links)})

    async def delete_flavor(self, req: Any) -> tuple[int, bytes]:
        _admin(req, "os_compute_api:os-flavor-manage:delete")
        fid = req.params[0]
        with self.store.read() as r:
            _flavor(r, fid)

        def work(c: CommandTxn) -> None:
            _flavor(c.reader, fid)
            c.put_catalog(Catalog.FLAVORS, fid, None)

        await _commit(self.ctx, work)
        return 202, b""

    async def _extra_specs(self, fid: str, change: Callable[[dict[str, str]], dict[str, str]]
                           ) -> None:
        with self.store.read() as r:
            change(dict(_flavor(r, fid).get("extra_specs") or {}))
        now = R.now_us()

        def work(c: CommandTxn) -> None:
            f = _flavor(c.reader, fid)
            specs = change(dict(f.get("extra_specs") or {}))
            c.put_catalog(Catalog.FLAVORS, fid, {**f, "extra_specs": specs, "updated_at": now})

        await _commit(self.ctx, work)

    async def create_extra_specs(self, req: Any) -> tuple[int, bytes]:
        body = _json(req, _EXTRA_SPECS_CREATE)
        _admin(req, "os_compute_api:os-flavor-extra-specs:create")
        specs = body["extra_specs"]
        check_extra_specs(specs, req.version)
        await self._extra_specs(req.params[0], lambda old: {**old, **_spec_strings(specs)})
        return 200, C.dumps(body)

    async def update_extra_spec(self, req: Any) -> tuple[int, bytes]:
        body = _json(req, _EXTRA_SPEC_UPDATE)
        _admin(req, "os_compute_api:os-flavor-extra-specs:update")
        fid, key = req.params
        check_extra_specs(body, req.version)
        if key not in body:
            raise BadRequest("Request body and URI mismatch")
        await self._extra_specs(fid, lambda old: {**old, **_spec_strings(body)})
        return 200, C.dumps(body)

    async def delete_extra_spec(self, req: Any) -> tuple[int, bytes]:
        _admin(req, "os_compute_api:os-flavor-extra-specs:delete")
        fid, key = req.params

        def change(old: dict[str, str]) -> dict[str, str]:
            if key not in old:
                raise NotFound(f"Flavor {fid} has no extra specs with key {key}.")
            return {k: v for k, v in old.items() if k != key}

        await self._extra_specs(fid, change)
        return 200, b""  # no @wsgi.response: Nova answers 200 with no body

    # -- quota sets ---------------------------------------------------------------------------
    async def update_quotas(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        body = _json(req, _quota_schema_at(version))
        # ?user_id=: fastpath keeps no per-user limits; the project's are set.
        Q.validate(Q.Query.of(req), {"user_id": Q.any_string}, version < 75)
        project = req.params[0]
        _admin(req, "os_compute_api:os-quota-sets:update")
        _project_key(project)
        quota_set: dict[str, Any] = body["quota_set"]
        force = Q.bool_from_string(str(quota_set.get("force", "False")))
        wanted: dict[str, int] = {}
        for key, value in quota_set.items():
            if key == "force" or (not value and value != 0):
                continue
            wanted[key] = int(value)

        def check(r: Reader) -> dict[str, int]:
            if not force:
                used = limits.in_use(r, project)
                for key, value in wanted.items():
                    _check_quota_limit(key, value, used.get(key, 0))
            raw = r.txn.get(catalog_key(Catalog.QUOTA_LIMITS, project), db=r.dbs.quota_limits)
            own: dict[str, int] = msgpack.unpackb(raw, raw=False) if raw is not None else {}
            return {**own, **wanted}

        with self.store.read() as r:
            check(r)

        def work(c: CommandTxn) -> dict[str, int]:
            own = check(c.reader)
            c.put_catalog(Catalog.QUOTA_LIMITS, project, own)
            return limits.project_limits(c.reader, project)

        values = await _commit(self.ctx, work)
        body = limits.quota_set(project, values, version)
        del body["quota_set"]["id"]  # the update's answer has no id (as Nova's)
        return 200, C.dumps(body)

    async def delete_quotas(self, req: Any) -> tuple[int, bytes]:
        version = req.version
        Q.validate(Q.Query.of(req), {"user_id": Q.any_string}, version < 75)
        project = req.params[0]
        _admin(req, "os_compute_api:os-quota-sets:delete")
        _project_key(project)

        def work(c: CommandTxn) -> None:
            c.put_catalog(Catalog.QUOTA_LIMITS, project, None)

        # No read: nothing to validate in the store (deleting absent limits is a no-op).
        await _commit(self.ctx, work)
        return 202, b""

    def specs(self) -> list[RouteSpec]:
        kp = API_ROOT + "/os-keypairs"
        fl = API_ROOT + "/flavors"
        es = fl + "/{flavor_id}/os-extra_specs"
        qs = API_ROOT + "/os-quota-sets/{project_id}"
        return [
            RouteSpec("POST", kp, self.create_keypair),
            RouteSpec("DELETE", kp + "/{keypair_name}", self.delete_keypair),
            RouteSpec("POST", fl, self.create_flavor),
            RouteSpec("PUT", fl + "/{flavor_id}", self.update_flavor),
            RouteSpec("DELETE", fl + "/{flavor_id}", self.delete_flavor),
            RouteSpec("POST", es, self.create_extra_specs),
            RouteSpec("PUT", es + "/{key}", self.update_extra_spec),
            RouteSpec("DELETE", es + "/{key}", self.delete_extra_spec),
            RouteSpec("PUT", qs, self.update_quotas),
            RouteSpec("DELETE", qs, self.delete_quotas),
        ]


# == flavors ==================================================================================
def _flavor_param(minimum: int) -> dict[str, Any]:
    """parameter_types.flavor_param_positive / _non_negative."""
    return {"type": ["integer", "string"], "pattern": "^[0-9]+$", "minimum": minimum,
            "maximum": MAX_INT}


def _flavor_description() -> dict[str, Any]:
    return {**V.description(), "maxLength": 65535}


def _flavor_schema(version: int) -> V.Schema:
    """create (2.1), create_v2_55 (description); rxtx_factor until 2.101."""
    props: dict[str, Any] = {
        "name": V.name(),
        "id": {"type": ["string", "number", "null"], "minLength": 1, "maxLength": 255,
               "pattern": "^(?! )[a-zA-Z0-9. _-]+(?<! )$"},
        "ram": _flavor_param(1),
        "vcpus": _flavor_param(1),
        "disk": _flavor_param(0),
        "OS-FLV-EXT-DATA:ephemeral": _flavor_param(0),
        "swap": _flavor_param(0),
        "rxtx_factor": {"type": ["number", "string"], "pattern": r"^[0-9]+(\.[0-9]+)?$",
                        "minimum": 0, "exclusiveMinimum": True, "maximum": SQL_SP_FLOAT_MAX},
        "os-flavor-access:is_public": V.boolean(),
    }
    if version >= 102:
        del props["rxtx_factor"]
    if version >= 55:
        props["description"] = _flavor_description()
    return V.Schema({
        "type": "object",
        "properties": {"flavor": {"type": "object", "properties": props,
                                  "required": ["name", "ram", "vcpus", "disk"],
                                  "additionalProperties": False}},
        "required": ["flavor"], "additionalProperties": False,
    })


_FLAVOR_SCHEMAS = {v: _flavor_schema(v) for v in (1, 55, 102)}
_FLAVOR_UPDATE = V.Schema({
    "type": "object",
    "properties": {"flavor": {"type": "object",
                              "properties": {"description": _flavor_description()},
                              "required": ["description"], "additionalProperties": False}},
    "required": ["flavor"], "additionalProperties": False,
})


def _flavor_schema_at(version: int) -> V.Schema:
    return _FLAVOR_SCHEMAS[102 if version >= 102 else 55 if version >= 55 else 1]


def _integer(value: Any, name: str, minimum: int) -> int:
    """nova.utils.validate_integer (oslo's texts)."""
    try:
        n = int(str(value))
    except (ValueError, UnicodeEncodeError):
        raise BadRequest(f"Invalid input received: {name} must be an integer") from None
    if n < minimum:
        raise BadRequest(f"Invalid input received: {name} must be >= {minimum}")
    if n > MAX_INT:
        raise BadRequest(f"Invalid input received: {name} must be <= {MAX_INT}")
    return n


def flavor_entry(vals: Mapping[str, Any], version: int) -> dict[str, Any]:
    """nova.compute.flavors.create: defaults, conversions and checks -> the catalogue entry."""
    flavorid = vals.get("id")
    fid = str(uuid.uuid4()) if not flavorid else str(flavorid)
    try:
        rxtx = float(vals.get("rxtx_factor", 1.0))
        if rxtx <= 0 or rxtx > SQL_SP_FLOAT_MAX:
            raise ValueError
    except ValueError:
        raise BadRequest("Invalid input received: 'rxtx_factor' argument must be a float "
                         f"between 0 and {SQL_SP_FLOAT_MAX:g}") from None
    now = R.now_us()
    return {
        "id": fid,
        "name": str(vals["name"]).strip(),
        "ram": _integer(vals["ram"], "ram", 1),
        "vcpus": _integer(vals["vcpus"], "vcpus", 1),
        "disk": _integer(vals["disk"], "disk", 0),
        "ephemeral": _integer(vals.get("OS-FLV-EXT-DATA:ephemeral", 0), "ephemeral", 0),
        "swap": _integer(vals.get("swap", 0), "swap", 0),
        "rxtx_factor": rxtx,
        "is_public": V.is_true(vals.get("os-flavor-access:is_public", True)),
        "disabled": False,
        "description": vals.get("description") if version >= 55 else None,
        "extra_specs": {},
        "projects": [],
        "created_at": now,
        "updated_at": None,
    }


def _flavor(r: Reader, fid: str) -> dict[str, Any]:
    """common.get_flavor (admin: every flavor)."""
    f = r.flavor(fid)
    if f is None:
        raise NotFound(f"Flavor {fid} could not be found.")
    return f


# -- extra specs ----------------------------------------------------------------------------
def _spec_metadata() -> dict[str, Any]:
    """flavors_extraspecs.metadata: the metadata type, numbers accepted as values."""
    m = V.metadata()
    for v in m["patternProperties"].values():
        v["type"] = ["string", "number"]
    return m


_EXTRA_SPECS_CREATE = V.Schema({"type": "object", "properties": {"extra_specs": _spec_metadata()},
                                "required": ["extra_specs"], "additionalProperties": False})
_EXTRA_SPEC_UPDATE = V.Schema({**_spec_metadata(), "minProperties": 1, "maxProperties": 1})


def _spec_strings(specs: Mapping[str, Any]) -> dict[str, str]:
    """Stored as strings (Nova's DictOfStringsField); the answer echoes the body."""
    return {k: v if isinstance(v, str) else _number_text(v) for k, v in specs.items()}


def _number_text(v: Any) -> str:
    return "True" if v is True else "False" if v is False else str(v)


# 2.86: Nova validates the extra specs it knows (nova/api/validation/extra_specs).  The
# common ones are checked here; an unknown key of a namespace Nova owns is refused, and keys
# of other namespaces (or none) pass, as in Nova.
_SPEC_RULES: list[tuple[str, str, Any]] = [
    (r"hw:cpu_policy", "enum", ("dedicated", "shared", "mixed")),
    (r"hw:cpu_thread_policy", "enum", ("prefer", "isolate", "require")),
    (r"hw:emulator_threads_policy", "enum", ("isolate", "share")),
    (r"hw:numa_nodes", "int", 1),
    (r"hw:cpu_(sockets|cores|threads|max_sockets|max_cores|max_threads)", "int", 1),
    (r"hw:numa_(cpus|mem)\.\d+", "str", None),
    (r"hw:mem_page_size", "regex", r"(large|small|any|\d+([kKMGT]i?)?(b|bit|B)?)"),
    (r"hw:cpu_realtime", "bool", None),
    (r"hw:cpu_realtime_mask", "regex", r"(\^)?\d+((-\d+)?(,\^?\d+(-\d+)?)?)*"),
    (r"hw:hide_hypervisor_id", "bool", None),
    (r"hw:locked_memory", "bool", None),
    (r"hw:mem_encryption", "bool", None),
    (r"hw:boot_menu", "bool", None),
    (r"hw:watchdog_action", "enum", ("none", "pause", "poweroff", "reset", "disabled")),
    (r"hw:vif_multiqueue_enabled", "bool", None),
    (r"hw:pmu", "bool", None),
    (r"hw:serial_port_count", "int", 0),
    (r"hw:pci_numa_affinity_policy", "enum", ("required", "preferred", "legacy", "socket")),
    (r"hw_rng:allowed", "bool", None),
    (r"hw_rng:(rate_bytes|rate_period)", "int", 0),
    (r"hw_video:ram_max_mb", "int", 0),
    (r"quota:[a-z_]+_(limit|reservation|shares_share)", "int", 0),
    (r"quota:[a-z_]+_shares_level", "enum", ("custom", "high", "normal", "low")),
    (r"resources([a-zA-Z0-9_-]{1,64})?:[A-Z0-9_]+", "int", 0),
    (r"trait([a-zA-Z0-9_-]{1,64})?:[A-Z0-9_]+", "enum", ("required", "forbidden")),
    (r"aggregate_instance_extra_specs:.+", "str", None),
    (r"capabilities:.+", "str", None),
    (r"pci_passthrough:alias", "str", None),
    (r"accel:device_profile", "str", None),
    (r"os:secure_boot", "enum", ("required", "disabled", "optional")),
]
_SPEC_COMPILED = [(re.compile(p), kind, arg) for p, kind, arg in _SPEC_RULES]
# The namespaces Nova's validators cover: an unknown key in one of them is refused.
_NOVA_NAMESPACES = re.compile(r"(hw|hw_rng|hw_video|os|quota|resources([a-zA-Z0-9_-]{1,64})?|"
                              r"trait([a-zA-Z0-9_-]{1,64})?|accel|aggregate_instance_extra_specs|"
                              r"capabilities|pci_passthrough|vmware)")


def _spec_error(why: str) -> BadRequest:
    return BadRequest(f"Validation failed; {why}.")


def check_extra_spec(name: str, value: str) -> None:
    """nova.api.validation.extra_specs: the value of a known extra spec (its texts)."""
    for rx, kind, arg in _SPEC_COMPILED:
        if not rx.fullmatch(name):
            continue
        if kind == "enum" and value not in arg:
            raise _spec_error(f"'{value}' is not one of: {', '.join(arg)}")
        if kind == "bool":
            try:
                Q.bool_from_string(value, strict=True)
            except ValueError:
                raise _spec_error(f"'{value}' is not a valid boolean-like value") from None
        if kind == "regex" and not re.fullmatch(arg, value):
            raise _spec_error(f"'{value}' is not of the format '{arg}'")
        if kind == "int":
            try:
                n = int(value)
            except ValueError:
                raise _spec_error(f"'{value}' is not a valid integer value") from None
            if arg is not None and n < arg:
                raise _spec_error(f"'{n}' is less than the min value of '{arg}'")
        return
    if ":" in name and _NOVA_NAMESPACES.fullmatch(name.split(":", 1)[0]):
        raise _spec_error(f"extra spec '{name}' does not appear to be a valid extra spec")


def check_extra_specs(specs: Mapping[str, Any], version: int) -> None:
    """FlavorExtraSpecsController._check_extra_specs_value: numbers up to 255 characters;
    the known extra specs from 2.86."""
    for name, value in specs.items():
        text = value if isinstance(value, str) else _number_text(value)
        if not isinstance(value, str) and len(text) > 255:
            raise BadRequest("Invalid input received: extra_specs value has more than 255 "
                             "characters.")
        if version >= 86:
            check_extra_spec(name, text)


# == quota sets ===============================================================================
_COMMON_QUOTA: dict[str, Any] = {"type": ["integer", "string"], "pattern": "^-?[0-9]+$",
                                 "minimum": -1, "maximum": MAX_INT}
_QUOTA_RESOURCES = ("instances", "cores", "ram", "floating_ips", "fixed_ips", "metadata_items",
                    "key_pairs", "security_groups", "security_group_rules", "injected_files",
                    "injected_file_content_bytes", "injected_file_path_bytes", "server_groups",
                    "server_group_members")  # 'networks' was removed (Train): refused


def _quota_schema(version: int) -> V.Schema:
    """update, update_v236 (no nova-network resources), update_v257 (no injected files)."""
    dropped: tuple[str, ...] = ()
    if version >= 36:
        dropped = ("fixed_ips", "floating_ips", "security_groups", "security_group_rules")
    if version >= 57:
        dropped += ("injected_files", "injected_file_content_bytes", "injected_file_path_bytes")
    props: dict[str, Any] = {k: dict(_COMMON_QUOTA) for k in _QUOTA_RESOURCES if k not in dropped}
    props["force"] = V.boolean()
    return V.Schema({
        "type": "object",
        "properties": {"quota_set": {"type": "object", "properties": props,
                                     "additionalProperties": False}},
        "required": ["quota_set"], "additionalProperties": False,
    })


_QUOTA_SCHEMAS = {v: _quota_schema(v) for v in (1, 36, 57)}


def _quota_schema_at(version: int) -> V.Schema:
    return _QUOTA_SCHEMAS[57 if version >= 57 else 36 if version >= 36 else 1]


def _check_quota_limit(resource: str, limit: int, minimum: int) -> None:
    """QuotaSetsController._validate_quota_limit (no maximum: projects have no parent)."""
    inf = float("inf")
    if (inf if limit == -1 else limit) < (inf if minimum == -1 else minimum):
        raise BadRequest(f"Quota limit {limit} for {resource} must be greater than or equal to "
                         f"already used and reserved {minimum}.")


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return CatalogRoutes(ctx).specs()


__all__ = ["CatalogRoutes", "check_extra_spec",
           "flavor_entry", "generate_ssh_keypair", "generate_x509_keypair", "routes",
           "ssh_fingerprint", "x509_fingerprint"]
