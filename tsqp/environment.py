"""Environment variables as the defaults of `tsqp` options, checked only by the command that runs.

A default is read when its command runs, never when the parser is built, so a bad value breaks
that command alone (`tsqp --help` and every other command still work), and its error names the
variable. An option says which variable backs it in its help, as `[$NAME...]`: that mention,
which the user reads anyway, is the one place tying the two. Variables a command reads without an
option are named the same way in its sub-parser's epilog.
"""

from __future__ import annotations

import argparse
import os
import re

from .errors import InputError

_VARIABLE = re.compile(r"\$([A-Z][A-Z0-9_]*)")


def env(name: str, default: str | None = None) -> str | None:
    """An environment variable, treating an empty value as unset."""
    value = os.environ.get(name)
    return value if value else default


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer variable, or `default` when it is unset; a bad value is an error naming it."""
    raw = env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not an integer") from None
    if value < minimum:
        raise InputError(f"${name}={raw!r} must be at least {minimum}")
    return value


def _option_variables(parser: argparse.ArgumentParser) -> list[tuple[argparse.Action, str]]:
    """(option, NAME) for each option whose help names the variable backing it."""
    found = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        match = _VARIABLE.search(action.help or "")
        if match and action.option_strings:
            found.append((action, match.group(1)))
    return found


def values_from_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """NAME -> value for each variable this command took a value from: an option's default that
    was not overridden on the command line, or a variable named in the command's epilog."""
    taken = {}
    for action, name in _option_variables(parser):
        raw = env(name)
        if raw is not None and getattr(args, action.dest, None) == raw:
            taken[name] = raw
    for name in _VARIABLE.findall(parser.epilog or ""):
        raw = env(name)
        if raw is not None:
            taken[name] = raw
    return taken


def check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse checks `choices` on the command line only: a default from the environment is
    checked here, before the command runs."""
    for action, name in _option_variables(parser):
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            raise InputError(f"${name}={value!r} is not one of {', '.join(map(str, action.choices))} "
                             f"(for {action.option_strings[0]})")


def blame(message: str, taken: dict[str, str]) -> str:
    """`message`, saying which variable each value it quotes came from, when one did."""
    sources = [name for name, raw in taken.items()
               if f"${name}" not in message
               and re.search(rf"(?<![\w./-]){re.escape(raw)}(?![\w./-])", message)]
    return message + "".join(f" (from ${name})" for name in sources)
