"""Fuzzing: >= 10,000 malformed and random messages at a live server, then an exact prefill.

Messages go straight onto a DEALER socket, so anything can be sent: random frames, broken
msgpack, headers with wrong types, shapes, dtypes and sizes, tensors holding NaN, and valid
requests too. A message with an envelope delimiter must be answered with a well-formed reply
(routed back with the sender's envelope, never an `internal` error); one without is ignored.
"""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsqp import api, protocol
from tsqp.server import METHODS, Limits

from conftest import reference_logits, relative_error

MESSAGES = 10_000
MUTANTS = 3  # byte-level mutations of each generated message (hypothesis draws are the slow part)
EXPECTED_CODES = {"bad_request", "unknown_method", "too_large", "non_finite", "missing_state"}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}

# tiny preset: hidden 64, 4 heads (2 kv) of 16, 2 layers, vocab 512
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 16, 32, 64, 128, 512]), st.integers(-3, 70),
                 st.sampled_from([2 ** 31, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1, -2 ** 63]))
shapes = st.one_of(st.lists(dims, max_size=5), st.lists(st.sampled_from([1, 2, 16, 64]), min_size=9, max_size=10))
dtype_names = st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.sampled_from(["complex64", "uint8", "", "float"]),
                        st.integers(-2 ** 63, 2 ** 64 - 1), st.none())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=12), st.binary(max_size=12))
arg_values = st.one_of(scalars, st.integers(-2, 3), st.sampled_from(protocol.LINEAR_MODULES + protocol.WIRE_DTYPES),
                       st.lists(st.sampled_from(protocol.LINEAR_MODULES + ("lm_head", "nope")), max_size=8),
                       st.text(min_size=120, max_size=140))
arg_names = st.sampled_from(["layer_idx", "layer", "module_name", "module", "session", "wire_dtype",
                             "all_positions", "modules", "other"])
METHOD_NAMES = tuple(METHODS)  # every method the server knows

methods = st.one_of(*[st.sampled_from(METHOD_NAMES)] * 6, st.text(max_size=10), scalars)


def numel(shape: list) -> int | None:
    ok = all(isinstance(d, int) and 0 <= d < 2 ** 31 for d in shape)
    return math.prod(shape) if ok else None


@st.composite
def payload(draw, spec) -> bytes:
    """Bytes for a spec: usually the right length (random bits, plausible values with a NaN or an
    infinity here and there), sometimes not."""
    shape = spec.get("shape") if isinstance(spec, dict) else None
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    count = numel(shape) if isinstance(shape, list) else None
    size = ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if count is None or size is None or count * size > 1 << 16 or draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    nbytes = count * size
    if nbytes <= 512 and draw(st.booleans()):
        return draw(st.binary(min_size=nbytes, max_size=nbytes))
    if dtype == "int64":
        return struct.pack("<q", draw(st.integers(-5, 600))) * count
    if dtype != "float32":
        return draw(st.binary(min_size=size, max_size=size)) * count
    data = bytearray(struct.pack("<f", draw(st.floats(-1e4, 1e4, width=32))) * count)
    if count and draw(st.booleans()):
        at = draw(st.integers(0, count - 1)) * 4
        data[at: at + 4] = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    return bytes(data)


H, I, HEADS, KV, D, LAYERS = 64, 176, 4, 2, 16, 2  # the tiny preset


@st.composite
def plausible(draw) -> tuple[str, dict, list[dict]]:
    """A request a TEE could send, for a real method with near-right args and shapes."""
    method = draw(st.sampled_from(METHOD_NAMES))
    b, n, m = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    x = draw(st.sampled_from([[b, n, H], [b, n, H], [n, H], [b, n, H + 1], [b, n, I]]))
    args = {"layer_idx": draw(st.integers(-1, LAYERS)),
            "wire_dtype": draw(st.sampled_from([*protocol.WIRE_DTYPES, "float64"]))}
    shapes = {"Embedding": [[b, n]], "Whole": [[b, n]], "QKVScores": [x, [n, D], [draw(st.sampled_from([n, m])), D]],
              "AttnOut": [[b, HEADS, n, draw(st.sampled_from([n, m]))]], "GatedDown": [[b, n, I]],
              "AttnGate": [x, [b, HEADS, n, draw(st.sampled_from([n, m]))]], "DownHead": [[b, n, I], x],
              "DownScores": [[b, n, I], x, [n, D], [draw(st.sampled_from([n, m])), D]],
              "Matmul": draw(st.sampled_from([[[b, HEADS, n, D], [b, HEADS, D, n]], [[b, HEADS, n, n], [b, HEADS, n, D]],
                                              [[b, HEADS, n, D], [b, HEADS, D, m]], [[n, m], [m, 3]]])),
              "Ping": [], "Init": [], "Release": []}.get(method, [x])
    if method in ("Linear",):
        args["module_name"] = draw(st.sampled_from(protocol.LINEAR_MODULES))
    if method in ("QKVScores", "DownScores") and draw(st.booleans()):
        args["blocks"] = draw(st.sampled_from([[n], [1, n], [n, n], [m], "all"]))
    if method in ("QKVScores", "AttnOut", "AttnGate", "DownScores", "DownHead", "Gate", "GatedDown", "Release"):
        args["session"] = draw(st.sampled_from(["fuzz-a", "fuzz-b", "x" * 130]))
    if method == "Linears":
        args["modules"] = draw(st.lists(st.sampled_from(protocol.LINEAR_MODULES), min_size=1, max_size=3))
    if method == "Whole":
        args = {"all_positions": draw(st.booleans())}
    dtype = "int64" if method in ("Embedding", "Whole") else draw(st.sampled_from(["float32"] * 4 + ["float16"]))
    return method, args, [{"dtype": dtype, "shape": shape} for shape in shapes]


