"""The floor under a same-host request/reply: bare mechanisms two processes can use, no TSQP.

Each runs as ping-pong between this process (the client, which keeps the clock) and a forked echo
server: 200 bytes each way, and 64 KiB through shared memory (copied in by the client, from
request to reply by the server, out by the client, as TSQP's `--shm` path does). Every reply is
checked against its request outside the timed span. Mechanisms: pyzmq DEALER->ROUTER (tcp, ipc),
a Unix SOCK_SEQPACKET pair, pipes, a shared-memory flag polled by spinning (the floor), spin up to
N µs then block on an eventfd or a Unix socket, a Unix socket header with the payload in shared
memory, and iceoryx2 request-response (polled, or with its events) when `iceoryx2` is installed
(not a TSQP dependency). Spinning needs a core per side: on a loaded 2-core host it swings most.

    .venv/bin/python scripts/transport_floor.py [--rounds 3000] [--repeat 1] [--pin] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import math
import mmap
import multiprocessing as mp
import os
import platform
import select
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import zmq

try:
    import iceoryx2 as iox2
except ImportError:
    iox2 = None

SMALL, LARGE = 200, 64 * 1024
STOP = b"!"  # one byte: shorter than any request, so the server knows to echo it and quit
LINE = 64  # a cache line: each direction's flags and data start on their own
SEQ, LEN, SLEEP = 0, 1, 2  # the int64 flags at the head of each direction's box
BACKSTOP_MS = 2  # a blocked waiter rechecks its flag this often: Python has no store-load fence,
# so a waker can miss the waiter's "sleeping" flag; a lost wake-up then costs this, never a hang
MAX_SECONDS = 4.0  # per mechanism and run: a spinner starved of a core must not stall the script


@dataclass
class Mechanism:
    """One way to carry a request and its reply; made in the parent, opened on each side after fork."""

    name: str
    payload: int

    def open(self, side: str) -> Any:
        """This side's endpoint: send(bytes-like), recv() -> a bytes-like valid until the next
        call, close()."""
        raise NotImplementedError

    def close(self) -> None:  # removes what was made for it: files, sockets
        pass


class ZmqEnd:
    def __init__(self, endpoint: str, server: bool):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER if server else zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        (self.sock.bind if server else self.sock.connect)(endpoint)
        self.route: list[bytes] = []  # the ROUTER's identity frame of the last request

    def send(self, data: Any) -> None:
        self.sock.send_multipart([*self.route, b"", data])

    def recv(self) -> Any:
        frames = self.sock.recv_multipart()
        self.route = frames[:-2]
        return frames[-1]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@dataclass
class Zmq(Mechanism):
    transport: str = "tcp"
    endpoint: str = ""

    def __post_init__(self) -> None:
        if self.transport == "tcp":
            with socket.socket() as probe:  # a free port; the server binds it just after
                probe.bind(("127.0.0.1", 0))
                self.endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        else:
            self.endpoint = f"ipc://{tempfile.gettempdir()}/tsqp-floor-{uuid.uuid4().hex}"

    def open(self, side: str) -> Any:
        return ZmqEnd(self.endpoint, side == "server")

    def close(self) -> None:
        if self.transport == "ipc":
            Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)


class FdEnd:
    """Messages through file descriptors: a socket end, or a pipe's write and read ends."""

    def __init__(self, write_fd: int, read_fd: int, room: int):
        self.write_fd, self.read_fd, self.room = write_fd, read_fd, room

    def send(self, data: Any) -> None:
        os.write(self.write_fd, data)

    def recv(self) -> Any:
        return os.read(self.read_fd, self.room)

    def close(self) -> None:  # the mechanism owns the descriptors
        pass


@dataclass
class Fds(Mechanism):
    """A Unix SOCK_SEQPACKET socket pair, or (`pipes`) a pipe each way."""

    pipes: bool = False
    socks: tuple = ()
    ends: tuple = ()  # (client's write, client's read, server's write, server's read)

    def __post_init__(self) -> None:
        if self.pipes:
            (up_r, up_w), (down_r, down_w) = os.pipe(), os.pipe()
            self.ends = (up_w, down_r, down_w, up_r)
        else:
            self.socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            a, b = (s.fileno() for s in self.socks)
            self.ends = (a, a, b, b)

    def open(self, side: str) -> Any:
        at = 2 if side == "server" else 0
        return FdEnd(self.ends[at], self.ends[at + 1], self.payload)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        if self.pipes:
            for fd in self.ends:
                os.close(fd)


