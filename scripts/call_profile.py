"""Where one small call's time goes, on each side of a real two-process round trip.

A server process (what `tsqp serve` runs, under cProfile once it serves) and this client (under cProfile) exchange many
decode-shaped calls (a q_proj `Linear` on [1, 1, hidden]) over tcp, or over the fast link with
--shm. Each side's profile is grouped by what the code does: framing, the request checks, the
finiteness check, staging, shared memory, the serving loop and the client's call loop, the model's
own compute, the sockets, and the wait for the other side. cProfile slows Python down, so every
share is scaled to the same call timed without the profiler (printed first).

    python scripts/call_profile.py [--shm] [--calls 3000] [--model DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tsqp import api  # noqa: E402
from tsqp.models import make_model  # noqa: E402
from tsqp.transport import Client  # noqa: E402

# (category, test on "file:function"), first match wins; the waits are not work of that side
CATEGORIES = [
    ("wait for the other side", ("poll.py:poll", "'poll' of 'select.poll'", "method 'poll'")),
    ("socket send/receive", ("socket.py:send", "socket.py:recv", "'send' of '_socket", "'recv' of '_socket",
                             "recvmsg", "send_multipart", "recv_multipart", "zmq/sugar/frame")),
    ("framing (msgpack, frames to tensors)", ("protocol.py", "msgpack", "from_numpy", "frombuffer", "reshape",
                                             "'numpy' of", "detach")),
    ("request checks", ("server/checks.py", "server/registry.py")),
    ("finiteness check", ("'sum' of", "isfinite", "check_finite", "'item' of")),
    ("staging to/from the device", ("staging.py", "method 'to' of")),
    ("shared memory", ("shm.py", "'clone' of")),
    ("model compute", ("torch._C._nn", "nn/modules", "server/stateless.py", "server/lean.py", "server/model.py")),
    ("serving loop / call loop", ("router.py", "fastlink.py", "liveness.py", "transport.py", "server/core.py",
                                  "threading.py", "contextvars")),
    ("logging", ("logging", "logs.py")),
]


# the server as `tsqp serve --shm` runs it, profiled from its first request (not its start-up)
SERVER = """
import cProfile, signal, sys, threading
sys.path.insert(0, {root!r})
from tsqp.router import serve_forever
from tsqp.server import GpuServer
server = GpuServer({model!r}, "cpu", shm={shm})
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
profile = cProfile.Profile()
profile.enable()
serve_forever({endpoint!r}, server.handle, stop, fast={shm})
profile.disable()
profile.dump_stats({out!r})
"""


def categorize(stats: pstats.Stats, skip: set[str]) -> dict[str, float]:
    """tottime per category, over functions whose file is not in `skip` (start-up, imports)."""
    totals: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{file}:{name}"
        if any(s in label for s in skip):
            continue
        category = next((c for c, keys in CATEGORIES if any(k in label for k in keys)), "other Python")
        totals[category] = totals.get(category, 0.0) + tottime
    return totals


def table(title: str, totals: dict[str, float], per_call_us: float) -> str:
    whole = sum(totals.values())
    lines = [f"\n{title} (scaled to {per_call_us:.0f} µs per call)", "| | share | µs per call |", "|---|---:|---:|"]
    for category, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {category} | {seconds / whole:.0%} | {seconds / whole * per_call_us:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shm", action="store_true", help="ipc + shared memory + the fast link (default: tcp)")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--model", help="model directory (default: a tiny random one, made here)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tsqp-profile-"))
    model = Path(args.model) if args.model else make_model("tiny", work / "tiny")
    endpoint = f"ipc://{work}/server.sock" if args.shm else api.free_endpoint()
    out = work / "server.prof"
    code = SERVER.format(root=str(Path(__file__).resolve().parent.parent), model=str(model), endpoint=endpoint,
                         shm=args.shm, out=str(out))
    cmd = [sys.executable, "-c", code]
    server = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # as `tsqp serve` sets it
    try:
        client = Client(endpoint, shm=args.shm)
        deadline = time.monotonic() + 120
        while True:
            try:
                hidden = client.ping(timeout_s=1)["hidden_size"]
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("error: the server did not start")
        x = torch.randn(1, 1, hidden)

        def call() -> None:
            client.call("Linear", [x], layer_idx=0, module_name="q_proj")

        for _ in range(300):
            call()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        plain_us = sorted(times)[len(times) // 2] * 1e6
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        profile.disable()
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    print(f"{'fast link (ipc + shm)' if args.shm else 'tcp'}: one q_proj Linear on [1, 1, {hidden}], "
          f"median round trip {plain_us:.0f} µs without the profiler, {args.calls} calls profiled on each side")
    client_totals = categorize(pstats.Stats(profile), {"scripts/call_profile.py"})
    print(table("client (TEE) side", client_totals, plain_us))
    print(table("server side", categorize(pstats.Stats(str(out)), set()), plain_us))


if __name__ == "__main__":
    main()
