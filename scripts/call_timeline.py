"""Where a served decode call's time goes, as a timeline with timestamps on both sides.

A `tsqp serve --shm` process and a lean runner in this process generate over the fast link. Both
sides stamp each call at the same points with time.perf_counter(), which on Linux reads
CLOCK_MONOTONIC, one clock for every process of the host; the two lists are paired call by call.
The stamps come from wrappers put around a few functions (the client's call, the fast link's send
and receive on each side, the server's `handle`), so each segment also carries one wrapper's cost,
~1 µs. Medians per decode method, µs, after the first decode step (the prefill and one step are
warm-up):

    python scripts/call_timeline.py [--model DIR] [--tokens 32] [--new-tokens 64] [--repeat 3]
                                    [--device D] [--server-threads N] [--client-threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `tsqp` command sets it, before torch loads OpenMP

import torch  # noqa: E402

from tsqp import api, fastlink  # noqa: E402
from tsqp.models import make_model  # noqa: E402
from tsqp.transport import Client  # noqa: E402

clock = time.perf_counter


def stamp(cls: type, name: str, at_entry: Callable[..., None] | None = None,
          at_exit: Callable[..., None] | None = None) -> None:
    """Wrap cls.name so that at_entry(t, *args) runs before it and at_exit(t, result, *args) after."""
    inner = getattr(cls, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if at_entry is not None:
            at_entry(clock(), *args, **kwargs)
        result = inner(*args, **kwargs)
        if at_exit is not None:
            at_exit(clock(), result, *args, **kwargs)
        return result

    setattr(cls, name, wrapper)


# The server: `tsqp serve` with stamps on the fast link's receive and send and on `handle`.
# A call is recorded from a receive that brought datagrams to the send of its reply.
SERVER = """
import atexit, json, sys
import msgpack
sys.path.insert(0, {root!r})
sys.path.insert(0, {scripts!r})
from call_timeline import clock, stamp
from tsqp import cli, fastlink
from tsqp.server.core import GpuServer

calls, open_call = [], {{}}

def received_in(t, *_):
    open_call["pending_in"] = t

def received(t, result, *_):
    if result[1]:
        started = open_call.pop("pending_in", t)
        open_call.clear()
        open_call["received_in"], open_call["received"] = started, t

def handle_in(t, server, frames):
    if "received" in open_call:
        open_call["handle_in"], open_call["frames"] = t, frames

def handle_out(t, *_):
    if "handle_in" in open_call:
        open_call["handle_out"] = t

def sent(t, *_):
    if "handle_out" in open_call:
        frames = open_call.pop("frames")  # read after the stamp, in the server's idle time
        calls.append({{**open_call, "sent": t, "method": msgpack.unpackb(bytes(frames[0]))["method"]}})
        open_call.clear()

stamp(fastlink.Listener, "receive", received_in, received)
stamp(GpuServer, "handle", handle_in, handle_out)
stamp(fastlink.Peer, "send", None, sent)
atexit.register(lambda: open({out!r}, "w").write(json.dumps(calls)))
sys.exit(cli.main({argv!r}))
"""

# (label, from, to): consecutive stamps, the client's and the server's interleaved in time
SEGMENTS = [
    ("client: encode, copy into shared memory, send", "call_in", "client_sent"),
    ("until the server's receive begins", "client_sent", "received_in"),
    ("server: receive the datagram", "received_in", "received"),
    ("server: serving loop until `handle`", "received", "handle_in"),
    ("server: `handle` (checks, work, reply framing)", "handle_in", "handle_out"),
    ("server: serving loop until the reply is sent", "handle_out", "sent"),
    ("until the client has the reply", "sent", "client_received"),
    ("client: decode, copy out, checks", "client_received", "call_out"),
]


class ClientStamps:
    """The client's stamps per call over the fast link, with the method, in order."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._open: dict[str, Any] = {}
        self.recording, self.generation = False, 0
        stamp(Client, "call", self._call_in, self._call_out)
        stamp(fastlink.FastLink, "send", None, lambda t, *_: self._open.__setitem__("client_sent", t))
        stamp(fastlink.FastLink, "receive", None, lambda t, *_: self._open.__setitem__("client_received", t))

    def _call_in(self, t: float, client: Client, method: str, *_: Any, **__: Any) -> None:
        self._open = {"method": method, "call_in": t, "generation": self.generation}

    def _call_out(self, t: float, *_: Any, **__: Any) -> None:
        if self.recording and "client_sent" in self._open and "client_received" in self._open:
            self.calls.append({**self._open, "call_out": t})


