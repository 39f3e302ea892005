"""Server metadata and tags writes (nova/api/openstack/compute/server_metadata.py,
server_tags.py; compute.API.update_instance_metadata / delete_instance_metadata):

=========================================  ======  =======================================
route                                      status  cell payload (docs/commands.md)
=========================================  ======  =======================================
``PUT    /servers/{id}/metadata``          200     ``metadata`` op ``replace`` (metadata)
``POST   /servers/{id}/metadata``          200     ``metadata`` op ``merge`` (metadata)
``PUT    /servers/{id}/metadata/{key}``    200     ``metadata`` op ``set`` (key, value)
``DELETE /servers/{id}/metadata/{key}``    204     ``metadata`` op ``delete`` (key)
``PUT    /servers/{id}/tags``              200     ``tags`` op ``replace`` (tags)
``PUT    /servers/{id}/tags/{tag}``        201/204 ``tags`` op ``add`` (tag)
``DELETE /servers/{id}/tags/{tag}``        204     ``tags`` op ``delete`` (tag)
``DELETE /servers/{id}/tags``              204     ``tags`` op ``clear``
=========================================  ======  =======================================

Metadata and tags are cell-owned (docs/store.md): a write is a command.  The body is
validated first (no store call), then the server, its state and the limits in the one read
transaction (any refusal there writes nothing); then one ``work`` in the worker's group
commit re-checks the same against the server as it is *inside* the write transaction (a
command accepted meanwhile counts) and writes the command's ``pending`` entry (the new
``metadata``/``tags`` in full, so every view and the tags index show it at once) and its
outbox entry.  The answer goes out once that commit is durable.

The rules are Nova's: metadata keys ``^[a-zA-Z0-9-_:. ]{1,255}$`` and values up to 255
characters (schema), at most ``metadata_items`` (quota, default 128) items after the
change (403 ``Maximum number of metadata items exceeds N``); a locked server refuses a
non-admin (409); metadata needs vm_state active/paused/suspended/stopped and no task, tags
only the vm_state.  Tags (2.26): 1 to 60 characters without ``/`` and ``,``, at most 50 per
server.  An unchanged write (a tag the server has, a metadata value it holds) is still a
command, as in Nova (its instance action is recorded), except ``PUT /tags/{tag}`` of a
tag present (204, nothing written, as Nova).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastpath._loader import load_core
from fastpath.api import common as C
from fastpath.api import limits
from fastpath.api import validation as V
from fastpath.api.context import ApiContext
from fastpath.api.links import Links
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.errors import BadRequest, Conflict, Forbidden, NotFound
from fastpath.store import record as R
from fastpath.store.commands import CommandTxn
from fastpath.store.reader import Reader

MAX_TAG_COUNT = 50  # nova.objects.instance.MAX_TAG_COUNT
METADATA_STATES = ("active", "paused", "suspended", "stopped")

_METADATA = V.Schema({"type": "object", "properties": {"metadata": V.metadata()},
                      "required": ["metadata"], "additionalProperties": False})
_META_ITEM = V.Schema({"type": "object",
                       "properties": {"meta": {**V.metadata(), "minProperties": 1,
                                               "maxProperties": 1}},
                       "required": ["meta"], "additionalProperties": False})
_TAGS = V.Schema({"title": "Server tags", "type": "object",
                  "properties": {"tags": {"type": "array", "items": V.tag(),
                                          "maxItems": MAX_TAG_COUNT}},
                  "required": ["tags"], "additionalProperties": False})
_TAG_BODY = V.Schema({"title": "Server tag", "type": "null",
                      "additionalProperties": False})
_TAG = V.Schema(V.tag())


@dataclass(frozen=True, slots=True)
class Caller:
    """What a command needs of its request, read on the loop thread before it is submitted
    (the work runs in the committer thread)."""

    user: str
    project: str
    is_admin: bool
    command_id: str

    @classmethod
    def of(cls, req: Any) -> Caller:
        return cls(req.user or "", req.project or "", bool(req.is_admin), command_id(req))


def command_id(req: Any) -> str:
    """The command id: the request's id when the request carries one, else a new
    ``req-<uuid4>`` (docs/commands.md: the idempotency key end to end)."""
    rid = getattr(req, "request_id", None)
    return str(rid) if rid else str(load_core().make_request_id())


def _not_found(server_id: str) -> NotFound:
    return NotFound(f"Instance {server_id} could not be found.")


def invalid_state(action: str, server_id: str, attr: str, state: Any) -> Conflict:
    """common.raise_http_conflict_for_instance_invalid_state."""
    return Conflict(f"Cannot '{action}' instance {server_id} while it is in {attr} {state}")


def server_of(r: Reader, server_id: str) -> dict[str, Any] | None:
    """The server's effective record (pending entries applied), or None (not live)."""
    rec = r.get_server(server_id)
    return None if rec is None else dict(R.effective(rec))


