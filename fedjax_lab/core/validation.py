"""Argument checks shared by every factory: one-line errors naming the argument and the value."""

import numpy as np


def check_positive_int(name: str, value) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= 1 (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
