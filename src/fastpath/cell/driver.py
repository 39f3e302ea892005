"""Compute drivers: what a cell calls to build and operate servers (issue 6, "The cell").

:class:`ComputeDriver` is the interface the cell service (:mod:`fastpath.cell.service`) drives;
every call returns or raises synchronously (the service spreads a command's phases over time
itself, using the driver's ``build_delay`` and ``action_delay``).  A failure is a
:class:`DriverFault`; the service turns it into ERROR plus a fault record.

:class:`SimulatedDriver` is the default: configurable hosts with vCPU/RAM/disk capacity, fixed
IPv4 addresses from one per-cell pool, MACs ``fa:16:3e:xx:xx:xx`` and an injected failure rate.

Placement is the scheduled host when the API chose one and it has room, else *most free RAM
first* among the hosts with room for the flavor's vCPUs, RAM and disk (ties: host name order).
That spreads servers the way Nova's default RAM weigher does.  Disk is ``root + ephemeral`` GB
plus swap (MiB) rounded up to whole GB.  No overcommit.

A resize holds two claims until it is confirmed or reverted, as Nova's resource tracker does:
the old flavor where the server was, the new one on the destination (the same host when it
has room: ``allow_resize_to_same_host``).  Confirm releases the old claim, revert the new one.

The driver keeps its claims in memory; after a restart :meth:`SimulatedDriver.restore` takes
them back from the cell database (every live server's host, flavor, fixed IP, MAC, power
state and unfinished resize), so a restarted cell neither double-allocates an address nor
overcommits a host.
"""

from __future__ import annotations

import abc
import heapq
import ipaddress
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

NO_VALID_HOST = "No valid host was found."

# Nova's power states (nova.compute.power_state).
NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED = 0, 1, 3, 4, 6, 7


