"""The TEE's per-call code, run on stand-in tensors while it spins through a decode reply.

At 1B each decode call streams ~75 MB of weights through the host's L3 while the client waits,
so the code it runs next (msgpack, the reply's checks, torch's dispatcher for the softmax, the
norms and SiLU) comes back from memory (docs/latency.md). A client that spins through the wait
(tsqp.spinning) can run that code now and then instead of only yielding, and finds it in its
caches when the reply comes: the mirror of the server's rehearsal (GpuServer.rehearse).
"""

from __future__ import annotations

import torch

from .. import ops, protocol
from ..config import ModelConfig
from .replies import checked_reply

CONTEXT = 64  # keys in the stand-in scores: any decode-sized block runs the same code


class Rehearsal:
    """One decode layer's TEE work on tensors made once, for one sequence whatever the batch
    (the same kernels, and element-wise ops below torch's grain size, which never wake a second
    thread on the core the server was promised): a reply of AttnGate's shapes in the wire dtype,
    read out of a buffer as the shared-memory path does and checked; RMSNorm, the masked softmax
    with its factor, SiLU times the scale; a request of the next call's size encoded. It touches
    nothing of a generation's: its tensors are its own and left as they were."""

    def __init__(self, config: ModelConfig, wire_dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(0)
        h, inter = (1, 1, config.hidden_size), (1, 1, config.intermediate_size)
        self.shapes, self.wire = [h, inter], wire_dtype
        reply = [torch.randn(shape, generator=generator).to(wire_dtype) for shape in (h, inter)]
        frames = protocol.encode({"ok": True, "server_s": 0.0}, reply)
        self.header = bytes(frames[0])
        self.payloads = [bytearray(f) for f in frames[1:]]  # as a segment's bytes
        self.h, self.norm = torch.randn(h, generator=generator), torch.ones(config.hidden_size)
        self.eps, self.scaling = config.rms_norm_eps, config.head_dim ** -0.5
        self.scores = torch.randn(1, config.num_heads, 1, CONTEXT, generator=generator)
        self.factor = torch.rand(1, 1, 1, CONTEXT, generator=generator)

    def __call__(self) -> None:
        header = protocol.decode_header(self.header)
        reply = protocol.decode_payloads(header, [self.header, *map(memoryview, self.payloads)])
        o, gate = checked_reply([t.clone() for t in reply.tensors], self.shapes, "rehearsal")
        x = ops.rms_normalize(self.h + o, self.norm, self.eps)
        ops.causal_softmax(self.scores, self.scaling, self.factor)
        activated = ops.silu(gate).mul_(x.scale)
        protocol.encode({"method": "GatedDown", "args": {"layer_idx": 0}}, [activated.to(self.wire), x.value])
