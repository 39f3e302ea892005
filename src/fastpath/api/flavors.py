"""GET /flavors, /flavors/detail, /flavors/{id}, /flavors/{id}/os-extra_specs[/{key}]
(nova/api/openstack/compute/flavors.py, views/flavors.py, flavors_extraspecs.py).

The catalogue entry of a flavor (``Catalog.FLAVORS``, key = flavor id), a msgpack map:

=============== ================ =====================================================
field           type             Nova
=============== ================ =====================================================
``id``          str              flavorid
``name``        str              name
``vcpus``       int              vcpus
``ram``         int              memory_mb
``disk``        int              root_gb
``ephemeral``   int              ephemeral_gb (OS-FLV-EXT-DATA:ephemeral)
``swap``        int              swap (MB; 0 shows as "" before 2.75)
``rxtx_factor`` float            rxtx_factor (until 2.101)
``is_public``   bool             os-flavor-access:is_public
``disabled``    bool             OS-FLV-DISABLED:disabled (until 2.101)
``description`` str | None       description (2.55)
``extra_specs`` dict[str, str]   extra_specs (2.61; os-extra_specs)
``projects``    list[str]        flavor access: projects that see a private flavor
``created_at``  int | None       (sort key) microseconds since the epoch
``updated_at``  int | None       (sort key)
=============== ================ =====================================================

Missing optional fields take Nova's defaults (``FLAVOR_DEFAULTS``).  Visibility follows
Nova's flavor queries: an admin sees every flavor; anyone else the public ones and the
private ones their project was given access to (a flavor show or a marker outside that
set is "not found").

PERF: the answers are cached per worker (:class:`BodyCache`): a response is a function of
the flavors table and of a few request inputs, and the table changes rarely.  Each request
still opens its one read transaction and reads the table's generation in it (``meta``
``gen:flavors``, raised by ``apply`` in the transaction that changes a flavor); a body
rendered in a transaction that read the same generation is answered as is.  Without this,
every ``/flavors/detail`` decoded every flavor from msgpack and encoded the body again
(25 µs in process, docs/benchmarks.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastpath.api import common as C
from fastpath.api import links as L
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, NotFound
from fastpath.store.changes import Catalog
from fastpath.store.reader import Reader

FLAVOR_DEFAULTS: dict[str, Any] = {
    "ephemeral": 0,
    "swap": 0,
    "rxtx_factor": 1.0,
    "is_public": True,
    "disabled": False,
    "description": None,
    "extra_specs": {},
    "projects": [],
    "created_at": None,
    "updated_at": None,
    "vcpu_weight": None,
}

SORT_KEYS = [
    "created_at", "description", "disabled", "ephemeral_gb", "flavorid", "id",
    "is_public", "memory_mb", "name", "root_gb", "rxtx_factor", "swap",
    "updated_at", "vcpu_weight", "vcpus",
]
SORT_KEYS_V2102 = [k for k in SORT_KEYS if k != "rxtx_factor"]
# Nova's column -> field of the catalogue entry.  ``id`` (Nova's integer primary key, the
# tie-break of every sort) does not exist here: the flavor id stands in for it.
_SORT_FIELD = {
    "created_at": "created_at", "description": "description", "disabled": "disabled",
    "ephemeral_gb": "ephemeral", "flavorid": "id", "id": "id", "is_public": "is_public",
    "memory_mb": "ram", "name": "name", "root_gb": "disk", "rxtx_factor": "rxtx_factor",
    "swap": "swap", "updated_at": "updated_at", "vcpu_weight": "vcpu_weight", "vcpus": "vcpus",
}
SORT_DIRS = ["asc", "desc"]


def _schema(version: int) -> tuple[dict[str, Q.Check], bool]:
    schema: dict[str, Q.Check] = {
        "limit": Q.NON_NEGATIVE_INT,
        "marker": Q.any_string,
        "is_public": Q.any_string,
        "minRam": Q.any_string,
        "minDisk": Q.any_string,
        "sort_key": Q.enum(SORT_KEYS_V2102 if version >= 102 else SORT_KEYS),
        "sort_dir": Q.enum(SORT_DIRS),
    }
    if version >= 102:
        schema["name"] = Q.any_string
    return schema, version < 75


def full(f: dict[str, Any]) -> dict[str, Any]:
    return {**FLAVOR_DEFAULTS, **f}


def visible(f: dict[str, Any], project: str | None, is_admin: bool) -> bool:
    return is_admin or bool(f["is_public"]) or (project is not None and project in f["projects"])


def get_visible(r: Reader, flavor_id: str, project: str | None, is_admin: bool) -> dict[str, Any]:
    raw = r.flavor(flavor_id)
    f = full(raw) if raw is not None else None
    if f is None or not visible(f, project, is_admin):
        raise NotFound(f"Flavor {flavor_id} could not be found.")
    return f


def show_view(f: dict[str, Any], version: int, links: L.Links) -> dict[str, Any]:
    """Nova's flavor view (show and detail) at ``version``."""
    swap = f["swap"]
    d: dict[str, Any] = {
        "id": f["id"],
        "name": f["name"],
        "ram": f["ram"],
        "disk": f["disk"],
        "swap": (swap or 0) if version >= 75 else (swap or ""),
        "OS-FLV-EXT-DATA:ephemeral": f["ephemeral"],
    }
    if version < 102:
        d["OS-FLV-DISABLED:disabled"] = f["disabled"]
    d["vcpus"] = f["vcpus"]
    d["os-flavor-access:is_public"] = f["is_public"]
    if version < 102:
        d["rxtx_factor"] = f["rxtx_factor"] or ""
    d["links"] = links.pair("flavors", f["id"])
    if version >= 55:
        d["description"] = f["description"]
    # 2.61: extra specs in the flavor, for whom the os-flavor-extra-specs:index policy
    # allows (PROJECT_READER_OR_ADMIN: every authenticated user here).
    if version >= 61:
        d["extra_specs"] = f["extra_specs"]
    return d


