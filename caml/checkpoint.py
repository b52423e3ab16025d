"""Atomic checkpoints and random-number-generator states.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then moved over the
target with ``os.replace``: a reader (or a run killed mid-write) sees the old file or the new one,
never a torn one. The temporary of a writer killed mid-write (``.tmp-<name>-*.pt``) is removed by the
next writer of that path, or at the start of a run (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import glob
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from .cli import one_line

__all__ = ["save_atomic", "load_checkpoint", "remove_stale_temporaries", "rng_state", "set_rng_state"]


def _temporary_prefix(path: str) -> str:
    return f".tmp-{os.path.basename(path)}-"


def remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries that killed writers of ``path`` left (one writer per path at a time)."""
    folder = os.path.dirname(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(_temporary_prefix(path)) + "*.pt")):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by :func:`save_atomic` (tensors, containers and plain values only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {path}: {one_line(err, 200)}") from err


def rng_state() -> dict:
    """States of torch (CPU and every CUDA device), Python's ``random`` and numpy's global generator."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
