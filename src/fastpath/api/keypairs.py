"""GET /os-keypairs and /os-keypairs/{keypair_name} (nova/api/openstack/compute/keypairs.py,
views/keypairs.py).

The catalogue entry of a keypair (``Catalog.KEYPAIRS``, key = (user_id, name)), a msgpack
map: ``name`` str, ``user_id`` str, ``public_key`` str, ``fingerprint`` str, ``type``
("ssh" or "x509", shown from 2.2), ``id`` int (Nova's row id), ``created_at`` and
``updated_at`` (microseconds since the epoch, or None).  The store keeps a user's keypairs
by name, Nova's list and marker order.
"""

from __future__ import annotations

from typing import Any

from fastpath.api import common as C
from fastpath.api import links as L
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, NotFound
from fastpath.store.reader import Reader


def _schema(version: int) -> tuple[dict[str, Q.Check], bool]:
    schema: dict[str, Q.Check] = {}
    if version >= 10:
        schema["user_id"] = Q.any_string
    if version >= 35:
        schema.update(Q.PAGINATION)
    return schema, version < 75


def _user(req: Any, q: Q.Query, action: str) -> str:
    """The user whose keypairs are read: ``?user_id=`` (2.10, first value) or the caller;
    another user's only for admins (policy ``admin or user_id:%(user_id)s``)."""
    user = (q.first("user_id") if req.version >= 10 else None) or req.user
    if user != req.user and not req.is_admin:
        raise C.forbidden(f"os_compute_api:os-keypairs:{action}")
    return str(user)


def list_item(k: dict[str, Any], version: int) -> dict[str, Any]:
    d = {"name": k["name"], "public_key": k["public_key"], "fingerprint": k["fingerprint"]}
    if version >= 2:
        d["type"] = k.get("type", "ssh")
    return {"keypair": d}


def show_view(k: dict[str, Any], version: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": k["name"],
        "public_key": k["public_key"],
        "fingerprint": k["fingerprint"],
        "user_id": k["user_id"],
        "created_at": C.db_time(k.get("created_at")),
        "deleted": False,
        "deleted_at": None,
        "id": k.get("id", 0),
        "updated_at": C.db_time(k.get("updated_at")),
    }
    if version >= 2:
        d["type"] = k.get("type", "ssh")
    return {"keypair": d}


def routes(ctx: ApiContext) -> list[RouteSpec]:
    def index(req: Any, r: Reader) -> tuple[int, bytes]:
        version = req.version
        schema, additional = _schema(version)
        q = Q.validate(Q.Query.of(req), schema, additional)
        user = _user(req, q, "index")
        items = r.keypairs(user)
        if version < 35:
            return 200, C.dumps({"keypairs": [list_item(k, version) for k in items]})
        limit, marker = Q.limit_and_marker(q, ctx.max_limit)
        if marker is not None:
            names = [k["name"] for k in items]
            if marker not in names:
                raise BadRequest(f"Marker {marker} could not be found.")
            items = items[names.index(marker) + 1:]
        items = items[:limit]
        return 200, C.dumps(L.page("keypairs", [list_item(k, version) for k in items], q,
                                   L.Links(req), ctx.max_limit, "os-keypairs",
                                   items[-1]["name"] if items else None))

    def show(req: Any, r: Reader) -> tuple[int, bytes]:
        version = req.version
        schema = {"user_id": Q.any_string} if version >= 10 else {}
        q = Q.validate(Q.Query.of(req), schema, version < 75)
        user = _user(req, q, "show")
        name = req.params[0]
        k = r.keypair(user, name)
        if k is None:
            raise NotFound(f"Keypair {name} not found for user {user}")
        return 200, C.dumps(show_view(k, version))

    base = API_ROOT + "/os-keypairs"
    return [
        RouteSpec("GET", base, C.read_route(ctx, index)),
        RouteSpec("GET", base + "/{keypair_name}", C.read_route(ctx, show)),
    ]