class Spin:
    """Both sides poll the flag: no system call at all, a core burnt per side. Like every waiter:
    `wait` returns once a box's SEQ moved past `last`, `published` tells the receiver it did."""

    def published(self, box: int, flags: memoryview) -> None:
        pass

    def wait(self, box: int, flags: memoryview, last: int) -> None:
        while flags[SEQ] == last:
            continue


class SpinThenBlock:
    """Spin up to `spin_ns`, then raise SLEEP and block on the box's wake-up fd; a sender that
    sees SLEEP writes to that fd."""

    def __init__(self, spin_ns: int, fds: list[tuple[int, int]], kick: bytes):
        self.spin_ns, self.fds, self.kick = spin_ns, fds, kick  # fds: per box, (write, read)
        self.polls = []
        for _, read_fd in fds:
            os.set_blocking(read_fd, False)
            poll = select.poll()
            poll.register(read_fd, select.POLLIN)
            self.polls.append(poll)

    def published(self, box: int, flags: memoryview) -> None:
        if flags[SLEEP]:
            os.write(self.fds[box][0], self.kick)

    def wait(self, box: int, flags: memoryview, last: int) -> None:
        end = time.perf_counter_ns() + self.spin_ns
        while flags[SEQ] == last:
            if time.perf_counter_ns() >= end:
                break
        else:
            return
        flags[SLEEP] = 1
        while flags[SEQ] == last:
            if self.polls[box].poll(BACKSTOP_MS):
                try:
                    os.read(self.fds[box][1], 64)  # a kick, perhaps a stale one: the flag decides
                except BlockingIOError:
                    pass
        flags[SLEEP] = 0


class Header:
    """TSQP's `--shm` shape: the payload lies in shared memory, a small header goes over a socket."""

    def __init__(self, fds: list[tuple[int, int]]):
        self.fds = fds

    def published(self, box: int, flags: memoryview) -> None:
        os.write(self.fds[box][0], bytes(SMALL))

    def wait(self, box: int, flags: memoryview, last: int) -> None:
        os.read(self.fds[box][1], SMALL)
        if flags[SEQ] == last:
            raise RuntimeError("a header came before its payload")


class ShmEnd:
    """One side of two boxes in a shared segment (box 0: client -> server, box 1: back); each box
    is a line of flags, then the data. Ordering relies on x86's stores reaching others in order."""

    def __init__(self, path: str, room: int, out_box: int, waiter: Any):
        self.room, self.out, self.into, self.waiter = room, out_box, 1 - out_box, waiter
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 2 * (LINE + room))
        self.view = memoryview(self.map)
        self.flags = [self.view[b * (LINE + room): b * (LINE + room) + LINE].cast("q") for b in (0, 1)]
        self.seq = [0, 0]
        self.message: Optional[memoryview] = None

    def data(self, box: int, n: int) -> memoryview:
        start = box * (LINE + self.room) + LINE
        return self.view[start: start + n]

    def send(self, data: Any) -> None:
        self.message = None  # the reply area is about to be overwritten
        n = len(data)
        self.data(self.out, n)[:] = data
        flags = self.flags[self.out]
        flags[LEN] = n
        self.seq[self.out] += 1
        flags[SEQ] = self.seq[self.out]
        self.waiter.published(self.out, flags)

    def recv(self) -> Any:
        flags = self.flags[self.into]
        self.waiter.wait(self.into, flags, self.seq[self.into])
        self.seq[self.into] += 1
        self.message = self.data(self.into, flags[LEN])
        return self.message

    def close(self) -> None:
        self.message = None
        for v in (*self.flags, self.view):
            v.release()
        self.map.close()


