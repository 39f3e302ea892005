"""GET /limits and the quota sets (GET /os-quota-sets/{project_id}[/detail|/defaults])
(nova/api/openstack/compute/limits.py, views/limits.py, quota_sets.py).

Limits come from the ``quota_limits`` catalogue (``Catalog.QUOTA_LIMITS``: key = project
id, or ``""`` for the defaults; value = {resource: limit}); what neither holds takes
Nova's configuration defaults (``DEFAULT_QUOTAS``).  Usage comes from ``quota_usage``,
kept by ``apply`` for instances, cores and ram; Nova counts nothing else here (key pairs
and server group members are per-user resources that the project view shows as 0; the
network resources of nova-network are gone and show -1 / 0).
"""

from __future__ import annotations

from typing import Any

from fastpath.api import common as C
from fastpath.api import query as Q
from fastpath.api.context import ApiContext
from fastpath.api.routes import API_ROOT, RouteSpec
from fastpath.store.reader import Reader

# Nova's quota resources in its registration order (nova/quota.py), with the defaults
# of nova.conf [quota] (the network ones are fixed at -1).
DEFAULT_QUOTAS: dict[str, int] = {
    "instances": 10,
    "cores": 20,
    "ram": 50 * 1024,
    "metadata_items": 128,
    "injected_files": 5,
    "injected_file_content_bytes": 10 * 1024,
    "injected_file_path_bytes": 255,
    "key_pairs": 100,
    "server_groups": 10,
    "server_group_members": 10,
    "fixed_ips": -1,
    "floating_ips": -1,
    "security_groups": -1,
    "security_group_rules": -1,
}
# What each quota-sets view leaves out, by microversion.
QUOTAS_FILTERED_V236 = ("fixed_ips", "floating_ips", "security_group_rules", "security_groups")
QUOTAS_FILTERED_V257 = QUOTAS_FILTERED_V236 + (
    "injected_files", "injected_file_content_bytes", "injected_file_path_bytes")
LIMITS_FILTERED_V236 = ("floating_ips", "security_groups", "security_group_rules")
LIMITS_FILTERED_V257 = LIMITS_FILTERED_V236 + ("injected_files", "injected_file_content_bytes")
# Sample order of the absolute limits.
LIMIT_NAMES: tuple[tuple[str, str], ...] = (
    ("maxImageMeta", "metadata_items"),
    ("maxPersonality", "injected_files"),
    ("maxPersonalitySize", "injected_file_content_bytes"),
    ("maxSecurityGroupRules", "security_group_rules"),
    ("maxSecurityGroups", "security_groups"),
    ("maxServerMeta", "metadata_items"),
    ("maxTotalCores", "cores"),
    ("maxTotalFloatingIps", "floating_ips"),
    ("maxTotalInstances", "instances"),
    ("maxTotalKeypairs", "key_pairs"),
    ("maxTotalRAMSize", "ram"),
    ("maxServerGroups", "server_groups"),
    ("maxServerGroupMembers", "server_group_members"),
)
USED_NAMES: tuple[tuple[str, str], ...] = (
    ("totalCoresUsed", "cores"),
    ("totalInstancesUsed", "instances"),
    ("totalRAMUsed", "ram"),
    ("totalSecurityGroupsUsed", "security_groups"),
    ("totalFloatingIpsUsed", "floating_ips"),
    ("totalServerGroupsUsed", "server_groups"),
)


def _filtered(version: int, v236: tuple[str, ...], v257: tuple[str, ...]) -> tuple[str, ...]:
    """What a view leaves out at 2.``version``: nova-network's resources from 2.36, the
    personality (injected files) ones too from 2.57."""
    return v257 if version >= 57 else v236 if version >= 36 else ()


def project_limits(r: Reader, project: str) -> dict[str, int]:
    """Nova's configuration defaults < stored defaults < the project's own limits."""
    return {**DEFAULT_QUOTAS, **r.quota_limits(project)}


