"""Argument checks shared by the reference models: bad input is a ValueError naming the argument.

The scalar checks are the estimators' own (one definition for the distribution); this module adds the
check of parameter tensors."""
from __future__ import annotations

import torch
from torch import Tensor

from estimators._validate import positive_int, real_number

__all__ = ["positive_int", "real_number", "real_tensor"]


def real_tensor(name: str, value, dtype: torch.dtype, device, *, finite: bool = True) -> Tensor:
    """``value`` (a number, nested sequence or tensor of real numbers) as a tensor of the floating ``dtype`` on
    ``device``; NaN is rejected always, ±inf unless ``finite`` is False."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    not_real = isinstance(value, Tensor) and (value.is_complex() or value.dtype == torch.bool)
    if isinstance(value, (str, bytes)) or not_real:
        raise ValueError(f"{name} must hold real numbers, got {value!r:.80}")
    try:
        t = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must hold real numbers, got {value!r:.80} ({err})") from err
    if bool(torch.isnan(t).any()) or (finite and not bool(torch.isfinite(t).all())):
        raise ValueError(f"{name} must be {'finite' if finite else 'free of NaN'}")
    return t
