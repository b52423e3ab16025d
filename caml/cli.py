"""What the command lines (``caml.train``, ``caml.evaluate``, ``caml.data.prepare_la``,
``caml.data.synthetic``) share: the error idiom, the flags more than one of them takes, and the
printed metrics table.

Every fault is one line on stderr, ``<prog>: error: <problem>`` naming the flag or file, and a
non-zero exit (2: bad usage, 1: bad data or a failed run, 130: Ctrl-C). ``run(prog, body)`` calls
``body()`` and turns its errors into that line; ``Parser`` is an argparse parser whose errors are one
line too (no usage block); ``one_line`` is how any error's text becomes part of such a line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

__all__ = ["UsageError", "Interrupted", "Parser", "run", "one_line", "check_out_folder", "int_at_least",
           "add_device_flag", "add_patch_size_flag", "add_fold_flag", "device_from_flag", "print_metrics"]

DEVICES = "auto, cpu, cuda or cuda:N"


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message saying what the interrupted run left (``interrupted`` if none)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(message)


def one_line(err: BaseException, limit: Optional[int] = None) -> str:
    """``err``'s text on one line (white space folded), cut to ``limit`` characters; its type's name if empty."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


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


def add_device_flag(parser: argparse.ArgumentParser, default: Optional[str]) -> None:
    parser.add_argument("--device", default=default, help="auto (default), cpu, cuda or cuda:N")


def add_patch_size_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("W", "H", "D"))


def add_fold_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold", type=int, default=None, metavar="K", help="with --split splits_final.json (nnU-Net's "
                        "folds): fold K, whose train cases are the labeled training cases and val cases the test cases")


def device_from_flag(flag: str, local_rank: int = 0) -> torch.device:
    """The device ``--device`` names; ``auto``: this process's GPU (``local_rank``) if there is one, else the CPU."""
    if flag == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UsageError(f"unknown device {flag!r} ({DEVICES})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {flag!r} requested but CUDA is not available")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s))")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(f"unsupported device {flag!r} ({DEVICES})")
    return device


def _metric_columns(values: dict) -> str:
    return f"{values['dice']:>8.4f}{values['jaccard']:>9.4f}{values['hd95']:>8.2f}{values['asd']:>8.2f}"


def print_metrics(metrics: dict, folder: str, label: str, more: Optional[dict] = None) -> None:
    """The per-case (or per-run) and mean metrics as a table on stdout (several classes: a row per case
    and class, ``mean`` the mean over the foreground classes), then the rows of ``more`` (name -> metrics)
    and ``<label>: <folder>``."""
    rows = [*metrics["cases"].items(), ("mean", metrics), *(more or {}).items()]
    if "classes" not in metrics:
        print(f"{'case':<24}{'dice':>8}{'jaccard':>9}{'hd95':>8}{'asd':>8}")
        for name, values in rows:
            print(f"{name:<24}{_metric_columns(values)}")
    else:
        print(f"{'case':<24}{'class':<16}{'dice':>8}{'jaccard':>9}{'hd95':>8}{'asd':>8}")
        for name, values in rows:
            for class_name, class_values in [*values.get("classes", {}).items(), ("mean", values)]:
                print(f"{name:<24}{class_name[:15]:<16}{_metric_columns(class_values)}")
    print(f"{label}: {folder}")
