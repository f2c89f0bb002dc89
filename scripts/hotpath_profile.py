"""Microseconds per call of the per-call hot path, in one process (no sockets): the server's
`GpuServer.handle` for Echo, a decode-shaped Linear and the lean decode methods, the client's
protocol.encode/decode, a whole lean decode step of the TEE against `handle`, the ways of
checking inputs finite, and a bare torch op. Medians of many calls, each run repeated (the
machine is shared).

    python scripts/hotpath_profile.py [--device cpu|cuda] [--preset tiny] [--calls 2000] [--repeats 5]
                                      [--sweep-mb 256 [--rehearse]] [--threads N]
    OMP_WAIT_POLICY=PASSIVE python scripts/hotpath_profile.py --preset llama-3.2-1b --prefill 128 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tsqp import protocol  # noqa: E402
from tsqp.errors import RemoteError  # noqa: E402
from tsqp.models import cached_model, make_model  # noqa: E402
from tsqp.server.core import GpuServer  # noqa: E402
from tsqp.tee.runner import TeeRunner  # noqa: E402
from tsqp.transport import WireStats  # noqa: E402


def per_call_us(fn: Callable[[], Any], calls: int, repeats: int, sweep: torch.Tensor | None = None,
                before: Callable[[], Any] | None = None) -> float:
    """The median over `repeats` runs of each run's median call, in µs (after a warm-up). With
    `sweep`, that buffer is written (untimed) before each call: the caches then hold what they
    hold after a big model's matmul, and the call runs cold, as it does in a real decode.
    `before` runs (untimed) after the sweep, right before each call."""
    for _ in range(min(calls, 50)):
        fn()
    runs = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            if sweep is not None:
                sweep.add_(1.0)
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        runs.append(statistics.median(times))
    return statistics.median(runs) * 1e6


class InProcessClient:
    """What TeeRunner needs of a Client, answered by `GpuServer.handle` directly."""

    endpoint = "inprocess://hotpath"

    def __init__(self, server: GpuServer):
        self.server, self.stats = server, WireStats()

    def call(self, method: str, tensors=(), timeout_s: float | None = None, **args: Any) -> protocol.Message:
        reply = protocol.decode(self.server.handle(protocol.encode({"method": method, "args": args}, tensors)))
        self.stats.round_trips += 1
        if not reply.header.get("ok"):
            raise RemoteError(reply.header["error"]["code"], reply.header["error"]["message"])
        return reply

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.call("Ping").header


def request(method: str, tensors: list[torch.Tensor], **args: Any) -> list[Any]:
    return protocol.encode({"method": method, "args": args}, tensors)


def checked(server: GpuServer, frames: list[Any]) -> Callable[[], Any]:
    """`handle(frames)`, after making sure it answers ok (a refused request times nothing useful)."""
    header = protocol.decode_header(server.handle(frames)[0])
    if not header.get("ok"):
        raise SystemExit(f"hotpath_profile: request refused: {header['error']}")
    return lambda: server.handle(frames)


def server_rows(server: GpuServer) -> dict[str, Callable[[], Any]]:
    c = server.config
    h, d, prompt = c.hidden_size, c.head_dim, 8
    x = torch.randn(1, 1, h)
    cos, sin = torch.randn(1, d), torch.randn(1, d)
    session = {"layer_idx": 0, "session": "hotpath"}
    for layer in (1, 0):  # DownScores of layer 0 writes layer 1's keys
        server.handle(request("QKVScores", [torch.randn(1, prompt, h), torch.randn(prompt, d), torch.randn(prompt, d)],
                              blocks=[prompt], start=0, capacity=prompt + 1, **{**session, "layer_idx": layer}))
    server.handle(request("Gate", [x], **session))
    rows = {
        "Echo [1,1,h]": checked(server, request("Echo", [x])),
        "Linear q_proj [1,1,h]": checked(server, request("Linear", [x], layer_idx=0, module_name="q_proj")),
        "QKVScores decode": checked(server, request("QKVScores", [x, cos, sin], blocks=[1], start=prompt,
                                                    capacity=prompt + 1, **session)),
        "AttnOut decode": checked(server, request("AttnOut", [torch.rand(1, c.num_heads, 1, prompt + 1)], **session)),
        "Gate decode": checked(server, request("Gate", [x], **session)),
        "GatedDown decode": checked(server, request("GatedDown", [torch.randn(1, 1, c.intermediate_size)],
                                                    **session)),
        "AttnGate decode": checked(server, request("AttnGate", [x, torch.rand(1, c.num_heads, 1, prompt + 1)],
                                                   **session)),
        "DownScores decode": checked(server, request("DownScores", [torch.randn(1, 1, c.intermediate_size), x, cos,
                                                                    sin], blocks=[1], start=prompt,
                                                     capacity=prompt + 1, **session)),
    }
    return rows


def client_rows(hidden: int) -> dict[str, Callable[[], Any]]:
    x = torch.randn(1, 1, hidden)
    reply = protocol.encode({"ok": True, "server_s": 1e-4}, [x])
    reply = [bytes(f) for f in reply]
    return {
        "client encode [1,1,h]": lambda: protocol.encode({"method": "Linear", "args": {"layer_idx": 0}}, [x]),
        "client decode [1,1,h]": lambda: protocol.decode(reply),
    }


def decode_step(model_dir: Path, server: GpuServer) -> Callable[[], Any]:
    """One lean decode step of the TEE (runner.forward for one token), rewriting one position."""
    runner = TeeRunner(InProcessClient(server), model_dir, protocol="lean")  # type: ignore[arg-type]
    prompt = torch.randint(0, runner.config.vocab_size, (1, 8))
    runner.steps.open(1, 9)
    runner.forward(prompt, 0)
    token = prompt[:, -1:]
    return lambda: runner.forward(token, 8)


def prefill_rounds(model_dir: Path, server: GpuServer, tokens: int, rounds: int) -> None:
    """The lean prefill (the TEE's forward against `handle`, no transport) against the whole
    model (`Whole`, transformers) in the same process, alternating: what the split's work costs
    before any second process."""
    runner = TeeRunner(InProcessClient(server), model_dir, protocol="lean")  # type: ignore[arg-type]
    ids = torch.randint(0, runner.config.vocab_size, (1, tokens))
    whole = checked(server, request("Whole", [ids]))

    def seconds(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for _ in range(2):
        runner.prefill(ids), whole()
    for round_ in range(1, rounds + 1):
        split_s, whole_s = seconds(lambda: runner.prefill(ids)), seconds(whole)
        print(f"round {round_}: split {split_s:.3f} s, whole {whole_s:.3f} s, split x whole {split_s / whole_s:.3f}")


def finite_rows(device: torch.device, hidden: int) -> dict[str, Callable[[], Any]]:
    """Three ways to check one input finite: stacked sums then isfinite (the server's, before),
    isfinite().all(), and one sum read back (the server's now, on the host)."""
    rows = {}
    for label, shape in (("decode", (1, 1, hidden)), ("prefill", (1, 128, 2048))):
        t = torch.randn(*shape, device=device)
        rows[f"finite {label} stack(sum)"] = lambda t=t: bool(
            torch.isfinite(torch.stack([t.sum(dtype=torch.float32)])).all())
        rows[f"finite {label} isfinite.all"] = lambda t=t: bool(torch.isfinite(t).all())
        rows[f"finite {label} sum.item"] = lambda t=t: math.isfinite(t.sum().item())
    return rows


def op_rows(hidden: int) -> dict[str, Callable[[], Any]]:
    """The same small torch op once and ten times: with a sweep, what the first op of a call
    pays to bring torch's dispatcher back into the caches, and what each further one adds."""
    x = torch.randn(1, 1, hidden)

    def repeated(count: int) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            y = x
            for _ in range(count):
                y = y * 1.0001
            return y
        return run

    return {"x * c, 1 op": repeated(1), "x * c, 10 ops": repeated(10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-mb", type=int, default=0,
                        help="write this many MB before each call, as a big model's weights go through the "
                             "caches between two calls (0: hot caches)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (run with OMP_WAIT_POLICY=PASSIVE, as `tsqp` sets it, to see what "
                             "waking an idle worker costs)")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the server's rehearsal (GpuServer.rehearse) before each of its calls, after the "
                             "sweep, as the serving loop does after a long call")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="instead: a lean prefill of TOKENS tokens against the whole model, --repeats rounds "
                             "(the preset's cached model, as `tsqp bench` makes it)")
    opts = parser.parse_args()
    if opts.prefill is not None and opts.prefill < 1:
        parser.error(f"--prefill must be at least 1 token, got {opts.prefill}")
    if opts.prefill:
        torch.set_num_threads(opts.threads)
        model_dir = cached_model(opts.preset)
        prefill_rounds(model_dir, GpuServer(model_dir, device=opts.device), opts.prefill, opts.repeats)
        return
    sweep = torch.empty(opts.sweep_mb << 18) if opts.sweep_mb else None  # float32: 2^18 per MB
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(opts.preset, Path(tmp) / "model", seed=0)
        server = GpuServer(model_dir, device=opts.device)
        served = server_rows(server)
        rows = {**served, **client_rows(server.config.hidden_size),
                "TEE lean decode step (in-process)": decode_step(model_dir, server),
                **finite_rows(server.device, server.config.hidden_size), **op_rows(server.config.hidden_size)}
        caches = f", {opts.sweep_mb} MB written before each call" if sweep is not None else ""
        print(f"{opts.preset} on {server.device}, {opts.threads} thread(s), median of {opts.repeats} runs x "
              f"{opts.calls} calls{caches}")
        for name, fn in rows.items():
            calls = max(opts.calls // 20, 20) if name.startswith("TEE") else opts.calls
            if sweep is not None:
                calls = max(calls // 10, 20)  # each sweep takes longer than the call
            before = server.rehearse if opts.rehearse and name in served else None
            print(f"{name:38s} {per_call_us(fn, calls, opts.repeats, sweep, before):10.1f} µs")


if __name__ == "__main__":
    main()