class DriverFault(Exception):
    """A driver operation failed; ``code`` and ``message`` become the server's fault."""

    def __init__(self, code: int, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class HostSpec:
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    az: str = "nova"
    node: str | None = None  # the hypervisor node name; the host name if not given

    @property
    def node_name(self) -> str:
        return self.node or self.name


@dataclass(frozen=True)
class Spawned:
    """Where a server was built and its network (one VIF, one fixed IPv4)."""

    host: str
    node: str
    availability_zone: str
    mac: str | None  # None: built without a network (the API's networks "none")
    ip: str | None
    network: str

    def network_info(self) -> list[dict[str, Any]]:
        """The ``set_network`` argument."""
        if self.mac is None or self.ip is None:
            return []
        return [{"mac": self.mac, "network": self.network,
                 "ips": [{"addr": self.ip, "version": 4, "type": "fixed"}]}]


@dataclass(frozen=True)
class HostUsage:
    spec: HostSpec
    vcpus_used: int
    ram_mb_used: int
    disk_gb_used: int


def flavor_needs(flavor: Mapping[str, Any]) -> tuple[int, int, int]:
    """(vcpus, ram MiB, disk GB) of a flavor in the record's keys (vcpus, ram, disk, ...)."""
    swap_gb = -(-int(flavor.get("swap") or 0) // 1024)
    disk = int(flavor.get("disk") or 0) + int(flavor.get("ephemeral") or 0) + swap_gb
    return int(flavor["vcpus"]), int(flavor["ram"]), disk


class ComputeDriver(abc.ABC):
    """The hypervisor side of a cell.  Calls are synchronous; they return or raise."""

    build_delay: float = 0.0   # seconds from BUILD to ACTIVE/ERROR
    action_delay: float = 0.0  # seconds a reboot/stop/start/... stays in its task_state

    @abc.abstractmethod
    def spawn(self, uuid: str, flavor: Mapping[str, Any], host: str | None = None,
              network: bool = True) -> Spawned:
        """Claim a host (``host`` if it has room) and, with ``network``, a fixed IP and a
        MAC; DriverFault if impossible."""

    @abc.abstractmethod
    def reboot(self, uuid: str, hard: bool = False) -> None: ...

    @abc.abstractmethod
    def power_off(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def power_on(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def pause(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def unpause(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def suspend(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def resume(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def rebuild(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def snapshot(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def resize_claim(self, uuid: str, flavor: Mapping[str, Any]) -> tuple[str, str]:
        """Claim ``flavor`` for a resize beside the current claim; (host, node) it got.

        Idempotent: a second call returns the claim already held.
        """

    @abc.abstractmethod
    def confirm_resize(self, uuid: str) -> list[str]:
        """Keep the new claim, release the old one; the hosts whose usage changed."""

    @abc.abstractmethod
    def revert_resize(self, uuid: str) -> list[str]:
        """Keep the old claim, release the new one; the hosts whose usage changed."""

    @abc.abstractmethod
    def destroy(self, uuid: str) -> str | None:
        """Remove a server and release what it held (idempotent); returns its host, if any."""

    @abc.abstractmethod
    def hosts_of(self, uuid: str) -> list[str]:
        """The hosts where ``uuid`` holds a claim (two during a resize)."""

    @abc.abstractmethod
    def restore(self, uuid: str, host: str, flavor: Mapping[str, Any], ip: str | None,
                mac: str | None, power_state: int,
                resize: tuple[str, Mapping[str, Any]] | None = None) -> None:
        """Take back a claim recorded in the cell database (after a restart)."""

    @abc.abstractmethod
    def hosts(self) -> list[HostUsage]:
        """Every host with its capacity and current usage (for the ``hosts`` table)."""


class _IPPool:
    """Fixed IPv4 addresses of one network: lowest released first, then the next unused.

    The network and broadcast addresses and the first host address (the gateway) are never
    handed out.
    """

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self.network = network
        self._next: Iterator[ipaddress.IPv4Address] = iter(network.hosts())
        next(self._next, None)  # the gateway
        self._free: list[int] = []
        self._used: set[int] = set()

    def allocate(self) -> str | None:
        while self._free:
            n = heapq.heappop(self._free)
            if n not in self._used:
                self._used.add(n)
                return str(ipaddress.IPv4Address(n))
        for addr in self._next:
            if int(addr) not in self._used:  # taken back by reserve() after a restart
                self._used.add(int(addr))
                return str(addr)
        return None

    def reserve(self, ip: str) -> None:
        """Mark ``ip`` as in use (a claim restored from the database)."""
        self._used.add(int(ipaddress.IPv4Address(ip)))

    def release(self, ip: str) -> None:
        n = int(ipaddress.IPv4Address(ip))
        if n in self._used:
            self._used.discard(n)
            heapq.heappush(self._free, n)


class SimulatedDriver(ComputeDriver):
    """An in-memory hypervisor: capacity accounting, fixed IPs, MACs, injected failures.

    ``failure_rate`` applies to spawn and to every power action (reboot, power_off, ...), not
    to destroy; a failure is decided before anything is claimed, so it holds no capacity.
    """

    def __init__(self, hosts: list[HostSpec],
                 ip_pool: ipaddress.IPv4Network | str = "10.0.0.0/16",
                 build_delay: float = 0.0, action_delay: float = 0.0,
                 failure_rate: float = 0.0, seed: int | None = None,
                 network: str = "private") -> None:
        if not hosts:
            raise ValueError("SimulatedDriver needs at least one host")
        pool = ipaddress.ip_network(ip_pool) if isinstance(ip_pool, str) else ip_pool
        if not isinstance(pool, ipaddress.IPv4Network):
            raise ValueError(f"ip_pool must be an IPv4 network, not {ip_pool!r}")
        self.specs = {h.name: h for h in hosts}
        self.build_delay = build_delay
        self.action_delay = action_delay
        self.failure_rate = failure_rate
        self.network = network
        self._rng = random.Random(seed)
        self._pool = _IPPool(pool)
        self._used: dict[str, list[int]] = {h.name: [0, 0, 0] for h in hosts}
        # uuid -> (host, needs, ip, mac); ip/mac None for a build restored before its network
        self._servers: dict[str, tuple[str, tuple[int, int, int], str | None, str | None]] = {}
        # uuid -> (host, needs) of the new flavor while a resize is unconfirmed
        self._resizes: dict[str, tuple[str, tuple[int, int, int]]] = {}
        self._power: dict[str, int] = {}
        self._macs: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------
    def _maybe_fail(self, what: str, uuid: str) -> None:
        if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            raise DriverFault(500, f"Simulated failure: {what} of instance {uuid}")

    def _require(self, uuid: str) -> None:
        if uuid not in self._servers:
            raise DriverFault(404, f"Instance {uuid} could not be found.")

    def _new_mac(self) -> str:
        while True:
            tail = self._rng.getrandbits(24)
            mac = f"fa:16:3e:{tail >> 16:02x}:{(tail >> 8) & 0xFF:02x}:{tail & 0xFF:02x}"
            if mac not in self._macs:
                self._macs.add(mac)
                return mac

    def _fits(self, name: str, needs: tuple[int, int, int]) -> bool:
        spec, used = self.specs[name], self._used[name]
        caps = (spec.vcpus, spec.ram_mb, spec.disk_gb)
        return all(u + n <= c for u, n, c in zip(used, needs, caps, strict=True))

    def _pick_host(self, needs: tuple[int, int, int],
                   prefer: str | None = None) -> HostSpec | None:
        if prefer is not None and prefer in self.specs and self._fits(prefer, needs):
            return self.specs[prefer]
        best: HostSpec | None = None
        best_free = -1
        for name in sorted(self.specs):
            if self._fits(name, needs):
                free = self.specs[name].ram_mb - self._used[name][1]
                if free > best_free:
                    best, best_free = self.specs[name], free
        return best

    def _claim(self, host: str, needs: tuple[int, int, int], sign: int = 1) -> None:
        used = self._used[host]
        for i, n in enumerate(needs):
            used[i] += sign * n

    # -- the interface ---------------------------------------------------------------------
    def _allocate_ip(self) -> str:
        ip = self._pool.allocate()
        if ip is None:
            raise DriverFault(500, f"No more fixed IP addresses in {self._pool.network}.")
        return ip

    def spawn(self, uuid: str, flavor: Mapping[str, Any], host: str | None = None,
              network: bool = True) -> Spawned:
        if uuid in self._servers:  # a retried spawn returns what was claimed
            held_host, needs, held_ip, held_mac = self._servers[uuid]
            if network and (held_ip is None or held_mac is None):  # restored before its network
                held_ip = held_ip or self._allocate_ip()
                held_mac = held_mac or self._new_mac()
                self._servers[uuid] = (held_host, needs, held_ip, held_mac)
            held = self.specs[held_host]
            return Spawned(held_host, held.node_name, held.az, held_mac, held_ip, self.network)
        self._maybe_fail("spawn", uuid)
        needs = flavor_needs(flavor)
        spec = self._pick_host(needs, host)
        if spec is None:
            raise DriverFault(500, NO_VALID_HOST)
        ip = self._allocate_ip() if network else None
        mac = self._new_mac() if network else None
        self._claim(spec.name, needs)
        self._servers[uuid] = (spec.name, needs, ip, mac)
        self._power[uuid] = RUNNING
        return Spawned(spec.name, spec.node_name, spec.az, mac, ip, self.network)

    def _power_action(self, uuid: str, what: str, state: int) -> None:
        self._require(uuid)
        self._maybe_fail(what, uuid)
        self._power[uuid] = state

    def reboot(self, uuid: str, hard: bool = False) -> None:
        self._power_action(uuid, "hard reboot" if hard else "reboot", RUNNING)

    def power_off(self, uuid: str) -> None:
        self._power_action(uuid, "power off", SHUTDOWN)

    def power_on(self, uuid: str) -> None:
        self._power_action(uuid, "power on", RUNNING)

    def pause(self, uuid: str) -> None:
        self._power_action(uuid, "pause", PAUSED)

    def unpause(self, uuid: str) -> None:
        self._power_action(uuid, "unpause", RUNNING)

    def suspend(self, uuid: str) -> None:
        self._power_action(uuid, "suspend", SUSPENDED)

    def resume(self, uuid: str) -> None:
        self._power_action(uuid, "resume", RUNNING)

    def rebuild(self, uuid: str) -> None:
        self._power_action(uuid, "rebuild", RUNNING)

    def snapshot(self, uuid: str) -> None:
        self._require(uuid)
        self._maybe_fail("snapshot", uuid)

    def resize_claim(self, uuid: str, flavor: Mapping[str, Any]) -> tuple[str, str]:
        self._require(uuid)
        if uuid in self._resizes:
            host = self._resizes[uuid][0]
            return host, self.specs[host].node_name
        self._maybe_fail("resize", uuid)
        needs = flavor_needs(flavor)
        spec = self._pick_host(needs, self._servers[uuid][0])
        if spec is None:
            raise DriverFault(500, NO_VALID_HOST)
        self._claim(spec.name, needs)
        self._resizes[uuid] = (spec.name, needs)
        return spec.name, spec.node_name

    def confirm_resize(self, uuid: str) -> list[str]:
        new = self._resizes.pop(uuid, None)
        if new is None or uuid not in self._servers:
            return []
        old_host, old_needs, ip, mac = self._servers[uuid]
        self._claim(old_host, old_needs, -1)
        self._servers[uuid] = (new[0], new[1], ip, mac)
        return sorted({old_host, new[0]})

    def revert_resize(self, uuid: str) -> list[str]:
        new = self._resizes.pop(uuid, None)
        if new is None:
            return []
        self._claim(new[0], new[1], -1)
        return [new[0]]

    def destroy(self, uuid: str) -> str | None:
        held = self._servers.pop(uuid, None)
        self._power.pop(uuid, None)
        new = self._resizes.pop(uuid, None)
        if new is not None:
            self._claim(new[0], new[1], -1)
        if held is None:
            return None
        host, needs, ip, mac = held
        self._claim(host, needs, -1)
        if ip is not None:
            self._pool.release(ip)
        if mac is not None:
            self._macs.discard(mac)
        return host

    def hosts_of(self, uuid: str) -> list[str]:
        held = self._servers.get(uuid)
        new = self._resizes.get(uuid)
        return sorted({h for h in (held and held[0], new and new[0]) if h})

    def restore(self, uuid: str, host: str, flavor: Mapping[str, Any], ip: str | None,
                mac: str | None, power_state: int,
                resize: tuple[str, Mapping[str, Any]] | None = None) -> None:
        """Take back a claim recorded in the cell database (after a restart).

        ``host``/``flavor``: where the server is claimed (the *old* flavor and source host
        while a resize is unconfirmed, ``resize`` then being the new claim).  A host the
        driver no longer has is skipped with its claim (the database still tells).
        """
        if uuid in self._servers or host not in self.specs:
            return
        needs = flavor_needs(flavor)
        self._claim(host, needs)
        if ip is not None:
            self._pool.reserve(ip)
        if mac is not None:
            self._macs.add(mac)
        self._servers[uuid] = (host, needs, ip, mac)
        self._power[uuid] = power_state
        if resize is not None and resize[0] in self.specs:
            new_needs = flavor_needs(resize[1])
            self._claim(resize[0], new_needs)
            self._resizes[uuid] = (resize[0], new_needs)

    def hosts(self) -> list[HostUsage]:
        return [HostUsage(self.specs[n], *self._used[n]) for n in sorted(self.specs)]

    def power_state(self, uuid: str) -> int:
        return self._power.get(uuid, NOSTATE)
