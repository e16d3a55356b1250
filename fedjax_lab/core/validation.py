"""Argument checks shared by every factory: one-line errors naming the argument and the value.

A sweep builds its algorithms inside a jitted (and vmapped) function with every sweepable
hyperparameter a 0-d array, traced there (and concrete where a state is initialised eagerly),
after its config has checked each grid point; the checks of a number here pass a tracer, and
`is_zero` lets a factory drop a term that a concrete 0 turns off while a traced value keeps it.
"""

from typing import Callable

import jax
import numpy as np


def check_positive_int(name: str, value) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= 1 (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")


def is_traced(value) -> bool:
    """Whether `value` is a tracer: a hyperparameter swept inside a jitted or vmapped function."""
    return isinstance(value, jax.core.Tracer)


def is_zero(value) -> bool:
    """Whether `value` is a concrete 0 (a term it weights can be left out); a tracer never is."""
    return not is_traced(value) and bool(value == 0)


def is_scalar(value) -> bool:
    """Whether `value` is one number: a Python or NumPy int or float (not a bool), or a 0-d array,
    traced or not."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return value.ndim == 0 and not np.issubdtype(value.dtype, np.bool_)
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def check_number(name: str, value, expected: str, accept: Callable[..., bool]) -> None:
    """Raises a ValueError naming `name` unless `accept(value)`; a traced value passes."""
    if not is_traced(value) and not accept(value):
        raise ValueError(f"{name}={value!r} is invalid; expected {expected}")
