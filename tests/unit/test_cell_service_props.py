"""A Hypothesis state machine over the cell service: random commands (valid or not for the
server's state) for a few servers on two small hosts, time jumps, and restarts of the service
(a new driver taking its claims back from the database).

Invariants at every step: the hosts' usage rows equal what the live servers hold according to
the database (one claim each, two during an unconfirmed resize), and equal the driver's own
figures; no fixed IP is held twice; a finished command stays finished.  At the end every
command is finished exactly once and every recorded command has exactly one instance action.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastpath.cell import SqliteCellDB
from fastpath.cell.driver import HostSpec, SimulatedDriver, flavor_needs
from fastpath.cell.service import ACTIONS, CellService

SMALL: dict[str, Any] = {"id": "1", "name": "small", "vcpus": 2, "ram": 2048, "disk": 20,
                         "ephemeral": 0, "swap": 0, "extra_specs": {}}
BIG: dict[str, Any] = {"id": "2", "name": "big", "vcpus": 4, "ram": 4096, "disk": 40,
                       "ephemeral": 0, "swap": 512, "extra_specs": {}}
HOSTS = [HostSpec("h1", 6, 8192, 100), HostSpec("h2", 6, 8192, 100)]
SERVERS = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(1, 4)]
ACTIONS_ST = st.sampled_from([
    ("reboot", {"type": "SOFT"}), ("reboot", {"type": "HARD"}), ("stop", {}), ("start", {}),
    ("pause", {}), ("unpause", {}), ("suspend", {}), ("resume", {}),
    ("lock", {"reason": "r", "locked_by": "owner"}), ("unlock", {}),
    ("update", {"name": "renamed"}), ("metadata", {"op": "set", "key": "k", "value": "v"}),
    ("tags", {"op": "add", "tag": "t"}), ("resize", {"flavor": BIG}),
    ("resize", {"flavor": SMALL}), ("confirmResize", {}), ("revertResize", {}),
    ("rebuild", {"image_ref": "img-2"}), ("createImage", {"image_id": "i", "name": "n"}),
    ("delete", {}),
])


class CellMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        self.db = SqliteCellDB(str(self.tmp / "cell.sqlite"))
        self.now = 1_700_000_000.0
        self.delays = (0.0, 0.0)
        self.svc = self._service()
        self.sent: list[tuple[str, str, str]] = []  # (command id, server, action)
        self.finished: set[str] = set()
        self.created: set[str] = set()

    def _service(self) -> CellService:
        driver = SimulatedDriver(HOSTS, ip_pool="10.9.0.0/28", build_delay=self.delays[0],
                                 action_delay=self.delays[1], seed=5)
        return CellService(self.db, driver, "cell")

    @initialize(delays=st.sampled_from([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]))
    def set_delays(self, delays: tuple[float, float]) -> None:
        """Zero delays finish a command within a step; others leave phases in flight."""
        self.delays = delays
        self.svc = self._service()

    def _send(self, uuid: str, action: str, **extra: Any) -> None:
        cid = f"req-{len(self.sent):04d}"
        payload = {"action": action, "project_id": "p", "user_id": "u", "request_id": cid,
                   **extra}
        assert self.db.accept_command(cid, payload, uuid)
        self.sent.append((cid, uuid, action))

    @rule(server=st.sampled_from(SERVERS), big=st.booleans(),
          host=st.sampled_from([None, "h1", "h2", "gone"]))
    def create(self, server: str, big: bool, host: str | None) -> None:
        if server in self.created:
            return
        self.created.add(server)
        self._send(server, "create", host=host, server={
            "uuid": server, "project_id": "p", "user_id": "u", "name": "vm",
            "flavor": BIG if big else SMALL, "image_ref": "img-1"})

    @rule(server=st.sampled_from(SERVERS), action=ACTIONS_ST)
    def command(self, server: str, action: tuple[str, dict[str, Any]]) -> None:
        if server in self.created:
            self._send(server, action[0], **action[1])

    # Resizes get rules of their own: they need several commands in a row to matter.
    @rule(server=st.sampled_from(SERVERS), big=st.booleans())
    def resize(self, server: str, big: bool) -> None:
        if server in self.created:
            self._send(server, "resize", flavor=BIG if big else SMALL)

    @rule(server=st.sampled_from(SERVERS), confirm=st.booleans())
    def end_resize(self, server: str, confirm: bool) -> None:
        if server in self.created:
            self._send(server, "confirmResize" if confirm else "revertResize")

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    def step(self, dt: float) -> None:
        self.now += dt
        self.svc.step(self.now)

    @rule()
    def restart(self) -> None:
        """The process dies (phases in memory lost) and starts again on the same file."""
        self.svc = self._service()

    # -- invariants ------------------------------------------------------------------------
    def expected_usage(self) -> dict[str, list[int]]:
        use = {h.name: [0, 0, 0] for h in HOSTS}
        for c in self.db.live_claims():
            m = c["migration"]
            claims = [(c["host"], c["flavor"])] if m is None else [
                (m["source_host"], m["old_flavor"]), (m["dest_host"], m["new_flavor"])]
            for host, flavor in claims:
                for i, n in enumerate(flavor_needs(flavor)):
                    use[host][i] += n
        return use

    @invariant()
    def host_usage_matches_the_servers(self) -> None:
        expected = self.expected_usage()
        for h in HOSTS:
            row = self.db.host(h.name)
            assert row is not None
            assert [row["vcpus_used"], row["ram_mb_used"], row["disk_gb_used"]] == \
                expected[h.name], (h.name, row, expected)
        driver = {u.spec.name: [u.vcpus_used, u.ram_mb_used, u.disk_gb_used]
                  for u in self.svc.driver.hosts()}
        assert driver == expected

    @invariant()
    def no_address_twice(self) -> None:
        ips = [ip["addr"] for u in SERVERS if (rows := self.db.load_instance(u)) is not None
               and rows["instance"]["deleted_at"] is None for ip in rows["ips"]]
        assert len(ips) == len(set(ips)), ips

    @invariant()
    def finished_stays_finished(self) -> None:
        pending = {cid for cid, _, _ in self.db.pending_commands(limit=10_000)}
        now_finished = {cid for cid, _, _ in self.sent} - pending
        assert self.finished <= now_finished
        self.finished = now_finished

    def teardown(self) -> None:
        try:
            for _ in range(200):
                if not self.db.pending_commands(limit=1) and self.svc.next_due() is None:
                    break
                self.now += 1.0
                self.svc.step(self.now)
            assert self.db.pending_commands(limit=1) == []
            self.host_usage_matches_the_servers()
            self.no_address_twice()
            conn = self.db._conn
            for cid, _uuid, action in self.sent:
                state = conn.execute("SELECT state FROM inbox WHERE command_id = ?",
                                     (cid,)).fetchone()[0]
                assert state in ("done", "failed")
                n = conn.execute("SELECT COUNT(*) FROM instance_actions WHERE request_id = ?",
                                 (cid,)).fetchone()[0]
                recorded = action == "create" or ACTIONS[action].record
                assert n == (1 if recorded else 0) or (not recorded and state == "failed"), \
                    (cid, action, state, n)
        finally:
            self.db.close()
            shutil.rmtree(self.tmp)


TestCellMachine = CellMachine.TestCase
TestCellMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                    database=None)
