"""What the server answers instead of a result: each refusal carries the code its error reply gets."""

from __future__ import annotations

from ..errors import TsqpError


class BadRequest(Exception):
    """The request is well-formed on the wire but asks for something invalid."""

    code = "bad_request"


class MissingState(BadRequest):
    """A session call needs state an earlier call left here (V, up), and it is gone: the server
    restarted, dropped the session (memory budget, idle timeout, Release), or the call skipped
    its predecessor."""

    code = "missing_state"


class Unsupported(BadRequest):
    """A method this server has but cannot run exactly for this model or dtype (a fused call
    whose projections have biases, unscaled scores in float16): the client takes the unfused calls."""

    code = "unsupported"


class UnknownMethod(BadRequest):
    code = "unknown_method"


class TooLarge(BadRequest):
    """An input, the output it would produce, or a session's state exceeds the server's limits."""

    code = "too_large"


class NonFinite(BadRequest):
    """A floating-point input holds NaN or infinity: no honest TEE sends one."""

    code = "non_finite"


class InsecureBind(TsqpError):
    """Binding a network interface in plaintext without saying so."""


class DeviceError(TsqpError):
    """The device asked for does not exist on this machine."""