@dataclass
class Shm(Mechanism):
    """`wake`: "spin", "eventfd" or "unix" (spin `spin_us`, then block on it), or "header"."""

    wake: str = "spin"
    spin_us: int = 0
    path: str = ""
    socks: list = field(default_factory=list)
    fds: list = field(default_factory=list)  # per box: (write fd, read fd)

    def __post_init__(self) -> None:
        self.room = (self.payload + LINE - 1) // LINE * LINE
        self.path = f"/dev/shm/tsqp-floor-{uuid.uuid4().hex}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, 2 * (LINE + self.room))
        os.close(fd)
        if self.wake == "eventfd":
            self.fds = [(e, e) for e in (os.eventfd(0), os.eventfd(0))]
        elif self.wake in ("unix", "header"):
            self.socks = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
            self.fds = [(a.fileno(), b.fileno()) for a, b in self.socks]

    def open(self, side: str) -> Any:
        if self.wake == "spin":
            waiter: Any = Spin()
        elif self.wake == "header":
            waiter = Header(self.fds)
        else:
            kick = (1).to_bytes(8, sys.byteorder) if self.wake == "eventfd" else b"w"
            waiter = SpinThenBlock(self.spin_us * 1000, self.fds, kick)
        return ShmEnd(self.path, self.room, int(side == "server"), waiter)

    def close(self) -> None:
        os.unlink(self.path)
        for end in (s for pair in self.socks for s in pair):
            end.close()
        if self.wake == "eventfd":
            for fd, _ in self.fds:
                os.close(fd)


class IceoryxEnd:
    """Request-response over iceoryx2's shared memory: poll for the next sample, or (`events`)
    notify and wait on an event service per direction between polls."""

    def __init__(self, service: str, payload: int, server: bool, events: bool):
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        rr = (self.node.service_builder(iox2.ServiceName.new(service))
              .request_response(iox2.Slice[ctypes.c_uint8], iox2.Slice[ctypes.c_uint8]).open_or_create())
        port = rr.server_builder() if server else rr.client_builder()
        self.port = port.initial_max_slice_len(payload).create()
        self.server, self.pending, self.held, self.notifier, self.listener = server, None, None, None, None
        if events:
            up, down = (self.node.service_builder(iox2.ServiceName.new(f"{service}/{d}")).event().open_or_create()
                        for d in ("up", "down"))
            self.notifier = (down if server else up).notifier_builder().create()
            self.listener = (up if server else down).listener_builder().create()

    def send(self, data: Any) -> None:
        n = len(data)
        out = (self.held if self.server else self.port).loan_slice_uninit(n)
        memoryview((ctypes.c_uint8 * n).from_address(out.payload_ptr)).cast("B")[:] = data
        sent = out.assume_init().send()
        self.held, self.pending = (None, None) if self.server else (self.held, sent)
        if self.notifier is not None:
            self.notifier.notify()

    def recv(self) -> Any:
        source = self.port if self.server else self.pending
        while (sample := source.receive()) is None:
            if self.listener is not None:
                self.listener.timed_wait(iox2.Duration.from_millis(BACKSTOP_MS))
        self.held = sample  # the view below lives as long as the sample does
        return sample.payload().as_memory_view().cast("B")

    def close(self) -> None:
        """Drop every port, then the node, here: a forked server leaves by os._exit, and
        iceoryx2 removes its files in /dev/shm only when they are dropped."""
        self.held = self.pending = self.notifier = self.listener = None
        self.port = self.node = None


@dataclass
class Iceoryx(Mechanism):
    events: bool = False
    service: str = field(default_factory=lambda: f"tsqp-floor/{uuid.uuid4().hex}")

    def open(self, side: str) -> Any:
        return IceoryxEnd(self.service, self.payload, side == "server", self.events)


def mechanisms(extra: bool) -> Iterator[Mechanism]:
    """Every mechanism measured, in table order, each made only when its turn comes;
    iceoryx2's only when `extra` and installed."""
    yield Zmq("zmq tcp", SMALL, "tcp")
    yield Zmq("zmq ipc", SMALL, "ipc")
    yield Fds("unix seqpacket", SMALL)
    yield Fds("pipes", SMALL, pipes=True)
    yield Shm("shm spin", SMALL, "spin")
    for wake in ("eventfd", "unix"):
        for spin_us in (0, 20, 100):
            yield Shm(f"shm spin {spin_us} µs, then {wake}", SMALL, wake, spin_us)
    yield Shm("shm spin", LARGE, "spin")
    yield Shm("unix header + shm", LARGE, "header")
    if extra and iox2 is not None:
        for size in (SMALL, LARGE):
            for how in ("spin", "events"):
                yield Iceoryx(f"iceoryx2 {how}", size, how == "events")


