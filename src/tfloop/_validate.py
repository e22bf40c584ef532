"""Argument checks shared by every layer, and the pieces of their error messages.

Every check runs on the host before anything is traced and raises
:class:`tfloop.errors.ConfigError` naming the argument (and its owner, for a component such as
``EarlyStopping``) and what it must be.

Examples:
    >>> count(3, "epochs", minimum=1)
    3
    >>> try:
    ...     count(0, "patience", minimum=1, owner="EarlyStopping")
    ... except ValueError as error:
    ...     print(error)
    EarlyStopping: patience must be an int >= 1, got 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tfloop.errors import ConfigError

__all__ = [
    "boolean",
    "count",
    "describe_tensors",
    "first_line",
    "number",
    "optional_count",
    "optional_number",
]


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def count(
    value: Any, name: str, minimum: int = 0, *, owner: str | None = None, hint: str = ""
) -> int:
    """``value`` as an int >= ``minimum`` (NumPy integers accepted), or a ConfigError."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(
            f"{_prefix(owner)}{name} must be an int >= {minimum}, got {value!r}.{hint}"
        )
    return int(value)


def optional_count(
    value: Any, name: str, minimum: int = 1, *, owner: str | None = None
) -> int | None:
    """``None``, or ``value`` as an int >= ``minimum``."""
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise ConfigError(
            f"{_prefix(owner)}{name} must be an int >= {minimum} or None, got {value!r}."
        )
    return int(value)


def number(
    value: Any,
    name: str,
    minimum: float = 0.0,
    *,
    owner: str | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite float >= ``minimum`` (> 0 with ``positive``), or a ConfigError.

    Infinity is refused: a limit of ``inf`` is never what a user means, and several of them
    (a gradient-norm clip) turn into NaN in the maths.
    """
    ok = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
        and value >= minimum
        and (value > 0 or not positive)
    )
    if not ok:
        what = "a positive finite number" if positive else f"a finite number >= {minimum}"
        raise ConfigError(f"{_prefix(owner)}{name} must be {what}, got {value!r}.")
    return float(value)


def optional_number(
    value: Any, name: str, *, owner: str | None = None, positive: bool = True
) -> float | None:
    """``None``, or ``value`` as a positive finite float."""
    if value is None:
        return None
    ok = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        what = "a positive finite number" if positive else "a finite number >= 0"
        raise ConfigError(f"{_prefix(owner)}{name} must be {what} or None, got {value!r}.")
    return float(value)


def boolean(value: Any, name: str, *, owner: str | None = None) -> bool:
    """``value`` if it is a bool (NumPy's included); anything else is a ConfigError.

    Truthiness is not enough: ``shuffle="batch"`` or ``verbose="x"`` would silently mean True.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{_prefix(owner)}{name} must be True or False, got {value!r}.")


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type name if it has none), for messages.

    Examples:
        >>> first_line(ValueError("bad shape\\nin a long trace"))
        'bad shape'
    """
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def describe_tensors(value: Any) -> str:
    """``"of shape/dtype (4, 2) float32, ..."`` for a nest of tensors (``"(none)"`` for None).

    Examples:
        >>> describe_tensors(np.zeros((4, 2), "float32"))
        'of shape/dtype (4, 2) float32'
    """
    import tensorflow as tf

    if value is None:
        return "(none)"
    parts = [f"{tuple(t.shape)} {tf.as_dtype(t.dtype).name}" for t in tf.nest.flatten(value)]
    return "of shape/dtype " + ", ".join(parts)