def default_limits(r: Reader) -> dict[str, int]:
    # No project key is empty: "" reads the stored defaults alone.
    return {**DEFAULT_QUOTAS, **r.quota_limits("")}


def in_use(r: Reader, project: str) -> dict[str, int]:
    usage = r.quota_usage(project)
    out = dict.fromkeys(DEFAULT_QUOTAS, 0)
    for k in ("instances", "cores", "ram"):
        out[k] = int(usage.get(k, 0))
    return out


def limits_view(limits: dict[str, int], used: dict[str, int], version: int) -> dict[str, Any]:
    filtered = _filtered(version, LIMITS_FILTERED_V236, LIMITS_FILTERED_V257)
    absolute: dict[str, int] = {}
    for name, resource in LIMIT_NAMES:
        if resource in filtered or limits.get(resource) is None:
            continue
        if name == "maxImageMeta" and version >= 39:
            continue
        absolute[name] = limits[resource]
    for name, resource in USED_NAMES:
        if resource not in filtered:
            absolute[name] = used[resource]
    return {"limits": {"absolute": absolute, "rate": []}}


def quota_set(project_id: str, values: dict[str, Any], version: int) -> dict[str, Any]:
    filtered = _filtered(version, QUOTAS_FILTERED_V236, QUOTAS_FILTERED_V257)
    out: dict[str, Any] = {"id": project_id}
    for resource in DEFAULT_QUOTAS:
        if resource not in filtered and resource in values:
            out[resource] = values[resource]
    return {"quota_set": out}


def routes(ctx: ApiContext) -> list[RouteSpec]:
    def limits(req: Any, r: Reader) -> tuple[int, bytes]:
        q = Q.validate(Q.Query.of(req), {"tenant_id": Q.any_string}, req.version < 75)
        project = req.project or ""
        tenant = q.get("tenant_id")
        if tenant is not None:
            if not req.is_admin:
                raise C.forbidden("os_compute_api:limits:other_project")
            project = tenant
        body = limits_view(project_limits(r, project), in_use(r, project), req.version)
        return 200, C.dumps(body)

    def check_project(req: Any, project_id: str, action: str) -> None:
        # PROJECT_READER_OR_ADMIN on the target project.
        if not req.is_admin and req.project != project_id:
            raise C.forbidden(f"os_compute_api:os-quota-sets:{action}")

    def show(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.validate(Q.Query.of(req), {"user_id": Q.any_string}, req.version < 75)
        project_id = req.params[0]
        check_project(req, project_id, "show")
        # ?user_id=: fastpath keeps no per-user quotas, so a user's are the project's.
        return 200, C.dumps(quota_set(project_id, project_limits(r, project_id), req.version))

    def detail(req: Any, r: Reader) -> tuple[int, bytes]:
        Q.validate(Q.Query.of(req), {"user_id": Q.any_string}, req.version < 75)
        project_id = req.params[0]
        check_project(req, project_id, "detail")
        limits = project_limits(r, project_id)
        used = in_use(r, project_id)
        values = {k: {"in_use": used[k], "limit": v, "reserved": 0} for k, v in limits.items()
                  if k in DEFAULT_QUOTAS}
        return 200, C.dumps(quota_set(project_id, values, req.version))

    def defaults(req: Any, r: Reader) -> tuple[int, bytes]:
        # defaults_query: anything goes until 2.101; nothing from 2.102.  Any user may ask.
        Q.strict(req)
        return 200, C.dumps(quota_set(req.params[0], default_limits(r), req.version))

    qs = API_ROOT + "/os-quota-sets/{project_id}"
    return [
        RouteSpec("GET", API_ROOT + "/limits", C.read_route(ctx, limits)),
        RouteSpec("GET", qs, C.read_route(ctx, show)),
        RouteSpec("GET", qs + "/detail", C.read_route(ctx, detail)),
        RouteSpec("GET", qs + "/defaults", C.read_route(ctx, defaults)),
    ]
