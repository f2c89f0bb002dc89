"""The GPU side, by concern:

    core.py       GpuServer: check -> dispatch -> reply (never raises)
    registry.py   one row per method, declared on its handler with @method
    checks.py     a request against the registry and the limits, before any work
    sessions.py   per-session state: bytes-bounded, least recently used first, idle timeout
    stateless.py  Ping, Init, Embedding, Linear, Linears, Matmul, LMHead, Whole
    lean.py       QKVScores, AttnGate, DownScores, DownHead (AttnOut, Gate, GatedDown), keeping K, V, up; Release
    model.py      the checkpoint on its device; layer, module and input lookups
    serving.py    ServerThread, run, check_bind
"""

from .checks import MAX_ELEMENTS, Limits, Request, default_reply_bytes
from .core import GpuServer, ServerInfo, ServiceState
from .errors import BadRequest, DeviceError, InsecureBind, MissingState, NonFinite, TooLarge, UnknownMethod
from .model import default_device, load_model, parse_dtype, resolve_device
from .registry import METHODS, Method, method
from .serving import ServerThread, check_bind, run
from .sessions import SessionStore

__all__ = [
    "MAX_ELEMENTS", "Limits", "Request", "default_reply_bytes", "GpuServer", "ServerInfo", "ServiceState",
    "BadRequest", "DeviceError", "InsecureBind", "MissingState", "NonFinite", "TooLarge", "UnknownMethod",
    "default_device", "load_model", "parse_dtype", "resolve_device", "METHODS", "Method", "method",
    "ServerThread", "check_bind", "run", "SessionStore",
]
