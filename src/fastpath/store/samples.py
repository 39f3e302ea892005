"""Realistic sample server records (tests, seeding, measurements).

The shape follows Nova's ``servers/v2.100/server-get-resp.json`` sample: one network with a
fixed address and MAC, metadata, a flavor snapshot with extra specs, image properties,
attached volumes, scheduler hints.  With the defaults a packed record is about 1.5 KB.
"""

from __future__ import annotations

import random
import uuid as uuidlib
from typing import Any

from fastpath.store.record import make_record

EPOCH_2024 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds


def _mac(n: int, rnd: random.Random) -> str:
    return f"fa:16:3e:{n:02x}:{rnd.randrange(256):02x}:{rnd.randrange(256):02x}"


def sample_record(
    server_uuid: str | None = None,
    version: int = 1,
    *,
    project_id: str = "6f70656e737461636b20342065766572",
    user_id: str = "fake",
    created_at: int = EPOCH_2024,
    updated_at: int | None = None,
    cell: str = "cell1",
    seed: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A complete record; ``seed`` makes the varying parts (name, addresses) deterministic."""
    rnd = random.Random(seed if seed is not None else version)
    u = server_uuid or str(uuidlib.UUID(int=rnd.getrandbits(128), version=4))
    n = rnd.randrange(1, 250)
    values: dict[str, Any] = {
        "uuid": u,
        "version": version,
        "cell": cell,
        "project_id": project_id,
        "user_id": user_id,
        "name": f"server-{u[:8]}",
        "hostname": f"server-{u[:8]}",
        "description": None,
        "vm_state": "active",
        "task_state": None,
        "power_state": 1,
        "progress": 0,
        "created_at": created_at,
        "updated_at": updated_at if updated_at is not None else created_at + version,
        "launched_at": created_at + 5_000_000,
        "host": f"compute-{n % 16:02d}",
        "node": f"compute-{n % 16:02d}.example.com",
        "host_status": "UP",
        "instance_name": f"instance-{n:08x}",
        "availability_zone": "nova",
        "pinned_availability_zone": None,
        "flavor": {
            "id": "1",
            "name": "m1.small",
            "vcpus": 1,
            "ram": 2048,
            "disk": 20,
            "ephemeral": 0,
            "swap": 0,
            "extra_specs": {"hw:cpu_policy": "shared", "hw_rng:allowed": "True"},
        },
        "image": {
            "id": "70a599e0-31e7-49b7-b260-868f441e862b",
            "properties": {"architecture": "x86_64", "auto_disk_config": "True"},
        },
        "key_name": "default-key",
        "config_drive": "",
        "disk_config": "AUTO",
        "addresses": {
            "private": [
                {
                    "addr": f"192.168.{n // 250}.{n % 250 + 2}",
                    "version": 4,
                    "mac": _mac(n, rnd),
                    "type": "fixed",
                },
                {
                    "addr": f"fd00::{n:x}",
                    "version": 6,
                    "mac": _mac(n, rnd),
                    "type": "fixed",
                },
            ]
        },
        "access_ip_v4": None,
        "access_ip_v6": None,
        "security_groups": ["default"],
        "metadata": {"My Server Name": "Apache1", "role": "web", "owner": "team-a"},
        "tags": ["web", "prod"],
        "volumes_attached": [
            {"id": str(uuidlib.UUID(int=rnd.getrandbits(128), version=4)), "delete_on_termination": False}
        ],
        "server_groups": [],
        "scheduler_hints": {"same_host": ["48e6a9f6-30af-47e0-bc04-acaed113bb4e"]},
        "reservation_id": f"r-{u[:8]}",
        "launch_index": 0,
        "kernel_id": None,
        "ramdisk_id": None,
        "root_device_name": "/dev/vda",
        "user_data": "IyEvYmluL2Jhc2gKL2Jpbi9zdQplY2hvICJJIGFtIGluIHlvdSEiCg==",
        "trusted_image_certificates": None,
        "fault": None,
    }
    values.update(overrides)
    return make_record(values)
