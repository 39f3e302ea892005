"""``fastpath cell --name NAME``: one compute cell as a process.

Opens (creating) the cell database ``DATA_DIR/cells/NAME.sqlite``, builds the simulated
driver from the ``cell.*`` settings, and runs the cell service: inbox commands in, state
changes and their change-feed entries out.  SIGTERM and SIGINT stop it after the step in
progress (every step is its own SQL transaction, so a kill -9 loses nothing committed).

Each cell gets its own fixed-IP pool, 10.X.0.0/16 with X derived from the cell's name, so
the addresses of two local cells do not collide.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import time
from typing import Any

from fastpath.cell.driver import HostSpec, SimulatedDriver
from fastpath.cell.registry import open_cell
from fastpath.cell.service import CellService

log = logging.getLogger("fastpath.cell")


def ip_pool_for(name: str) -> str:
    octet = 1 + hashlib.sha256(name.encode()).digest()[0] % 250
    return f"10.{octet}.0.0/16"


def build_service(settings: Any, name: str) -> CellService:
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


def cell_main(settings: Any, name: str) -> int:
    logging.basicConfig(
        level=settings["log.level"].upper(),
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    service = build_service(settings, name)
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    idle = settings["cell.poll_interval"]
    log.info("cell %s serving (%s)", name, service.db.path)
    print(f"fastpath cell {name}: database {service.db.path}", flush=True)
    try:
        while not stop["now"]:
            now = time.time()
            if service.step(now):
                continue
            due = service.next_due()
            time.sleep(idle if due is None else max(0.0, min(idle, due - now)))
    finally:
        service.db.close()
    log.info("cell %s stopped", name)
    return 0
