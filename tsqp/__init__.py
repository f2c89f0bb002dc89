"""TSQP: LLaMA-family inference split between a TEE (control flow, non-linear ops) and an
untrusted GPU server (linear algebra), connected by ZeroMQ."""

__version__ = "0.1.0"