@st.composite
def body(draw) -> list[bytes]:
    """The frames after the envelope: garbage, a plausible request, or a header of anything."""
    kind = draw(st.sampled_from(["garbage", "plausible", "plausible", "header", "header"]))
    if kind == "garbage":
        return draw(st.lists(st.binary(max_size=64), max_size=4))
    if kind == "plausible":
        method, args, specs = draw(plausible())
        head = msgpack.packb({"method": method, "args": args, "tensors": specs})
        return [head, *(draw(payload(s)) for s in specs)]
    specs = draw(st.lists(st.one_of(st.fixed_dictionaries({"dtype": dtype_names, "shape": shapes}), scalars),
                          max_size=3))
    header: dict = {"method": draw(methods), "args": draw(st.one_of(st.dictionaries(arg_names, arg_values, max_size=4),
                                                                    scalars)),
                    "tensors": specs}
    for key in draw(st.sets(st.sampled_from(["method", "args", "tensors"]), max_size=1)):
        del header[key]
    head = msgpack.packb(header, use_bin_type=draw(st.booleans()))
    payloads = [draw(payload(s)) for s in specs]
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))
    payloads = payloads[:extra] if extra < 0 else payloads + [b"\x00" * 4] * extra
    return [head, *payloads]


def mutate(frames: list[bytes], rng) -> list[bytes]:
    """One random byte-level change to the body (the envelope is kept, so an answer is still due)."""
    split = frames.index(b"") + 1 if b"" in frames else 0
    envelope, body = frames[:split], [bytearray(f) for f in frames[split:]] or [bytearray()]
    i = rng.randrange(len(body))
    action = rng.choice(["flip", "flip", "truncate", "drop", "duplicate", "append", "grow"])
    if action == "flip" and body[i]:
        at = rng.randrange(len(body[i]))
        body[i][at] ^= 1 << rng.randrange(8)
    elif action == "truncate":
        del body[i][rng.randrange(len(body[i]) + 1):]
    elif action == "drop":
        del body[i]
    elif action == "duplicate":
        body.insert(i, bytearray(body[i]))
    elif action == "append":
        body.append(bytearray(rng.randbytes(rng.randrange(16))))
    else:
        body[i] += rng.randbytes(rng.choice([1, 4, 8]))
    mutated = [*envelope, *(bytes(f) for f in body)]
    return mutated if split else [f for f in mutated if f] or [b"x"]


@st.composite
def message(draw) -> list[bytes]:
    """What a DEALER sends: [routing..., b"", body...] like a REQ, or no delimiter at all."""
    frames = draw(body())
    envelope = draw(st.sampled_from(["req", "req", "req", "routed", "none"]))
    if envelope == "req":
        return [b"", *frames]
    if envelope == "routed":
        return [draw(st.binary(min_size=1, max_size=8)), b"", *frames]
    return [f for f in frames if f] or [b"x"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_dir):
    limits = Limits(max_elements=1 << 18, max_message_bytes=1 << 20)
    with api.start_server(tiny_dir, device="cpu", limits=limits) as server:
        yield server


def test_fuzzed_messages_never_break_the_server(fuzz_server, tiny_dir, references):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(fuzz_server.endpoint)
    counts = {"sent": 0, "answered": 0, "ok": 0}
    codes: dict[str, int] = {}

    def send(frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        counts["sent"] += 1
        if b"" not in frames:
            return  # not an envelope: the server must ignore it (checked below: nothing stray arrives)
        assert sock.poll(10_000), f"no reply to {frames!r}"
        reply = sock.recv_multipart()
        split = frames.index(b"")
        assert reply[: split + 1] == frames[: split + 1], "reply routed with another envelope"
        header = protocol.decode(reply[split + 1:]).header
        counts["answered"] += 1
        if header["ok"]:
            counts["ok"] += 1
        else:
            code = header["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            assert code in EXPECTED_CODES, (header["error"], frames)

    @settings(max_examples=MESSAGES // (1 + MUTANTS), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(message(), st.randoms(use_true_random=False))
    def exchange(frames: list[bytes], rng) -> None:
        send(frames)
        for _ in range(MUTANTS):
            send(mutate(frames, rng))

    exchange()
    assert not sock.poll(300), "a reply to a message that should have been ignored"
    sock.close(linger=0)
    print(f"fuzz: {counts}, error codes {codes}")
    assert counts["sent"] >= MESSAGES
    assert counts["answered"] > MESSAGES // 2 and counts["ok"] > 0 and len(codes) >= 4
    assert fuzz_server.is_alive()

    runner = api.connect(fuzz_server.endpoint, tiny_dir)
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(17))
    logits = runner.prefill(ids, all_positions=True).logits
    runner.client.close()
    assert relative_error(logits, reference_logits(references["gqa"], ids)) <= 1e-4
