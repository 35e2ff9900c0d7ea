"""Input checks shared by the estimators: bad input is a ValueError naming the argument."""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch
from torch import Tensor


def check_float_tensor(name: str, value) -> None:
    """``value`` must be a floating-point torch tensor."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")


def check_log_probs(log_p: Tensor, log_q: Tensor) -> None:
    """Check that ``log_p`` and ``log_q`` are finite, non-empty float tensors of one shape."""
    for name, value in (("log_p", log_p), ("log_q", log_q)):
        check_float_tensor(name, value)
        if value.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    if log_p.shape != log_q.shape:
        raise ValueError(f"log_p and log_q must have the same shape, got {tuple(log_p.shape)} and {tuple(log_q.shape)}")
    if log_p.dtype != log_q.dtype:
        raise ValueError(f"log_p and log_q must have the same dtype, got {log_p.dtype} and {log_q.dtype}")
    if log_p.device != log_q.device:
        raise ValueError(f"log_p and log_q must be on the same device, got {log_p.device} and {log_q.device}")
    for name, value in (("log_p", log_p), ("log_q", log_q)):
        check_finite(name, value)


def check_finite(name: str, value: Tensor, detail: str = "log-probabilities of samples must be finite") -> None:
    """Every element of ``value`` must be finite, else a ValueError naming ``name``, the count and ``detail``.

    A finite sum proves that every term is finite (NaN or ±inf in any term makes the sum non-finite), and
    a sum reads the tensor once without allocating, where ``isfinite`` writes a mask as large as the
    input. Only a non-finite sum (a bad element, or overflow of the sum itself) pays for the elementwise
    check, which then names the problem.
    """
    accumulate = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    if bool(torch.isfinite(value.sum(dtype=accumulate))):
        return
    bad = ~torch.isfinite(value)
    if bool(bad.any()):  # else only the sum overflowed
        kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite ({kind}) values; {detail}")


def check_shape(name: str, value, shape: torch.Size, device: torch.device) -> None:
    """``value`` must be a tensor of shape ``shape`` on ``device``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != shape or value.device != device:
        raise ValueError(f"{name} must have shape {tuple(shape)} on {device}, "
                         f"got {tuple(value.shape)} on {value.device}")


def binary_mask(name: str, value, shape: torch.Size, device: torch.device) -> Tensor:
    """``value != 0`` after checking its shape, device and values (bool, or only 0 and 1): a mask, or binary data."""
    check_shape(name, value, shape, device)
    if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got {value.dtype} with other values")
    return value != 0


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``: a Python or NumPy integer, or a one-element integer tensor; never a bool."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    boolean = isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    if number is None or boolean:
        raise ValueError(f"{name} must be an int, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def real_number(name: str, value) -> float:
    """``value`` as a finite float: a Python or NumPy real, or a one-element real tensor; never a bool or str."""
    if isinstance(value, Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number
