"""The TEE's per-call code, run on stand-in tensors while it spins through a decode reply.

At 1B each decode call streams ~75 MB of weights through the host's 32 MB L3 while the client
waits, so the code it runs next (msgpack, the reply's checks, torch's dispatcher for the
softmax, the norms and SiLU) comes back from memory, ~100 µs per call (docs/latency.md). A
client that spins through the wait (tsqp.spinning) can run that code now and then instead of
only yielding, and finds it in its caches when the reply comes: the mirror of the server's
rehearsal (GpuServer.rehearse). Nothing here touches a generation's state.
"""

from __future__ import annotations

import torch

from .. import ops, protocol
from ..config import ModelConfig
from .replies import checked_reply

CONTEXT = 64  # keys in the stand-in scores: any decode-sized block runs the same code


class Rehearsal:
    """One decode layer's TEE work for `batch` sequences of `config`'s model, on tensors made
    once: a reply of AttnGate's shapes decoded and checked, RMSNorm, the masked softmax with
    its factor, SiLU times a scale, the residual, and the next request encoded."""

    def __init__(self, config: ModelConfig, batch: int):
        self.batch = batch
        generator = torch.Generator().manual_seed(0)
        h, inter = (batch, 1, config.hidden_size), (batch, 1, config.intermediate_size)
        self.shapes = [h, inter]
        self.reply = [bytes(f) for f in protocol.encode(
            {"ok": True, "server_s": 0.0}, [torch.randn(h, generator=generator), torch.randn(inter, generator=generator)])]
        self.h, self.norm = torch.randn(h, generator=generator), torch.ones(config.hidden_size)
        self.eps, self.scaling = config.rms_norm_eps, config.head_dim ** -0.5
        self.scores = torch.randn(batch, config.num_heads, 1, CONTEXT, generator=generator)
        self.factor = torch.rand(batch, 1, 1, CONTEXT, generator=generator)

    def __call__(self) -> None:
        reply = protocol.decode(self.reply)
        o, gate = checked_reply([t.clone() for t in reply.tensors], self.shapes, "rehearsal")
        x = ops.rms_normalize(self.h + o, self.norm, self.eps)
        ops.causal_softmax(self.scores, self.scaling, self.factor)
        activated = ops.silu(gate).mul_(x.scale)
        protocol.encode({"method": "GatedDown", "args": {"layer_idx": 0}}, [activated, x.value])
