#!/usr/bin/env python3
"""Minimal stand-in for ``gramine-manifest``, used by ``make check`` and the tests.

It renders a Gramine manifest template with the same Jinja2 settings that
``gramine-manifest`` uses (``StrictUndefined``, no autoescape, trailing newline kept) and with
stand-ins for exactly the globals that ``gramine-manifest`` provides:

* ``gramine.libos``, ``gramine.pkglibdir``, ``gramine.runtimedir(libc='glibc')``
* ``python.stdlib``, ``python.platstdlib``, ``python.purelib``, ``python.distlib``,
  ``python.get_config_var``, ``python.ext_suffix``, ``python.get_path``, ``python.get_paths``,
  ``python.implementation``, ``python.get_sys_path(interpreter, include_nonexisting=False)``
  (like in Gramine, everything except ``get_sys_path`` describes the interpreter *running this
  script*, not the manifest's entrypoint)
* ``env`` (the process environment) and ``ldd(*binaries)``

plus the ``-Dkey=value`` definitions (``-Dkey`` alone means ``True``, as in gramine-manifest).

Differences from the real tool, on purpose: trusted files are neither expanded nor hashed, and
only a light structural check is done instead of Gramine's full schema. The rendered text is
parsed with :mod:`tomllib` and written out unchanged.

CLI::

    python gramine/render.py -Dentrypoint=/usr/bin/python3.11 -Dmodel_dir=/models/llama \\
        [--pkglibdir DIR] TEMPLATE [OUT]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterable, Mapping

try:
    import jinja2
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("render.py: jinja2 is required (pip install jinja2)")

#: Where the Debian/Ubuntu gramine packages install libsysdb.so and the runtime.
DEFAULT_PKGLIBDIR = "/usr/lib/x86_64-linux-gnu/gramine"

_SIZE_RE = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+)([KMG]?)$")


class RenderError(Exception):
    """The template rendered into something that is not a plausible Gramine manifest."""


def parse_size(value: str) -> int:
    """Parse a Gramine size string ("256M", "16G", "0x1000") into bytes."""
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a Gramine size: {value!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    return int(m.group(1), 0) * scale


def default_pkglibdir() -> str:
    """Gramine's real pkglibdir if graminelibos is importable, else a fixed stand-in."""
    if os.environ.get("GRAMINE_PKGLIBDIR"):
        return os.environ["GRAMINE_PKGLIBDIR"]
    try:  # pragma: no cover - only where Gramine is installed
        from graminelibos import _CONFIG_PKGLIBDIR  # type: ignore

        return str(_CONFIG_PKGLIBDIR)
    except Exception:
        return DEFAULT_PKGLIBDIR


class Runtimedir:
    """Mimics gramine's ``gramine.runtimedir``: callable, str()-able and ``/``-joinable."""

    def __init__(self, pkglibdir: str):
        self._pkglibdir = pathlib.Path(pkglibdir)

    def __call__(self, libc: str = "glibc") -> pathlib.Path:
        return self._pkglibdir / "runtime" / libc

    def __str__(self) -> str:
        return str(self())

    def __truediv__(self, other):
        return self() / other


def _defined(value):
    """Turn a StrictUndefined argument into jinja2.UndefinedError (not a TypeError later)."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    return value


def python_get_sys_path(interpreter, include_nonexisting: bool = False):
    """Same contract as gramine's: run *interpreter* and yield its non-empty sys.path entries."""
    _defined(interpreter)
    out = subprocess.check_output(
        [os.fspath(interpreter), "-c",
         "import sys; print('\\0'.join(p for p in sys.path if p), end='')"])
    for raw in out.split(b"\0"):
        if not raw:
            continue
        path = pathlib.Path(os.fsdecode(raw))
        if include_nonexisting or path.exists():
            yield path


def parse_ldd(output: str) -> list[str]:
    libs = set()
    for line in output.strip().splitlines():
        parts = line.split()
        if len(parts) == 1 and parts[0].endswith(":"):
            continue
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            libs.add(parts[2])
        elif len(parts) >= 2 and parts[0].startswith("/") and parts[1].startswith("/"):
            libs.add(parts[0])
    return sorted(libs)


def ldd(*binaries) -> list[str]:
    binaries = [os.fspath(_defined(b)) for b in binaries]
    return parse_ldd(subprocess.check_output(["ldd", *binaries]).decode())


