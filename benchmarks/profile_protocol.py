#!/usr/bin/env python3
"""A tight loop of one request through the protocol, to run under a profiler.

    python benchmarks/profile_protocol.py [--request v21|v21-mv|sdk|healthz|404] [-n 3000000]
    perf record -F 1999 --call-graph dwarf,8192 -o perf.data \\
        python benchmarks/profile_protocol.py -n 3000000
    perf report -i perf.data --children --sort sym

Same Worker and fake transport as the micro-benchmarks (benchmarks/_harness.py); prints
nanoseconds per request so a profiled run can be checked against an unprofiled one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Harness, request, status_of  # noqa: E402

REQUESTS = {
    "v21": request(b"/v2.1/"),
    "v21-mv": request(b"/v2.1/", b"OpenStack-API-Version: compute 2.79"),
    "sdk": request(
        b"/v2.1/",
        b"User-Agent: openstacksdk/4.1.0 keystoneauth1/5.8.0 python-requests/2.32.3 CPython/3.11.7",
        b"Accept-Encoding: gzip, deflate",
        b"Accept: application/json",
        b"Connection: keep-alive",
        b"X-Auth-Token: notused",
        b"OpenStack-API-Version: compute 2.95",
        b"X-OpenStack-Nova-API-Version: 2.95",
    ),
    "healthz": request(b"/healthz"),
    "404": request(b"/nope"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--request", choices=sorted(REQUESTS), default="v21")
    p.add_argument("-n", type=int, default=3_000_000, help="requests (default 3,000,000)")
    args = p.parse_args()
    h = Harness()
    proto, transport = h.connect()
    data = REQUESTS[args.request]
    feed = proto.data_received
    feed(data)
    print(
        f"{args.request}: status {status_of(transport.out[-1])}, "
        f"{len(data)} B in, {len(transport.out[-1])} B out"
    )
    t0 = time.perf_counter()
    for _ in range(args.n):
        feed(data)
    dt = time.perf_counter() - t0
    print(f"{args.n} requests in {dt:.2f}s: {dt / args.n * 1e9:.0f} ns/request")
    h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
