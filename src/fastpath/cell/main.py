"""``fastpath cell --name NAME``: one compute cell as a process.

Opens (creating) the cell database ``DATA_DIR/cells/NAME.sqlite``, builds the simulated
driver from the ``cell.*`` settings, and runs the cell service: inbox commands in, state
changes and their change-feed entries out.  SIGTERM and SIGINT stop it after the step in
progress (every step is its own SQL transaction, so a kill -9 loses nothing committed).
The same loop (:func:`run_cell`) runs under the master of ``fastpath serve`` for each
name of ``standalone.cells``.

Each cell gets its own fixed-IP pool, 10.X.0.0/16 with X derived from the cell's name, so
the addresses of two local cells do not collide.
"""

from __future__ import annotations

import hashlib
import logging
import time

from fastpath.cell.db import Retention
from fastpath.cell.driver import HostSpec, SimulatedDriver
from fastpath.cell.registry import cell_path, open_cell
from fastpath.cell.service import CellService
from fastpath.settings import Settings
from fastpath.sidecar import Control, standalone_control
from fastpath.wake import Doorbell, bell_path, ring

log = logging.getLogger("fastpath.cell")


def ip_pool_for(name: str) -> str:
    octet = 1 + hashlib.sha256(name.encode()).digest()[0] % 250
    return f"10.{octet}.0.0/16"


def build_service(settings: Settings, name: str) -> CellService:
    db = open_cell(settings["data_dir"], name, create=True)
    hosts = [
        HostSpec(f"{name}-compute-{i:02d}", settings["cell.host_vcpus"],
                 settings["cell.host_ram_mb"], settings["cell.host_disk_gb"])
        for i in range(settings["cell.hosts"])
    ]
    driver = SimulatedDriver(
        hosts, ip_pool_for(name), build_delay=settings["cell.build_delay"],
        action_delay=settings["cell.action_delay"], failure_rate=settings["cell.failure_rate"],
    )
    return CellService(db, driver, name)


def run_cell(settings: Settings, name: str, ctl: Control) -> int:
    """The cell's loop, under the master or alone (see :mod:`fastpath.sidecar`).

    Waits on its bell ``cell-NAME`` (rung by the forwarder after it delivered inbox rows)
    or until the next simulated phase falls due, with ``cell.poll_interval`` as the
    fallback; rings cellsync's bell after every step that committed, so the change
    reaches the store without anyone polling.
    """
    data_dir = settings["data_dir"]
    bell = Doorbell(bell_path(data_dir, f"cell-{name}"))
    try:
        service = build_service(settings, name)
    except BaseException:
        bell.close()
        raise
    cellsync_bell = bell_path(data_dir, "cellsync")
    ring(cellsync_bell)  # the host rows written at start
    idle = settings["cell.poll_interval"]
    retention = Retention.from_settings(settings)
    log.info("cell %s serving (%s)", name, service.db.path)
    ctl.ready()
    try:
        while not ctl.should_stop():
            ctl.beat()
            now = time.time()
            service.db.maintenance(now, retention)  # feed pruning; runs at its own interval
            if service.step(now):
                ring(cellsync_bell)
                continue
            due = service.next_due()
            ctl.sleep(idle if due is None else max(0.0, min(idle, due - now)), bell)
    finally:
        service.db.close()
        bell.close()
    log.info("cell %s stopped", name)
    return 0


def cell_main(settings: Settings, name: str) -> int:
    """``fastpath cell --name NAME``: the cell alone, stopped by SIGTERM or SIGINT."""
    logging.basicConfig(
        level=settings["log.level"].upper(),
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    ctl = standalone_control()
    print(f"fastpath cell {name}: database {cell_path(settings['data_dir'], name)}", flush=True)
    try:
        return run_cell(settings, name, ctl)
    finally:
        ctl.close()