def serve(mechanism: Mechanism, ready: Any, cpu: Optional[int]) -> None:
    """The echo server: every message goes back as it came, the stop byte last."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    end = mechanism.open("server")
    ready.set()
    while True:
        message = end.recv()
        last = len(message) == len(STOP)
        end.send(message)
        message = None  # a view into the endpoint's memory must go before the endpoint closes
        if last:
            break
    end.close()


def ping_pong(mechanism: Mechanism, rounds: int, warmup: int, pin: bool) -> list[int]:
    """Round trips in ns, after `warmup` untimed ones; fewer when MAX_SECONDS runs out. With
    `pin`, the server runs on the last CPU this process may use, the client on the first."""
    cpus = sorted(os.sched_getaffinity(0))
    fork = mp.get_context("fork")
    ready = fork.Event()
    server = fork.Process(target=serve, args=(mechanism, ready, cpus[-1] if pin else None), daemon=True)
    server.start()
    if pin:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{mechanism.name}: the server did not start")
        end = mechanism.open("client")
        request, times = bytearray(os.urandom(mechanism.payload)), []
        give_up = time.perf_counter() + MAX_SECONDS
        for i in range(warmup + rounds):
            request[:8] = i.to_bytes(8, "little")  # a stale reply would not match
            start = time.perf_counter_ns()
            end.send(request)
            reply = bytes(end.recv())
            took = time.perf_counter_ns() - start
            if reply != request:
                raise RuntimeError(f"{mechanism.name}: reply {i} is not its request")
            if i >= warmup:
                times.append(took)
            if len(times) >= 20 and time.perf_counter() > give_up:
                break
        end.send(STOP)
        end.recv()
        end.close()
        server.join(10)
    finally:
        os.sched_setaffinity(0, cpus)
        if server.is_alive():
            server.kill()
            server.join()
    return times


@dataclass
class Run:
    rounds: int
    median_us: float
    p99_us: float


@dataclass
class Row:
    mechanism: str
    payload_bytes: int
    runs: list[Run] = field(default_factory=list)

    def of_runs(self, figure: str) -> float:  # its median over the runs
        return statistics.median(getattr(r, figure) for r in self.runs)


def summarize(times: list[int]) -> Run:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return Run(len(ordered), statistics.median(ordered) / 1e3, p99 / 1e3)


def table(rows: list[Row], repeat: int) -> str:
    of = f" (median of {repeat} runs)" if repeat > 1 else ""
    lines = [f"| mechanism | payload | round trips | median µs{of} | p99 µs{of} |", "|---|---|---|---|---|"]
    size = {SMALL: "200 B", LARGE: "64 KiB"}
    lines += [f"| {r.mechanism} | {size[r.payload_bytes]} | {min(x.rounds for x in r.runs)} | "
              f"{r.of_runs('median_us'):.1f} | {r.of_runs('p99_us'):.1f} |" for r in rows]
    return "\n".join(lines)


def host() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "loadavg": os.getloadavg(),
            "iceoryx2": importlib.metadata.version("iceoryx2") if iox2 is not None else None}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000, help="timed round trips per mechanism and run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed round trips first (default rounds/10)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole set, interleaved; medians of runs")
    parser.add_argument("--json", metavar="FILE", help="write every run's figures here ('-' for stdout)")
    parser.add_argument("--pin", action="store_true", help="client and server on two different CPUs")
    parser.add_argument("--no-extra", action="store_true", help="only what needs no package beyond pyzmq")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeat < 1 or (args.warmup is not None and args.warmup < 0):
        parser.error("--rounds and --repeat must be at least 1, --warmup at least 0")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two CPUs this process may run on")
    warmup = args.rounds // 10 if args.warmup is None else args.warmup
    if iox2 is None and not args.no_extra:
        print("iceoryx2: not installed (pip install iceoryx2 to measure it), skipped", file=sys.stderr)
    if iox2 is not None:
        iox2.set_log_level(iox2.LogLevel.Error)  # not its note that no config file was found
    rows: dict[tuple[str, int], Row] = {}
    for _ in range(args.repeat):
        for mechanism in mechanisms(not args.no_extra):
            try:
                times = ping_pong(mechanism, args.rounds, warmup, args.pin)
            finally:
                mechanism.close()
            key = (mechanism.name, mechanism.payload)
            rows.setdefault(key, Row(*key)).runs.append(summarize(times))
    print(table(list(rows.values()), args.repeat), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        report = {"host": host(), "rounds": args.rounds, "warmup": warmup, "repeat": args.repeat, "pin": args.pin,
                  "rows": [dict(asdict(r), median_us=r.of_runs("median_us"), p99_us=r.of_runs("p99_us"))
                           for r in rows.values()]}
        text = json.dumps(report, indent=1)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
