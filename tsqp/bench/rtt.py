"""`tsqp bench --rtt`: the transport alone. A server process echoes a tensor back (`Echo`: the
request checks, the device staging and the reply, no model work), over tcp loopback, ipc and
ipc with shared memory (headers on ZeroMQ) and the fast link (shared memory, headers on a Unix
socket: tsqp.fastlink), for an empty call and payloads of 8 KiB, 1 MiB and 16 MiB each way."""

from __future__ import annotations

import statistics
import tempfile
import time

PAYLOADS = (("empty", 0, 3000), ("8 KiB", 8 << 10, 2000), ("1 MiB", 1 << 20, 300), ("16 MiB", 16 << 20, 30))
TRANSPORTS = ("tcp", "ipc", "ipc+shm", "fastlink")
WARMUP = 200  # a fresh server process: its first calls still warm up (allocator, lazy paths)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_rtt(model_dir: str, device: str | None, scale: float = 1.0) -> list[dict]:
    """One row per (transport, payload): calls made, median and p99 round trip, and throughput
    (both directions' bytes over the median)."""
    import torch

    from .. import api
    from ..transport import Client

    rows = []
    for transport in TRANSPORTS:
        endpoint = api.free_endpoint() if transport == "tcp" else \
            f"ipc://{tempfile.mkdtemp(prefix='tsqp-rtt-')}/server.sock"
        shm = transport in ("ipc+shm", "fastlink")
        with api.spawn_server(model_dir, device=device, endpoint=endpoint, shm=shm,
                              extra_args=("--max-reply-mb", "64")) as server:
            with Client(server.endpoint, shm=shm, fastlink=transport == "fastlink") as client:
                for label, nbytes, calls in PAYLOADS:
                    payload = torch.randn(nbytes // 4)
                    calls = max(5, int(calls * scale))
                    times, warmup = [], min(WARMUP, calls)
                    for i in range(warmup + calls):
                        start = time.perf_counter()
                        client.call("Echo", [payload])
                        if i >= warmup:
                            times.append(time.perf_counter() - start)
                    median = statistics.median(times)
                    rows.append({"transport": transport, "payload": label, "bytes": nbytes, "calls": calls,
                                 "median_s": median, "p99_s": percentile(times, 0.99),
                                 "mb_per_s": 2 * nbytes / median / 1e6 if nbytes else None})
    return rows


def rtt_table(rows: list[dict]) -> str:
    lines = ["| transport | payload each way | calls | median µs | p99 µs | MB/s (both ways) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        rate = f"{r['mb_per_s']:.0f}" if r["mb_per_s"] else "–"
        lines.append(f"| {r['transport']} | {r['payload']} | {r['calls']} | {r['median_s'] * 1e6:.0f} "
                     f"| {r['p99_s'] * 1e6:.0f} | {rate} |")
    return "\n".join(lines)
