"""Files a command will write, checked before it does any work: a benchmark that runs for
twenty minutes must not find out at the end that its --json cannot be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InputError


def check_writable(path: Path | None, flag: str) -> None:
    """Refuse (naming `flag`) a file path that cannot be created or replaced: no such directory,
    a directory in its place, or nowhere to write. None and '-' (stdout) pass."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory, not a file")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: no such directory {path.parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: not writable by this user")
    _try_writing_in(path.parent, flag, path)


def make_dir(path: Path | None, flag: str) -> None:
    """Create the directory `flag` names (and its parents) now, or refuse it, naming the flag."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create it ({err.strerror})") from None
    _try_writing_in(path, flag, path)


def _try_writing_in(directory: Path, flag: str, path: Path) -> None:
    """Write and remove a scratch file: permissions alone say nothing for root or a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write in {directory} ({err.strerror})") from None
