"""Input validation shared by the public ops: clear errors that name the argument."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def check_floating(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def check_rank(x: Tensor, name: str, ndim: int, form: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {form}, got shape {tuple(x.shape)}")


def check_same(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """All tensors on one device with one dtype."""
    first, first_name = tensors[0], names[0]
    for x, name in zip(tensors[1:], names[1:]):
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}; move them to one device")
        if x.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}; use one dtype")


# The smallest temperature the ops take: the smallest normal float32. Below it 1 / T overflows float32
# (the kernels' arithmetic for float32 inputs) and T itself rounds to a subnormal, where backends would
# each compute a different limit.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_temperature(value: float, name: str = "temperature", *, at_most: float = math.inf) -> float:
    """A finite temperature in [MIN_TEMPERATURE, at_most]: the one check every backend relies on."""
    if not _is_number(value) or not (MIN_TEMPERATURE <= value <= at_most and math.isfinite(value)):
        upper = "" if at_most == math.inf else f" and <= {at_most:g}"
        raise ValueError(
            f"{name} must be a finite number >= {MIN_TEMPERATURE:.6g} (the smallest normal float32){upper}, "
            f"got {value!r}"
        )
    return float(value)


def check_eps(value: float, name: str = "eps") -> float:
    if not _is_number(value) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: object, name: str) -> int:
    """Sizes of modules (channels, heads, widths): a Python int (not bool) > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be an int > 0, got {value!r} ({type(value).__name__})")
    return value


def check_positive_ints(**sizes: object) -> None:
    """:func:`check_positive_int` on each keyword, named by it."""
    for name, value in sizes.items():
        check_positive_int(value, name)


def check_dropout_p(value: float, name: str) -> float:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