# -- metadata ---------------------------------------------------------------------------------
MetadataChange = Callable[[dict[str, str]], dict[str, str]]


def _metadata_target(r: Reader, server_id: str, caller: Caller, action: str) -> dict[str, Any]:
    """common.get_instance + check_instance_lock + check_instance_state (metadata)."""
    rec = server_of(r, server_id)
    if rec is None or (not caller.is_admin and rec["project_id"] != caller.project):
        raise _not_found(server_id)
    if rec["locked"] and not caller.is_admin:
        raise Conflict(f"Instance {server_id} is locked")
    if rec["vm_state"] not in METADATA_STATES:
        raise invalid_state(action, server_id, "vm_state", rec["vm_state"])
    if rec["task_state"] is not None:
        raise invalid_state(action, server_id, "task_state", rec["task_state"])
    return rec


def _check_metadata_quota(r: Reader, caller: Caller, metadata: dict[str, str]) -> None:
    """compute.API._check_metadata_properties_quota (the caller's project's limit)."""
    if not metadata:
        return
    allowed = limits.project_limits(r, caller.project)["metadata_items"]
    if 0 <= allowed < len(metadata):
        raise Forbidden(f"Maximum number of metadata items exceeds {allowed}")


def metadata_command(r: Reader, server_id: str, caller: Caller, action: str,
                     change: MetadataChange, quota: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """(server record, its metadata after ``change``), or the refusal: the same checks in the
    read transaction and again inside the write transaction."""
    rec = _metadata_target(r, server_id, caller, action)
    new = change(dict(rec["metadata"]))
    if quota:
        _check_metadata_quota(r, caller, new)
    return rec, new


class MetadataRoutes:
    """The metadata and tags write handlers of one worker."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    async def _command(self, caller: Caller, server_id: str, field: str,
                       plan: Callable[[Reader], tuple[dict[str, Any], Any]],
                       payload: dict[str, Any]) -> Any:
        """One ``metadata``/``tags`` command: ``plan(reader)`` -> (server record, the
        field's new value, or None when there is nothing to do) or the refusal, run in the
        read transaction (a refusal writes nothing) and again inside the write transaction,
        where the pending entry and the outbox entry are written.  Returns the new value."""
        with self.store.read() as r:
            if plan(r)[1] is None:
                return None

        def work(c: CommandTxn) -> Any:
            rec, new = plan(c.reader)
            if new is not None:
                c.set_pending(server_id, caller.command_id, {field: new})
                c.put_outbox(rec["cell"], server_id, caller.command_id,
                             _payload(caller, field, payload))
            return new

        committer = self.ctx.committer
        assert committer is not None
        return await committer.submit(work)

    async def _submit(self, caller: Caller, server_id: str, action: str, change: MetadataChange,
                      quota: bool, payload: dict[str, Any]) -> dict[str, str]:
        """A metadata command; returns the server's metadata after it."""
        new: dict[str, str] = await self._command(
            caller, server_id, "metadata",
            lambda r: metadata_command(r, server_id, caller, action, change, quota), payload)
        return new

    async def replace_metadata(self, req: Any) -> tuple[int, bytes]:
        body = V.json_body(req)
        _METADATA.validate(body)
        metadata: dict[str, str] = body["metadata"]
        new = await self._submit(Caller.of(req), req.params[0], "update metadata",
                                 lambda _old: dict(metadata), True,
                                 {"op": "replace", "metadata": metadata})
        return 200, C.dumps({"metadata": new})

    async def merge_metadata(self, req: Any) -> tuple[int, bytes]:
        body = V.json_body(req)
        _METADATA.validate(body)
        metadata: dict[str, str] = body["metadata"]
        new = await self._submit(Caller.of(req), req.params[0], "update metadata",
                                 lambda old: {**old, **metadata}, True,
                                 {"op": "merge", "metadata": metadata})
        return 200, C.dumps({"metadata": new})

    async def set_metadata_item(self, req: Any) -> tuple[int, bytes]:
        server_id, key = req.params
        body = V.json_body(req)
        _META_ITEM.validate(body)
        meta: dict[str, str] = body["meta"]
        if key not in meta:
            raise BadRequest("Request body and URI mismatch")
        value = meta[key]
        await self._submit(Caller.of(req), server_id, "update metadata",
                           lambda old: {**old, key: value}, True,
                           {"op": "set", "key": key, "value": value})
        return 200, C.dumps({"meta": meta})

    async def delete_metadata_item(self, req: Any) -> tuple[int, bytes]:
        server_id, key = req.params

        def change(old: dict[str, str]) -> dict[str, str]:
            if key not in old:
                raise NotFound("Metadata item was not found")
            return {k: v for k, v in old.items() if k != key}

        await self._submit(Caller.of(req), server_id, "delete metadata", change, False,
                           {"op": "delete", "key": key})
        return 204, b""

    # -- tags -----------------------------------------------------------------------------------
    async def _submit_tags(self, req: Any, rule: str, action: str,
                           change: Callable[[list[str]], list[str] | None],
                           payload: dict[str, Any]) -> list[str] | None:
        """A tags command; ``change`` returns None when nothing is to be done (nothing is
        written then).  Returns the server's tags after the command, or None."""
        caller = Caller.of(req)
        server_id = req.params[0]
        new: list[str] | None = await self._command(
            caller, server_id, "tags",
            lambda r: tags_command(r, server_id, caller, rule, action, change), payload)
        return new

    async def replace_tags(self, req: Any) -> tuple[int, bytes]:
        _check_version(req)
        body = V.json_body(req)
        _TAGS.validate(body)
        tags = sorted(set(body["tags"]))
        new = await self._submit_tags(req, "update_all", "update tags", lambda _old: tags,
                                      {"op": "replace", "tags": tags})
        return 200, C.dumps({"tags": new})

    async def add_tag(self, req: Any) -> tuple[int, bytes] | tuple[int, bytes, bytes]:
        _check_version(req)
        server_id, tag = req.params
        _TAG_BODY.validate(V.json_body(req))

        def change(old: list[str]) -> list[str] | None:
            try:
                _TAG.validate(tag)
            except BadRequest as e:
                raise BadRequest(
                    f"Tag '{tag}' is invalid. It must be a non empty string without characters "
                    f"'/' and ','. Validation error message: {e.message}") from None
            if len(old) >= MAX_TAG_COUNT:
                raise BadRequest(f"The number of tags exceeded the per-server limit {MAX_TAG_COUNT}")
            if tag in old:
                return None  # the server has it already: 204, nothing to do
            return sorted([*old, tag])

        location = Links(req).self_href(f"servers/{server_id}/tags", tag)
        new = await self._submit_tags(req, "update", "update tag", change,
                                      {"op": "add", "tag": tag})
        if new is None:
            return 204, b""
        return 201, b"", b"Location: " + location.encode("utf-8", "replace") + b"\r\n"

    async def delete_tag(self, req: Any) -> tuple[int, bytes]:
        _check_version(req)
        server_id, tag = req.params

        def change(old: list[str]) -> list[str]:
            if tag not in old:
                raise NotFound(f"Instance {server_id} has no tag '{tag}'")
            return [t for t in old if t != tag]

        await self._submit_tags(req, "delete", "delete tag", change, {"op": "delete", "tag": tag})
        return 204, b""

    async def clear_tags(self, req: Any) -> tuple[int, bytes]:
        _check_version(req)
        await self._submit_tags(req, "delete_all", "delete tags", lambda _old: [],
                                {"op": "clear"})
        return 204, b""

    def specs(self) -> list[RouteSpec]:
        s = API_ROOT + "/servers/{server_id}"
        return [
            RouteSpec("PUT", s + "/metadata", self.replace_metadata),
            RouteSpec("POST", s + "/metadata", self.merge_metadata),
            RouteSpec("PUT", s + "/metadata/{key}", self.set_metadata_item),
            RouteSpec("DELETE", s + "/metadata/{key}", self.delete_metadata_item),
            RouteSpec("PUT", s + "/tags", self.replace_tags),
            RouteSpec("DELETE", s + "/tags", self.clear_tags),
            RouteSpec("PUT", s + "/tags/{tag}", self.add_tag),
            RouteSpec("DELETE", s + "/tags/{tag}", self.delete_tag),
        ]


def tags_command(r: Reader, server_id: str, caller: Caller, rule: str, action: str,
                 change: Callable[[list[str]], list[str] | None]
                 ) -> tuple[dict[str, Any], list[str] | None]:
    """server_tags: the instance mapping (404), the policy on its project (403), the vm_state
    (409), then ``change`` of the server's tags."""
    rec = server_of(r, server_id)
    if rec is None:
        raise NotFound(f"Instance {server_id} has no mapping to a cell.")
    if not caller.is_admin and rec["project_id"] != caller.project:
        raise C.forbidden(f"os_compute_api:os-server-tags:{rule}")
    if rec["vm_state"] not in METADATA_STATES:
        raise invalid_state(action, server_id, "vm_state", rec["vm_state"])
    return rec, change(list(rec["tags"]))


def _check_version(req: Any) -> None:
    if req.version < 26:
        raise NotFound(C.RESOURCE_NOT_FOUND)  # @wsgi.Controller.api_version("2.26")


def _payload(caller: Caller, action: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"action": action, **extra, "project_id": caller.project, "user_id": caller.user,
            "request_id": caller.command_id}


def routes(ctx: ApiContext) -> list[RouteSpec]:
    return MetadataRoutes(ctx).specs()
