"""Every fastpath setting, declared once.

The table below feeds the TOML loader, the command-line flags, the ``--set key=value``
override and the settings document (``fastpath settings --markdown``, kept in
``docs/settings.md``).  A setting is addressed by its dotted name; in TOML a dotted name
``http.max_body_size`` is the key ``max_body_size`` of the table ``[http]``.

Precedence, lowest first: the defaults here, the TOML file (``--config``), then flags.
A bad value is refused at start with a message that names the key and what is allowed
(:class:`SettingsError`; the CLI exits with code 2).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastpath.errors import SettingsError


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[
            self.type
        ]
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} from {_fmt(self.minimum)} to {_fmt(self.maximum)}"
        if self.minimum is not None:
            return f"{kind} >= {_fmt(self.minimum)}"
        return kind

    def coerce(self, value: Any, origin: str) -> Any:
        """Validate ``value`` (from TOML or a flag string) and return it typed."""
        v = value
        try:
            if isinstance(v, str) and self.type is not str:
                v = _parse_text(v, self.type)
            if self.type is bool:
                if not isinstance(v, bool):
                    raise ValueError
            elif self.type is int:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError
            elif self.type is float:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ValueError
                v = float(v)
            elif self.type is str:
                if not isinstance(v, str):
                    raise ValueError
        except ValueError:
            raise SettingsError(
                f"{origin}: setting '{self.name}' = {value!r} is invalid: expected {self.allowed()}"
            ) from None
        if self.choices is not None and v not in self.choices:
            raise SettingsError(
                f"{origin}: setting '{self.name}' = {value!r} is invalid: expected {self.allowed()}"
            )
        if (self.minimum is not None and v < self.minimum) or (
            self.maximum is not None and v > self.maximum
        ):
            raise SettingsError(
                f"{origin}: setting '{self.name}' = {value!r} is out of range: expected {self.allowed()}"
            )
        if self.check is not None:
            problem = self.check(v)
            if problem:
                raise SettingsError(f"{origin}: setting '{self.name}' = {value!r} is invalid: {problem}")
        return v


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _parse_text(text: str, typ: type) -> Any:
    t = text.strip()
    if typ is bool:
        low = t.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if typ is int:
        return int(t, 10)
    if typ is float:
        return float(t)
    return t


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:8774``) into host and port."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("IPv6 addresses are written [ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT")
    if not host:
        raise ValueError("the host part is empty (use 0.0.0.0 for every address)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)


def _check_bind(value: str) -> str | None:
    try:
        parse_bind(value)
    except ValueError as exc:
        return f"expected HOST:PORT ({exc})"
    return None


def _check_url(value: str) -> str | None:
    if value and not (value.startswith("http://") or value.startswith("https://")):
        return "expected an http:// or https:// URL, or an empty string"
    return None


def _check_name(value: str) -> str | None:
    if not value or ":" in value or any(c.isspace() for c in value):
        return "expected a non-empty name without ':' or spaces"
    return None


def _check_cell_names(value: str) -> str | None:
    import re

    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", n)]
    if bad:
        return f"invalid cell name(s) {', '.join(bad)}: letters, digits, '-' and '_' only"
    if len(set(names)) != len(names):
        return "a cell is named twice"
    return None


# Response extension groups that api.disabled_extensions may name (the views' table,
# fastpath.api.views.table.GROUPS, is the source; a unit test keeps the two equal).
EXTENSION_GROUPS: tuple[str, ...] = (
    "OS-DCF", "OS-EXT-AZ", "OS-EXT-IPS", "OS-EXT-IPS-MAC", "OS-EXT-SRV-ATTR", "OS-EXT-STS",
    "OS-SRV-USG", "os-config-drive", "os-extended-volumes", "os-keypairs", "os-security-groups",
)


def _check_extensions(value: str) -> str | None:
    unknown = sorted({x.strip() for x in value.split(",") if x.strip()} - set(EXTENSION_GROUPS))
    if unknown:
        return f"unknown group(s) {', '.join(unknown)} (known: {', '.join(EXTENSION_GROUPS)})"
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", str, "./data", "Directory that holds the store and the run files."),
    Setting("bind", str, "127.0.0.1:8774", "Address to listen on, HOST:PORT.", check=_check_bind),
    Setting(
        "workers", int, 0, "Number of worker processes; 0 means one per core.", minimum=0, maximum=256
    ),
    Setting("backlog", int, 1024, "Listen backlog of each worker slot's socket.", minimum=1, maximum=65535),
    Setting(
        "http.max_header_size", int, 16384,
        "Largest request line plus headers, in bytes; larger requests get 431.",
        minimum=1024, maximum=1048576,
    ),
    Setting(
        "http.max_headers", int, 100, "Most header fields in one request; more get 431.",
        minimum=8, maximum=10000,
    ),
    Setting(
        "http.max_body_size", int, 1048576, "Largest request body, in bytes; larger bodies get 413.",
        minimum=0, maximum=1073741824,
    ),
    Setting(
        "http.header_timeout", float, 10.0,
        "Seconds a client may take to send a request's line and headers (slowloris guard).",
        minimum=0.5, maximum=3600,
    ),
    Setting(
        "http.body_timeout", float, 30.0, "Seconds a client may stay silent while sending a body.",
        minimum=0.5, maximum=3600,
    ),
    Setting(
        "http.keepalive_timeout", float, 30.0, "Seconds an idle keep-alive connection is kept open.",
        minimum=0.5, maximum=3600,
    ),
    Setting(
        "http.max_connections", int, 10000,
        "Open connections per worker; a connection over the cap gets 503 and is closed.",
        minimum=1, maximum=1000000,
    ),
    Setting(
        "http.public_url", str, "",
        "Base URL for links in responses (e.g. https://compute.example.com); empty: from the Host header.",
        check=_check_url,
    ),
    Setting(
        "auth.strategy", str, "noauth2",
        "How tokens are checked. noauth2: X-Auth-Token is 'user:project' (development mode).",
        choices=("noauth2",),
    ),
    Setting(
        "auth.default_project", str, "default",
        "Project of an opaque token without ':' (openstacksdk's auth_type none sends 'notused').",
        check=_check_name,
    ),
    Setting("auth.admin_user", str, "admin", "User name that holds the admin role.", check=_check_name),
    Setting(
        "master.graceful_timeout", float, 30.0,
        "Seconds workers get to finish in-flight requests on SIGTERM or reload before SIGKILL.",
        minimum=0.1, maximum=3600,
    ),
    Setting(
        "master.worker_timeout", float, 30.0,
        "A worker whose heartbeat is older than this many seconds is killed and replaced.",
        minimum=2, maximum=3600,
    ),
    Setting(
        "master.sidecar_timeout", float, 300.0,
        "A sidecar (cell, cellsync, forwarder) whose heartbeat is older than this many "
        "seconds is killed and restarted (generous: a resync beats only between batches).",
        minimum=2, maximum=86400,
    ),
    Setting(
        "master.respawn_backoff_max", float, 10.0,
        "Longest wait before respawning a worker that keeps dying, in seconds.",
        minimum=0.1, maximum=600,
    ),
    Setting(
        "store.map_size", int, 16 << 30,
        "Initial size of the store's memory map, in bytes (address space, not disk: LMDB files are sparse).",
        minimum=1 << 20, maximum=1 << 44,
    ),
    Setting(
        "store.max_map_size", int, 1 << 40,
        "Largest size the store's map may grow to, in bytes; beyond it writes fail with a clear error.",
        minimum=1 << 20, maximum=1 << 46,
    ),
    Setting(
        "store.max_readers", int, 1024,
        "Concurrent read transactions of all processes on the store (LMDB reader table).",
        minimum=16, maximum=65536,
    ),
    Setting(
        "store.tombstone_retention", float, 86400.0 * 7,
        "Seconds a deleted server stays listed as DELETED by changes-since before its tombstone is purged.",
        minimum=60, maximum=86400.0 * 3650,
    ),
    Setting(
        "api.max_limit", int, 1000,
        "Largest page a list request returns (Nova's osapi_max_limit).",
        minimum=1, maximum=100000,
    ),
    Setting(
        "api.disabled_extensions", str, "",
        "Comma-separated response extension groups left out of server views "
        "(e.g. 'OS-EXT-SRV-ATTR,OS-EXT-STS'); empty: all on, as Nova.",
        check=_check_extensions,
    ),
    Setting(
        "api.commit_group_max", int, 512,
        "Most commands of one worker that share one durable store commit (group commit).",
        minimum=1, maximum=100000,
    ),
    Setting(
        "api.commit_queue_max", int, 8192,
        "Most commands of one worker waiting for or in a commit; beyond, commands get 503 with "
        "Retry-After (memory stays bounded under overload).",
        minimum=1, maximum=1000000,
    ),
    Setting(
        "cell.hosts", int, 4, "Simulated compute hosts of each local cell.", minimum=1, maximum=10000,
    ),
    Setting(
        "cell.host_vcpus", int, 64, "vCPUs of each simulated host.", minimum=1, maximum=100000,
    ),
    Setting(
        "cell.host_ram_mb", int, 262144, "RAM of each simulated host, in MiB.",
        minimum=512, maximum=1 << 30,
    ),
    Setting(
        "cell.host_disk_gb", int, 4000, "Disk of each simulated host, in GiB.",
        minimum=1, maximum=1 << 30,
    ),
    Setting(
        "cell.build_delay", float, 0.5, "Seconds a simulated build takes (BUILD before ACTIVE).",
        minimum=0, maximum=3600,
    ),
    Setting(
        "cell.action_delay", float, 0.2,
        "Seconds a simulated server action takes (reboot, stop, start, ...).",
        minimum=0, maximum=3600,
    ),
    Setting(
        "cell.failure_rate", float, 0.0,
        "Share of simulated builds and actions that fail (ERROR with a fault), 0 to 1.",
        minimum=0, maximum=1,
    ),
    Setting(
        "cell.feed_min_age", float, 3600.0,
        "Seconds a cell keeps every change-feed entry, even ones all its consumers applied.",
        minimum=0, maximum=86400.0 * 365,
    ),
    Setting(
        "cell.feed_keep", int, 10000,
        "Newest change-feed entries a cell always keeps, whatever its consumers applied.",
        minimum=0, maximum=1 << 40,
    ),
    Setting(
        "cell.consumer_timeout", float, 86400.0,
        "Seconds after which a silent feed consumer (an API host's cellsync) no longer holds "
        "the cell's feed pruning back; if it returns it finds a gap and resyncs.",
        minimum=60, maximum=86400.0 * 3650,
    ),
    Setting(
        "cell.done_commands_kept", int, 50,
        "Newest executed command ids a server's record lists in done_commands (the API drops "
        "a command's pending values when it is listed).",
        minimum=1, maximum=100000,
    ),
    Setting(
        "cell.maintenance_interval", float, 10.0,
        "Seconds between a cell's housekeeping runs (feed pruning).",
        minimum=0.1, maximum=86400,
    ),
    Setting(
        "cellsync.batch", int, 500,
        "Most change-feed entries cellsync applies in one store write transaction.",
        minimum=1, maximum=100000,
    ),
    Setting(
        "cellsync.txn_budget_ms", float, 20.0,
        "Target time of one cellsync write transaction, in ms: batches shrink when a "
        "transaction takes longer, since API commands wait for the same single LMDB writer.",
        minimum=1, maximum=10000,
    ),
    Setting(
        "cellsync.backlog_batch", int, 2000,
        "Most change-feed entries in one cellsync write transaction while a cell is behind "
        "by more than two cellsync.batch (fewer durable commits per change); back to "
        "cellsync.batch as soon as it is not.",
        minimum=1, maximum=100000,
    ),
    Setting(
        "cellsync.backlog_txn_budget_ms", float, 50.0,
        "Target time of one cellsync write transaction while a cell is behind (see "
        "cellsync.backlog_batch); API commands wait for the same single LMDB writer.",
        minimum=1, maximum=10000,
    ),
    Setting(
        "cellsync.shards", int, 2,
        "Processes among which the cellsync daemon shares the cells: each tails its share "
        "(read, project, render, apply) on its own; 1: one process for every cell.",
        minimum=1, maximum=64,
    ),
    Setting(
        "cellsync.workers", int, 0,
        "Worker processes (per cellsync shard) in which busy cells' next batches are read, "
        "projected and rendered while the shard applies the other cells' (0: none).",
        minimum=0, maximum=64,
    ),
    Setting(
        "cellsync.ack_interval", float, 1.0,
        "Seconds between cellsync's reports of its cursor to each cell (feed pruning).",
        minimum=0.01, maximum=3600,
    ),
    Setting(
        "cellsync.consumer", str, "",
        "Name this cellsync reports to the cells as a feed consumer; empty: the host name "
        "and the store path.",
    ),
    Setting(
        "cell.poll_interval", float, 1.0,
        "Seconds an idle cell service waits before looking at its inbox again if its bell "
        "(rung by the forwarder on delivery) stays silent.",
        minimum=0.001, maximum=10,
    ),
    Setting(
        "standalone.cells", str, "cell1,cell2",
        "Local cells that `fastpath serve` runs under its master (comma-separated names; "
        "empty: none).",
        check=_check_cell_names,
    ),
    Setting(
        "standalone.cellsync", bool, True,
        "Run cellsync under the master of `fastpath serve`.",
    ),
    Setting(
        "standalone.forwarder", bool, True,
        "Run the forwarder under the master of `fastpath serve`.",
    ),
    Setting(
        "cellsync.poll_interval", float, 1.0,
        "Seconds idle cellsync waits for its bell (rung by the cells on every commit) "
        "before looking at the change feeds anyway.",
        minimum=0.001, maximum=60,
    ),
    Setting(
        "forwarder.poll_interval", float, 1.0,
        "Seconds the idle forwarder waits for its bell (rung by the API after a command) "
        "before looking at the outbox anyway.",
        minimum=0.001, maximum=60,
    ),
    Setting(
        "forwarder.batch", int, 1000,
        "Outbox entries the forwarder delivers per round (one cell transaction per cell, one "
        "store transaction to clear them).",
        minimum=1, maximum=100000,
    ),
    Setting(
        "forwarder.retry_initial", float, 0.05,
        "Seconds before the forwarder retries a cell that failed; doubles per failure.",
        minimum=0.001, maximum=60,
    ),
    Setting(
        "forwarder.retry_max", float, 30.0,
        "Longest back-off, in seconds, between two delivery attempts to a failing cell.",
        minimum=0.01, maximum=3600,
    ),
    Setting(
        "forwarder.busy_timeout_ms", int, 200,
        "Milliseconds the forwarder waits for a locked cell database before counting a failure.",
        minimum=0, maximum=60000,
    ),
    Setting(
        "log.level", str, "info", "Log level of every process.",
        choices=("debug", "info", "warning", "error"),
    ),
    Setting(
        "debug.test_routes", bool, False,
        "Serve /debug/* routes used by the integration tests (never in production).",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class Settings(Mapping[str, Any]):
    """An immutable, validated set of values for every setting."""

    __slots__ = ("_values", "source")

    def __init__(self, values: Mapping[str, Any], source: str = "defaults") -> None:
        self._values = dict(values)
        self.source = source

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def worker_count(self) -> int:
        n = int(self["workers"])
        return n if n > 0 else (os.cpu_count() or 1)

    @property
    def standalone_cells(self) -> list[str]:
        """The local cells of ``standalone.cells``, in the order given."""
        return [n.strip() for n in str(self["standalone.cells"]).split(",") if n.strip()]

    @property
    def bind_address(self) -> tuple[str, int]:
        return parse_bind(self["bind"])

    def replace(self, **overrides: Any) -> Settings:
        values = dict(self._values)
        for key, value in overrides.items():
            name = key.replace("__", ".")
            values[name] = BY_NAME[name].coerce(value, "override")
        return Settings(values, self.source)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def load(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the TOML file, then ``overrides`` (dotted names → values or strings)."""
    values = {s.name: s.default for s in SETTINGS}
    source = "defaults"
    if config_file:
        try:
            with open(config_file, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise SettingsError(f"config file {config_file!r} does not exist") from None
        except OSError as exc:
            raise SettingsError(f"config file {config_file!r} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_file!r} is not valid TOML: {exc}") from None
        for name, value in _flatten(table):
            setting = BY_NAME.get(name)
            if setting is None:
                raise SettingsError(
                    f"{config_file}: unknown setting '{name}' (known: {', '.join(sorted(BY_NAME))})"
                )
            values[name] = setting.coerce(value, config_file)
        source = config_file
    for name, value in (overrides or {}).items():
        setting = BY_NAME.get(name)
        if setting is None:
            raise SettingsError(f"unknown setting '{name}' (known: {', '.join(sorted(BY_NAME))})")
        values[name] = setting.coerce(value, "command line")
    return Settings(values, source)


def markdown() -> str:
    """The settings document (docs/settings.md is this text; a test keeps them equal)."""
    lines = [
        "# fastpath settings",
        "",
        "Generated by `fastpath settings --markdown`; do not edit by hand.",
        "Set them in the TOML file given to `--config` (a dotted name `a.b` is key `b` of table",
        "`[a]`), or on the command line with `--set NAME=VALUE`; flags win over the file.",
        "",
        "| name | default | allowed | meaning |",
        "|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = repr(s.default) if s.type is str else str(s.default).lower() if s.type is bool else s.default
        lines.append(f"| `{s.name}` | `{default}` | {s.allowed()} | {s.help} |")
    return "\n".join(lines) + "\n"