def basic_view(f: dict[str, Any], version: int, links: L.Links) -> dict[str, Any]:
    d: dict[str, Any] = {"id": f["id"], "name": f["name"], "links": links.pair("flavors", f["id"])}
    if version >= 55:
        d["description"] = f["description"]
    return d


def _parse_is_public(v: str | None) -> bool | None:
    if v is None:
        return True
    if v.strip().lower() == "none":
        return None
    try:
        return Q.bool_from_string(v, strict=True)
    except ValueError:
        raise BadRequest(f"Invalid is_public filter [{v}]") from None


def _sort_value(f: dict[str, Any], field: str) -> tuple[Any, ...]:
    v = f.get(field)
    # SQL orders NULL first ascending; bools and numbers compare as numbers.
    return (v is not None, v if v is not None else 0)


def list_flavors(req: Any, r: Reader, ctx: ApiContext) -> tuple[Q.Query, list[dict[str, Any]]]:
    """Nova's ``_get_flavors``: filters, sort, marker and limit."""
    version = req.version
    schema, additional = _schema(version)
    q = Q.validate(Q.Query.of(req), schema, additional)
    sort_key = q.get("sort_key") or "flavorid"
    sort_dir = q.get("sort_dir") or "asc"
    limit, marker = Q.limit_and_marker(q, ctx.max_limit)
    is_admin, project = req.is_admin, req.project

    if is_admin:
        is_public = _parse_is_public(q.get("is_public"))
        disabled_ok = True
    else:
        is_public, disabled_ok = True, False
    min_ram = Q.int_filter(q, "minRam")
    min_disk = Q.int_filter(q, "minDisk")
    name_re = None
    if version >= 102 and "name" in q:
        pattern = q.get("name") or ""
        try:
            name_re = re.compile(pattern)
        except re.error:
            name_re = re.compile(re.escape(pattern))

    every = [full(f) for f in r.flavors()]
    seen = [f for f in every if visible(f, project, is_admin)]

    def keep(f: dict[str, Any]) -> bool:
        if min_ram is not None and f["ram"] < min_ram:
            return False
        if min_disk is not None and f["disk"] < min_disk:
            return False
        if not disabled_ok and f["disabled"]:
            return False
        if name_re is not None and name_re.search(f["name"]) is None:
            return False
        if is_public is not None:
            if is_public:
                if not (f["is_public"] or (project is not None and project in f["projects"])):
                    return False
            elif f["is_public"]:
                return False
        return True

    field = _SORT_FIELD[sort_key]

    def key(f: dict[str, Any]) -> tuple[Any, ...]:
        return (_sort_value(f, field), f["id"])

    reverse = sort_dir == "desc"
    items = sorted((f for f in seen if keep(f)), key=key, reverse=reverse)
    if marker is not None:
        m = next((f for f in seen if f["id"] == marker), None)
        if m is None:
            raise BadRequest(f"marker [{marker}] not found")
        mk = key(m)
        items = [f for f in items if (key(f) < mk if reverse else key(f) > mk)]
    return q, items[:limit]


# -- the per-worker cache of rendered answers -------------------------------------------------


def band(version: int) -> int:
    """The microversion band: versions in one band get the same flavor answers.

    Every version test of this module is one of these thresholds: 2.55 (description),
    2.61 (extra_specs in the view), 2.75 (swap 0 not ""; unknown list parameters refused),
    2.102 (no rxtx_factor/disabled, the name filter, sort keys, strict show queries).
    """
    return (version >= 55) + (version >= 61) + (version >= 75) + (version >= 102)