def make_env(*, pkglibdir: str | None = None,
             environ: Mapping[str, str] | None = None,
             sys_path: Iterable[str] | Callable | None = None,
             ldd_fn: Callable | None = None) -> jinja2.Environment:
    """Build a Jinja2 environment configured like gramine-manifest's.

    The keyword arguments replace the corresponding globals, so tests can render without
    depending on the host: *sys_path* is either a list of paths returned by
    ``python.get_sys_path()`` for any interpreter, or a replacement function.
    """
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    pkglib = pathlib.Path(pkglibdir or default_pkglibdir())
    env.globals["gramine"] = {
        "libos": pkglib / "libsysdb.so",
        "pkglibdir": pkglib,
        "runtimedir": Runtimedir(str(pkglib)),
    }

    if sys_path is None:
        get_sys_path = python_get_sys_path
    elif callable(sys_path):
        get_sys_path = sys_path
    else:
        fixed = [pathlib.Path(p) for p in sys_path]

        def get_sys_path(_interpreter, include_nonexisting=False):
            return iter(fixed)

    paths = sysconfig.get_paths()
    env.globals["python"] = {
        "stdlib": pathlib.Path(paths["stdlib"]),
        "platstdlib": pathlib.Path(paths["platstdlib"]),
        "purelib": pathlib.Path(paths["purelib"]),
        "distlib": pathlib.Path(sysconfig.get_path(
            "stdlib", vars={"py_version_short": sys.version_info[0]})) / "dist-packages",
        "get_config_var": sysconfig.get_config_var,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "get_path": sysconfig.get_path,
        "get_paths": sysconfig.get_paths,
        "implementation": sys.implementation,
        "get_sys_path": get_sys_path,
    }
    env.globals["env"] = dict(os.environ if environ is None else environ)
    env.globals["ldd"] = ldd_fn or ldd
    return env


def parse_defines(items: Iterable[str]) -> dict[str, object]:
    """``["a=1", "flag"]`` -> ``{"a": "1", "flag": True}`` (gramine-manifest semantics)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        out[key] = value if sep else True
    return out


def check_manifest(data: dict) -> None:
    """A small subset of Gramine's manifest schema, enough to catch template mistakes."""
    def need(cond, msg):
        if not cond:
            raise RenderError(msg)

    libos = data.get("libos", {})
    need(isinstance(libos.get("entrypoint"), str), "libos.entrypoint must be a string")
    loader = data.get("loader", {})
    ep = loader.get("entrypoint", {})
    need(isinstance(ep, dict) and str(ep.get("uri", "file:")).startswith("file:"),
         "loader.entrypoint must be a table with a file: uri (Gramine >= 1.8 syntax)")
    for name, value in loader.get("env", {}).items():
        need(isinstance(value, str) or value == {"passthrough": True}
             or (isinstance(value, dict) and set(value) == {"value"}),
             f"loader.env.{name}: must be a string, {{ value = ... }} or {{ passthrough = true }}")
    mounts = data.get("fs", {}).get("mounts")
    need(isinstance(mounts, list) and mounts, "fs.mounts must be a non-empty list")
    seen = set()
    for m in mounts:
        need(isinstance(m, dict) and "path" in m, f"bad mount {m!r}")
        need(m["path"] not in seen, f"duplicate mount path {m['path']!r}")
        seen.add(m["path"])
        if m.get("type", "chroot") == "chroot":
            need(str(m.get("uri", "")).startswith("file:"), f"mount {m!r} needs a file: uri")
    sgx = data.get("sgx", {})
    for key in ("trusted_files", "allowed_files"):
        for tf in sgx.get(key, []):
            uri = tf["uri"] if isinstance(tf, dict) else tf
            need(isinstance(uri, str) and (uri.startswith("file:") or uri.startswith("dev:")),
                 f"sgx.{key}: bad entry {tf!r}")
    if "enclave_size" in sgx:
        size = parse_size(sgx["enclave_size"])
        need(size > 0 and size & (size - 1) == 0,
             f"sgx.enclave_size {sgx['enclave_size']!r} must be a power of two")
    if "max_threads" in sgx:
        need(isinstance(sgx["max_threads"], int) and sgx["max_threads"] >= 4,
             "sgx.max_threads must be an integer >= 4")


def render(template: str | os.PathLike, defines: Mapping[str, object] | None = None,
           **env_kwargs) -> str:
    """Render *template* (a path) to manifest text; raises jinja2.UndefinedError on unknown vars."""
    text = pathlib.Path(template).read_text()
    return make_env(**env_kwargs).from_string(text).render(**dict(defines or {}))


def render_manifest(template, defines=None, *, check: bool = True, **env_kwargs) -> dict:
    """Render and parse with tomllib; returns the manifest as a dict."""
    data = tomllib.loads(render(template, defines, **env_kwargs))
    if check:
        check_manifest(data)
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-D", "--define", action="append", default=[], metavar="KEY[=VALUE]")
    ap.add_argument("--pkglibdir", default=None,
                    help="Gramine pkglibdir stand-in (default: real one if installed, else "
                         f"{DEFAULT_PKGLIBDIR})")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the structural sanity checks")
    ap.add_argument("template")
    ap.add_argument("out", nargs="?", default="-")
    args = ap.parse_args(argv)

    try:
        text = render(args.template, parse_defines(args.define), pkglibdir=args.pkglibdir)
        data = tomllib.loads(text)
        if args.check:
            check_manifest(data)
    except jinja2.UndefinedError as exc:
        print(f"render.py: {args.template}: undefined template variable: {exc}", file=sys.stderr)
        return 1
    except (tomllib.TOMLDecodeError, RenderError, ValueError) as exc:
        print(f"render.py: {args.template}: invalid manifest: {exc}", file=sys.stderr)
        return 1

    if args.out == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