def server_process(model: Path, endpoint: str, out: Path, threads: int | None, device: str | None) -> subprocess.Popen:
    argv = ["serve", "--model", str(model), "--endpoint", endpoint, "--shm", "--parent-pid", str(os.getpid()),
            "--log-level", "WARNING", *(["--device", device] if device else [])]
    code = SERVER.format(root=str(ROOT), scripts=str(ROOT / "scripts"), out=str(out), argv=argv)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def wait_ready(endpoint: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint) as client:
        while True:
            try:
                client.ping(timeout_s=1)
                return
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("error: the server did not start") from None


def pair(client: list[dict[str, Any]], server: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each client call with the server's record of the same method that began receiving
    within the call (the server's list also holds the warm-up's calls)."""
    paired, i = [], 0
    for call in client:
        while i < len(server) and server[i]["received_in"] < call["call_in"]:
            i += 1
        if i == len(server) or server[i]["received_in"] > call["call_out"] or server[i]["method"] != call["method"]:
            raise SystemExit(f"error: no server record of a {call['method']} call")
        paired.append({**call, **server[i]})
    return paired


def decode_calls(stamps: list[dict[str, Any]], steps_skipped: int) -> list[dict[str, Any]]:
    """The calls of decode steps after the first `steps_skipped` (a step ends with DownHead; the
    first is the prefill)."""
    kept, step = [], 0
    for call in stamps:
        if step > steps_skipped and call["method"] != "Release":
            kept.append(call)
        step += call["method"] == "DownHead"
    return kept


def table(calls: list[dict[str, Any]]) -> str:
    methods = sorted({c["method"] for c in calls})
    lines = ["| µs, median | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    rows = [*SEGMENTS, ("the call, in all", "call_in", "call_out")]
    for label, start, end in rows:
        cells = []
        for method in methods:
            spans = [(c[end] - c[start]) * 1e6 for c in calls if c["method"] == method]
            cells.append(f"{statistics.median(spans):.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = " | ".join(str(sum(c["method"] == m for c in calls)) for m in methods)
    lines.append(f"| calls timed | {counts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the tiny preset, made here)")
    parser.add_argument("--tokens", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="generations, all timed")
    parser.add_argument("--device", help="the server's device (default: `tsqp serve`'s, CUDA when there is one)")
    parser.add_argument("--server-threads", type=int, help="the server's OpenMP threads (default: torch's)")
    parser.add_argument("--client-threads", type=int, help="this side's torch threads (default: torch's)")
    args = parser.parse_args()
    # the first decode step is warm-up: 3 new tokens give one timed step
    for name, least in (("tokens", 1), ("new_tokens", 3), ("repeat", 1), ("server_threads", 1), ("client_threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.client_threads:
        torch.set_num_threads(args.client_threads)
    work = Path(tempfile.mkdtemp(prefix="tsqp-timeline-"))
    model = Path(args.model) if args.model else make_model("tiny", work / "tiny")
    endpoint, out = f"ipc://{work}/server.sock", work / "server-stamps.json"
    client_stamps = ClientStamps()
    server = server_process(model, endpoint, out, args.server_threads, args.device)
    try:
        wait_ready(endpoint, server)
        runner = api.connect(endpoint, model_dir=model, shm=True)
        vocab = runner.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        for run in range(args.repeat + 1):  # the first generation warms both sides up
            ids = torch.randint(0, vocab, (1, args.tokens), generator=generator)
            client_stamps.recording, client_stamps.generation = run > 0, run
            list(runner.generate(ids, args.new_tokens, ignore_eos=True))
        runner.client.close()
        server.terminate()
        server.wait(30)
        server_stamps = json.loads(out.read_text())
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    paired = pair(client_stamps.calls, server_stamps)
    timed: list[dict[str, Any]] = []
    for run in range(1, args.repeat + 1):  # each generation's own prefill and first step are skipped
        timed += decode_calls([call for call in paired if call["generation"] == run], 1)
    print(f"fast link, {model.name}: {args.repeat} generations of {args.new_tokens} tokens after a "
          f"{args.tokens}-token prompt, decode calls after each one's first step; threads: server "
          f"{args.server_threads or os.environ.get('OMP_NUM_THREADS', 'default')}, client {torch.get_num_threads()}")
    print(table(timed))


if __name__ == "__main__":
    main()
