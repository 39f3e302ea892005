"""GET /images, /images/detail, /images/{image_id}: Nova's deprecated image proxy API,
served up to microversion 2.35 (from 2.36 these routes answer 404, as in Nova)
(nova/api/openstack/compute/images.py, views/images.py).

The catalogue entry of an image (``Catalog.IMAGES``, key = image id), a msgpack map in
Glance's terms: ``id``, ``name``, ``status`` (active, queued, saving, deleted,
pending_delete, killed), ``size`` (bytes), ``min_ram``, ``min_disk``, ``created_at`` and
``updated_at`` (microseconds since the epoch), ``properties`` {str: str},
``visibility`` (public, private, shared, community; default public), ``owner`` (project)
and ``members`` (projects a shared image is shared with).  Lists come in Glance's
default order, newest first (created_at desc, id desc).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastpath.api import common as C
from fastpath.api import links as L
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, NotFound
from fastpath.store.reader import Reader

MAX_PROXY_VERSION = 35
GLANCE_PORT = 9292

_STATUS = {"active": "ACTIVE", "queued": "SAVING", "saving": "SAVING", "deleted": "DELETED",
           "pending_delete": "DELETED", "killed": "ERROR"}
_PROGRESS = {"queued": 25, "saving": 50, "active": 100}

# Nova's images index_query: these are not validated, only the paging integers are.
_SCHEMA: dict[str, Q.Check] = {
    "name": Q.any_string, "status": Q.any_string, "changes-since": Q.any_string,
    "server": Q.any_string, "type": Q.any_string, "minRam": Q.any_string,
    "minDisk": Q.any_string, "limit": Q.POSITIVE_INT, "page_size": Q.POSITIVE_INT,
    "marker": Q.any_string, "offset": Q.POSITIVE_INT,
}


def glance_url(req: Any) -> str:
    """Where the alternate links point: the image service, here assumed on the API's host
    at Glance's port (Nova's fallback when no image endpoint is configured)."""
    parts = urlsplit(req.base_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme or 'http'}://{host}:{GLANCE_PORT}"


def _visible(img: dict[str, Any], project: str | None, is_admin: bool) -> bool:
    if is_admin or img.get("visibility", "public") == "public":
        return True
    return project is not None and (img.get("owner") == project or project in img.get("members", ()))


def _links(links: L.Links, glance: str, image_id: str) -> list[dict[str, str]]:
    return [*links.pair("images", image_id),
            {"href": f"{glance}/images/{image_id}", "rel": "alternate",
             "type": "application/vnd.openstack.image"}]


def basic_view(img: dict[str, Any], links: L.Links, glance: str) -> dict[str, Any]:
    return {"id": img["id"], "name": img.get("name"), "links": _links(links, glance, img["id"])}


def show_view(img: dict[str, Any], links: L.Links, glance: str) -> dict[str, Any]:
    status = img.get("status")
    props = img.get("properties") or {}
    d: dict[str, Any] = {
        "id": img["id"],
        "name": img.get("name"),
        "minRam": int(img.get("min_ram") or 0),
        "minDisk": int(img.get("min_disk") or 0),
        "metadata": props,
        "created": C.isotime(img.get("created_at")),
        "updated": C.isotime(img.get("updated_at")),
        "status": _STATUS.get(status or "", "UNKNOWN"),
        "progress": _PROGRESS.get(status or "", 0),
        "OS-EXT-IMG-SIZE:size": img.get("size"),
        "links": _links(links, glance, img["id"]),
    }
    server = props.get("instance_uuid")
    if server is not None:
        d["server"] = {"id": server, "links": links.pair("servers", server)}
    adc = props.get("auto_disk_config")
    if adc is not None:
        d["OS-DCF:diskConfig"] = "AUTO" if Q.bool_from_string(str(adc)) else "MANUAL"
    return d


def list_images(req: Any, r: Reader, ctx: ApiContext) -> tuple[Q.Query, list[dict[str, Any]]]:
    # index_query: unknown parameters are stripped, property-* filters kept.
    q = Q.validate(Q.Query.of(req), _SCHEMA, True, patterns=("^property-.*$",))
    project, is_admin = req.project, req.is_admin
    images = [i for i in r.images() if _visible(i, project, is_admin)]
    name, status = q.get("name"), q.get("status")
    since = None
    if "changes-since" in q:
        v = q.get("changes-since") or ""
        since = Q.parse_isotime(v)
        if since is None:
            raise BadRequest(f"Invalid changes-since value: {v}")
    server = q.get("server")
    if server is not None and "/" in server:
        server = server.rsplit("/", 1)[1]
    itype = q.get("type")
    min_ram = Q.int_filter(q, "minRam")
    min_disk = Q.int_filter(q, "minDisk")
    props = {k[len("property-"):]: v for k, v in q.items if k.startswith("property-")}

    def keep(i: dict[str, Any]) -> bool:
        p = i.get("properties") or {}
        return not (
            (name is not None and i.get("name") != name)
            or (status is not None and (i.get("status") or "") != status.lower())
            or (since is not None and (i.get("updated_at") or 0) < since)
            or (server is not None and p.get("instance_uuid") != server)
            or (itype is not None and p.get("image_type") != itype)
            or (min_ram is not None and int(i.get("min_ram") or 0) < min_ram)
            or (min_disk is not None and int(i.get("min_disk") or 0) < min_disk)
            or any(str(p.get(k)) != v for k, v in props.items())
        )

    # Glance's default order: newest first, then id descending.
    images.sort(key=lambda i: (i.get("created_at") or 0, i["id"]), reverse=True)
    limit, marker = Q.limit_and_marker(q, ctx.max_limit)
    if marker is not None:
        ids = [i["id"] for i in images]
        if marker not in ids:
            raise BadRequest(f"marker [{marker}] not found")
        images = images[ids.index(marker) + 1:]
    return q, [i for i in images if keep(i)][:limit]


def routes(ctx: ApiContext) -> list[RouteSpec]:
    def gate(req: Any) -> None:
        if req.version > MAX_PROXY_VERSION:
            raise NotFound(C.RESOURCE_NOT_FOUND)

    def _list(req: Any, r: Reader, detail: bool) -> tuple[int, bytes]:
        gate(req)
        q, items = list_images(req, r, ctx)
        links, glance = L.Links(req), glance_url(req)
        view = show_view if detail else basic_view
        return 200, C.dumps(L.page("images", [view(i, links, glance) for i in items], q, links,
                                   ctx.max_limit, "images/detail" if detail else "images",
                                   items[-1]["id"] if items else None))

    def index(req: Any, r: Reader) -> tuple[int, bytes]:
        return _list(req, r, False)

    def detail(req: Any, r: Reader) -> tuple[int, bytes]:
        return _list(req, r, True)

    def show(req: Any, r: Reader) -> tuple[int, bytes]:
        gate(req)
        img = r.image(req.params[0])
        if img is None or not _visible(img, req.project, req.is_admin):
            raise NotFound("Image not found.")
        return 200, C.dumps({"image": show_view(img, L.Links(req), glance_url(req))})

    base = API_ROOT + "/images"
    return [
        RouteSpec("GET", base, C.read_route(ctx, index)),
        RouteSpec("GET", base + "/detail", C.read_route(ctx, detail)),
        RouteSpec("GET", base + "/{image_id}", C.read_route(ctx, show)),
    ]
