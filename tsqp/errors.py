"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class TsqpError(Exception):
    """Base class: anything raised as a TsqpError is reported as `error: <message>`."""


class ModelError(TsqpError):
    """The model directory is missing, unreadable, or not a LLaMA-family model we can split."""


class InputError(TsqpError):
    """The caller asked for something the model cannot do (too many tokens, bad ids...)."""


class ProtocolError(TsqpError):
    """A message on the wire is malformed or names something that does not exist."""


class RemoteError(TsqpError):
    """The server answered a request with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server error [{code}]: {message}")
        self.code = code


class ServerUnreachable(TsqpError):
    """No reply from the server within the timeout."""


class IntegrityError(TsqpError):
    """A server's answer failed a check the TEE makes (Freivalds, or a non-finite value): no logits."""


class MaskReuseError(TsqpError):
    """One-time material was asked for twice."""
