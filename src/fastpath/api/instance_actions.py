"""GET /servers/{server_id}/os-instance-actions and /os-instance-actions/{request_id}
(nova/api/openstack/compute/instance_actions.py, views/instance_actions.py).

The actions and their events come from the cell's ``instance_actions`` and
``instance_actions_events`` tables, carried up by the projection in the server record's
``actions`` field (newest first, as Nova lists them: ``created_at`` desc, ``id`` desc).  So a
request is exactly one read transaction: the server's record (or, from 2.21, the final record
in its tombstone) holds everything.  The record carries the newest
``fastpath.cell.db.ACTIONS_KEPT`` (100) actions of a server, so every change of a server
with a long history costs the same; older actions stay in the cell's database only.

Per microversion and policy (Nova's defaults: list/show for the project's members and admins;
``events`` and ``events:details`` admin only):

- 2.21: actions of deleted servers are shown (before: 404 as for any missing server).
- 2.51: non-admins see the events too, without ``traceback``.
- 2.58: ``updated_at``; ``limit``/``marker`` (a request id) and ``changes-since`` on
  ``updated_at``, a ``links`` next link; unknown query parameters are refused.
- 2.62: events carry ``hostId`` (everyone) and ``host`` (admins).
- 2.66: ``changes-before``.
- 2.84: events carry ``details`` (admins).
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastpath.api import common as C
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.links import Links, collection_links
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, NotFound
from fastpath.store import record as R
from fastpath.store.reader import Reader

_SCHEMA_V258: dict[str, Q.Check] = {**Q.PAGINATION, "changes-since": Q.date_time}
_SCHEMA_V266: dict[str, Q.Check] = {**_SCHEMA_V258, "changes-before": Q.date_time}


def host_id(host: str | None, project_id: str) -> str:
    """Nova's ``utils.generate_hostid``: sha224(project + host), '' without a host."""
    if not host:
        return ""
    return hashlib.sha224((project_id + host).encode("utf-8")).hexdigest()


def action_view(a: dict[str, Any], uuid: str, version: int) -> dict[str, Any]:
    """ACTION_KEYS (ACTION_KEYS_V258 from 2.58)."""
    d: dict[str, Any] = {
        "action": a["action"],
        "instance_uuid": uuid,
        "request_id": a["request_id"],
        "user_id": a["user_id"],
        "project_id": a["project_id"],
        "start_time": C.db_time(a["start_time"]),
        "message": a["message"],
    }
    if version >= 58:
        d["updated_at"] = C.db_time(a["updated_at"])
    return d


def event_view(e: dict[str, Any], project_id: str, *, traceback: bool, host: bool,
               hostid: bool, details: bool) -> dict[str, Any]:
    """Nova's ``_format_event``."""
    d: dict[str, Any] = {
        "event": e["event"],
        "start_time": C.db_time(e["start_time"]),
        "finish_time": C.db_time(e["finish_time"]),
        "result": e["result"],
    }
    if traceback:
        d["traceback"] = e["traceback"]
    if host:
        d["host"] = e["host"]
    if hostid:
        d["hostId"] = host_id(e["host"], project_id)
    if details:
        d["details"] = e["details"]
    return d


def _not_found(server_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} could not be found.")


def server_actions(r: Reader, req: Any, server_id: str) -> tuple[str, list[dict[str, Any]]]:
    """(project id, actions newest first) of a server the caller may see; deleted servers
    from 2.21 (their tombstone's final record).  404 otherwise, as Nova's ``get_instance``
    (a server of another project is not found for a non-admin)."""
    rec = r.get_server(server_id)
    if rec is not None:
        # The effective record: a command may predict its action (a pending "actions").
        project, actions = rec["project_id"], R.effective(rec)["actions"]
    else:
        t = r.tombstone(server_id) if req.version >= 21 else None
        if t is None:
            raise _not_found(server_id)
        project = t.project_id
        actions = (t.record or {}).get("actions") or []
    if not req.is_admin and project != req.project:
        raise _not_found(server_id)
    return project, actions


def routes(ctx: ApiContext) -> list[RouteSpec]:
    max_limit = ctx.max_limit

    def index(req: Any, r: Reader) -> tuple[int, bytes]:
        version = req.version
        server_id = req.params[0]
        if version < 58:
            # index (2.1-2.57): no query schema, nothing filtered or paged.
            _, actions = server_actions(r, req, server_id)
            return 200, C.dumps({"instanceActions": [action_view(a, server_id, version)
                                                     for a in actions]})
        q = Q.validate(Q.Query.of(req), _SCHEMA_V266 if version >= 66 else _SCHEMA_V258, False)
        # The schema runs first (400), then the server is looked up (404).
        _, actions = server_actions(r, req, server_id)
        since = before = None
        if "changes-since" in q:
            since = Q.parse_isotime(q.get("changes-since") or "")
        if "changes-before" in q:
            before = Q.parse_isotime(q.get("changes-before") or "")
            if since is not None and before is not None and before < since:
                raise BadRequest("The value of changes-since must be less than or equal to "
                                 "changes-before.")
        limit, marker = Q.limit_and_marker(q, max_limit)
        if limit == 0:
            actions = []  # nova.db actions_get: before the marker is looked at
        elif marker is not None:
            at = next((i for i, a in enumerate(actions) if a["request_id"] == marker), None)
            if at is None:
                # Nova's actions_get overwrites ``marker`` with the failed lookup before
                # raising, so its message names None.
                raise BadRequest("Marker None could not be found.")
            actions = actions[at + 1:]
        if since is not None:
            actions = [a for a in actions if a["updated_at"] >= since]
        if before is not None:
            actions = [a for a in actions if a["updated_at"] <= before]
        actions = actions[:limit]
        body: dict[str, Any] = {"instanceActions": [action_view(a, server_id, version)
                                                    for a in actions]}
        links = collection_links(q, Links(req), max_limit, len(actions),
                                 f"servers/{server_id}/os-instance-actions",
                                 actions[-1]["request_id"] if actions else None)
        if links:
            body["links"] = links
        return 200, C.dumps(body)

    def show(req: Any, r: Reader) -> tuple[int, bytes]:
        version = req.version
        Q.strict(req)
        server_id, request_id = req.params
        project, actions = server_actions(r, req, server_id)
        a = next((x for x in actions if x["request_id"] == request_id), None)
        if a is None:
            raise NotFound(f"Action {request_id} not found")
        body = action_view(a, server_id, version)
        admin = bool(req.is_admin)
        if admin or version >= 51:
            # events: admin for every version (traceback included, host from 2.62);
            # the server's users from 2.51, without the traceback.
            body["events"] = [
                event_view(e, a["project_id"] or project, traceback=admin,
                           host=admin and version >= 62, hostid=version >= 62,
                           details=admin and version >= 84)
                for e in a["events"]]
        return 200, C.dumps({"instanceAction": body})

    base = API_ROOT + "/servers/{server_id}/os-instance-actions"
    return [
        RouteSpec("GET", base, C.read_route(ctx, index)),
        RouteSpec("GET", base + "/{request_id}", C.read_route(ctx, show)),
    ]
