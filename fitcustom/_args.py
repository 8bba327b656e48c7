"""Argument checks shared by every public constructor and `compile()`.

Each check raises `ValueError` in one wording: what the argument must be,
then `Received: name=value.`, and returns the value in its plain Python
type (a NumPy integer becomes an `int`).

May import: nothing of fitcustom's (the ground floor).
"""

import numbers

import keras

__all__ = ["boolean", "whole", "number", "model", "integer"]


def _refuse(name, what, value, extra=""):
    raise ValueError(
        f"`{name}` must be {what}. Received: {name}={value!r}.{extra}"
    )


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def boolean(name, value):
    """`value` if it is `True` or `False`."""
    if not isinstance(value, bool):
        _refuse(name, "True or False", value)
    return value


def integer(name, value):
    """`value` as an `int` if it is a whole number (a seed, say)."""
    if not _is_integral(value):
        _refuse(name, "a whole number", value)
    return int(value)


def whole(name, value, minimum=1, *, none_ok=False, hint=""):
    """`value` as an `int` if it is a whole number >= `minimum`.

    `None` passes when `none_ok`. `hint` ends the message (what the
    argument is for, how to fix it).
    """
    if value is None and none_ok:
        return None
    if not _is_integral(value) or value < minimum:
        what = f"a whole number >= {minimum}"
        _refuse(name, what + (" or None" if none_ok else ""), value, hint)
    return int(value)


def number(
    name,
    value,
    *,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    none_ok=False,
    hint="",
):
    """`value` as a `float` if it is a number in the given range.

    `low` / `high` bound it (`None`: unbounded), inclusive unless
    `low_open` / `high_open`. NaN is refused. `None` passes when
    `none_ok`.
    """
    if value is None and none_ok:
        return None
    ok = _is_real(value) and value == value  # NaN != NaN
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"a number in {left}{low}, {high}{right}"
        elif low is not None:
            what = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            what = f"a number {'<' if high_open else '<='} {high}"
        else:
            what = "a number"
        _refuse(name, what + (" or None" if none_ok else ""), value, hint)
    return float(value)


def model(name, value, *, none_ok=False):
    """`value` if it is a Keras model or layer."""
    if value is None and none_ok:
        return None
    if not isinstance(value, keras.Layer):
        raise ValueError(
            f"`{name}` must be a keras.Model (or keras.Layer). Received: "
            f"{name}={value!r} of type {type(value).__name__}."
        )
    return value