class BodyCache:
    """Rendered 200 bodies of one generation of the flavors table, by request inputs.

    The key holds everything an answer depends on besides the table: the route, the
    microversion band, the role, the caller's project (only while some flavor is private:
    otherwise visibility does not depend on it), the Host (the base URL of the links), the
    project of the URL (in the links), the raw query string and the path captures.
    ``ctx.max_limit`` and ``http.public_url`` are fixed for the worker's life.  Bounded in
    entries and bytes (a full cache drops its oldest entry); errors are not cached.
    """

    __slots__ = ("generation", "private", "bodies", "size")

    max_entries = 256
    max_bytes = 16 << 20  # and no body over max_bytes // 16

    def __init__(self) -> None:
        self.generation = -1  # no generation read yet
        self.private = False  # whether a flavor of this generation is private
        self.bodies: dict[tuple[Any, ...], bytes] = {}
        self.size = 0

    def renew(self, generation: int, r: Reader) -> None:
        """Forget everything: the table is at ``generation`` in ``r``'s transaction."""
        self.generation = generation
        self.private = any(not f.get("is_public", True) for f in r.flavors())
        self.bodies.clear()
        self.size = 0

    def put(self, key: tuple[Any, ...], body: bytes) -> None:
        n = len(body)
        if n > self.max_bytes // 16 or self.max_entries <= 0:
            return
        bodies = self.bodies
        while bodies and (len(bodies) >= self.max_entries or self.size + n > self.max_bytes):
            self.size -= len(bodies.pop(next(iter(bodies))))  # the oldest (insertion order)
        bodies[key] = body
        self.size += n


def cached_route(ctx: ApiContext, cache: BodyCache, kind: int,
                 fn: Callable[[Any, Reader], tuple[int, bytes]]) -> C.Handler:
    """Like :func:`common.read_route` (one read transaction, everything inside it), answering
    from ``cache`` when the flavors table is at the generation the cached body was made at."""
    store = ctx.store
    flavors = Catalog.FLAVORS

    def handler(req: Any) -> tuple[int, bytes]:
        with store.read() as r:
            generation = r.generation(flavors)
            if generation != cache.generation:
                cache.renew(generation, r)
            key = (kind, band(req.version), req.is_admin,
                   req.project if cache.private else None,
                   req.host, req.url_project, req.query, req.captures)
            body = cache.bodies.get(key)
            if body is not None:
                return 200, body
            status, body = fn(req, r)
            if status == 200:
                cache.put(key, body)
            return status, body

    handler.__name__ = handler.__qualname__ = getattr(fn, "__name__", "handler")
    return handler


def routes(ctx: ApiContext) -> list[RouteSpec]:
    base = API_ROOT + "/flavors"
    cache = BodyCache()

    def _list(req: Any, r: Reader, detail: bool) -> tuple[int, bytes]:
        q, items = list_flavors(req, r, ctx)
        links = L.Links(req)
        if detail:
            flavors = [show_view(f, req.version, links) for f in items]
        else:
            flavors = [basic_view(f, req.version, links) for f in items]
        return 200, C.dumps(L.page("flavors", flavors, q, links, ctx.max_limit,
                                   "flavors/detail" if detail else "flavors",
                                   items[-1]["id"] if items else None))

    def index(req: Any, r: Reader) -> tuple[int, bytes]:
        return _list(req, r, False)

    def detail(req: Any, r: Reader) -> tuple[int, bytes]:
        return _list(req, r, True)

    def show(req: Any, r: Reader) -> tuple[int, bytes]:
        # show_query_v2102 (and the extra specs' query schemas): no parameters from 2.102.
        Q.strict(req)
        f = get_visible(r, req.params[0], req.project, req.is_admin)
        return 200, C.dumps({"flavor": show_view(f, req.version, L.Links(req))})

    def extra_specs(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.strict(req)
        f = get_visible(r, req.params[0], req.project, req.is_admin)
        return 200, C.dumps({"extra_specs": f["extra_specs"]})

    def extra_spec(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.strict(req)
        flavor_id, key = req.params
        f = get_visible(r, flavor_id, req.project, req.is_admin)
        if key not in f["extra_specs"]:
            raise NotFound(f"Flavor {flavor_id} has no extra specs with key {key}.")
        return 200, C.dumps({key: f["extra_specs"][key]})

    def route(kind: int, fn: Callable[[Any, Reader], tuple[int, bytes]]) -> C.Handler:
        return cached_route(ctx, cache, kind, fn)

    return [
        RouteSpec("GET", base, route(0, index)),
        RouteSpec("GET", base + "/detail", route(1, detail)),
        RouteSpec("GET", base + "/{flavor_id}", route(2, show)),
        RouteSpec("GET", base + "/{flavor_id}/os-extra_specs", route(3, extra_specs)),
        RouteSpec("GET", base + "/{flavor_id}/os-extra_specs/{key}", route(4, extra_spec)),
    ]
