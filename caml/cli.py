"""The command lines' shared error idiom: every fault is one line on stderr, ``<prog>: error: <problem>``
naming the flag or file, and a non-zero exit (2: bad usage, 1: bad data or a failed run, 130: Ctrl-C).

``run(prog, body)`` calls ``body()`` and turns its errors into that line; ``Parser`` is an argparse
parser whose errors are one line too (no usage block).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

__all__ = ["UsageError", "Interrupted", "Parser", "run", "one_line", "check_out_folder", "int_at_least"]


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message saying what the interrupted run left (``interrupted`` if none)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(message)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run(prog: str, body: Callable[[], Optional[int]]) -> int:
    """``body()``'s exit status (None: 0), or the one-line report of its error."""
    try:
        return body() or 0
    except UsageError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError, RuntimeError) as err:  # FileNotFoundError is an OSError
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"{prog}: {one_line(err) if str(err) else 'interrupted'}", file=sys.stderr)
        return 130


def check_out_folder(path: str, flag: str = "--out") -> str:
    """``path`` (absolute) if it is a folder or can be made one: no file in its place or on the way to it."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):  # the first part of the path that exists must be a folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "" if probe == path else f" ({probe} is a file)"
        raise UsageError(f"{flag} {path} is not a folder{where}")
    return path


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse
