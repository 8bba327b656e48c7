"""The checks of an update's loss terms (used by `minimize` and
`log_mean`): each term's batch size against the step's batch and the
other terms (`SizeChecks`), `loss_weights` against the terms' names, and
one value per sample (`per_sample`).

May import: the ground floor.
"""

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from fitcustom import _args
from fitcustom import checks

_PART_OF_THE_BATCH = (
    " If the update is of a part of the batch or of samples of its own "
    "(a discriminator updated on each of n slices, generated images), "
    "pass minimize(..., batch_size=N)."
)


class SizeChecks:
    """The batch sizes of an update's terms: each term's first axis is
    the first axis of one of the batch's tensors (or `batch_size`), and
    all terms and `sample_weight` agree. Sizes a trace knows are checked
    at once (a `ValueError`); the others by `checks.step_check` ops in
    `checks`, which what reduces the terms depends on."""

    def __init__(self, context, batch_size):
        self.checks = []
        self._first = None  # (label, term)
        self._given = batch_size is not None
        if self._given:
            static = tf.get_static_value(batch_size)
            if static is not None and (
                np.ndim(static) or isinstance(static, bool) or static < 1
            ):
                raise ValueError(
                    "`batch_size` is the number of samples the terms "
                    f"are of. Received: batch_size={batch_size!r}. "
                    "Expected a positive integer (or a scalar tensor)."
                )
            static = None if static is None else int(static)
            self._batch = [(static, tf.cast(batch_size, tf.int32))]
        elif context is not None and context._data is not None:
            self._batch = [
                first_axis(t)
                for t in tf.nest.flatten(context._data)
                if isinstance(t, tf.Tensor) and t.shape.rank
            ]
        else:
            self._batch = []  # outside a step: nothing to compare with

    def term(self, label, term):
        label = label.replace("{", "{{").replace("}", "}}")
        if self._first is not None:
            self._same(
                first_axis(term),
                first_axis(self._first[1]),
                f"Every loss term of an update needs the same batch size "
                f"(its first axis). Received: {label!r} with {{received}} "
                f"values and {self._first[0]!r} with {{expected}}.",
            )
            return
        self._first = (label, term)
        if not self._batch:
            return
        if self._given:
            template = (
                f"Loss term {label!r} has {{received}} values on its first "
                "axis, but the update's batch_size is {expected}. "
                "Expected: one value per sample of the update's batch."
            )
        else:
            template = (
                f"Loss term {label!r} has {{received}} values on its first "
                "axis, which is no size of the step's batch (its first "
                "axis: {expected} samples). Received: a term without the "
                "batch axis (reduced over the batch, or of other "
                "samples). Expected: one value per sample, the batch "
                "first, e.g. keras.losses.MeanSquaredError(reduction="
                "None)(y, y_pred)." + _PART_OF_THE_BATCH
            )
        static, size = first_axis(term)
        known = [s for s, _ in self._batch if s is not None]
        if static is not None and static in known:
            return
        if static is not None and len(known) == len(self._batch):
            raise ValueError(
                template.format(received=static, expected=known[0])
            )
        found = tf.reduce_any(
            tf.equal(tf.stack([d for _, d in self._batch]), size)
        )
        self._add(found, template, size, self._batch[0][1])

    def sample_weight(self, weights):
        self._same(
            first_axis(weights),
            first_axis(self._first[1]),
            "`sample_weight` needs one weight per sample of the terms. "
            "Received: {received} weights for terms of {expected} "
            f"values (the first: {self._first[0]!r}).",
        )

    def _same(self, received, expected, template):
        (r_static, r), (e_static, e) = received, expected
        if r_static is not None and e_static is not None:
            if r_static != e_static:
                raise ValueError(
                    template.format(received=r_static, expected=e_static)
                )
            return
        self._add(tf.equal(r, e), template, r, e)

    def _add(self, condition, template, received, expected):
        self.checks.append(
            checks.step_check(condition, template, received, expected)
        )


def first_axis(t):
    """A tensor's first axis: `(static size or None, size tensor)`."""
    return t.shape[0], tf.shape(t, out_type=tf.int32)[0]


def checked_loss_weights(loss_weights, terms):
    """`loss_weights` checked against the named terms: `{name: float}`."""
    if loss_weights is None:
        return {}
    if not isinstance(loss_weights, Mapping):
        raise ValueError(
            "`loss_weights` maps names of terms to factors, e.g. "
            "{'gradient_penalty': 10.0}. Received: "
            f"{type(loss_weights).__name__} {loss_weights!r}."
        )
    named = sorted(k for k in terms if isinstance(k, str))
    factors = {}
    for name, factor in loss_weights.items():
        if name not in named:
            raise ValueError(
                f"`loss_weights` names a term the update does not have: "
                f"{name!r}. Received terms: {named or 'one unnamed loss'}. "
                "Expected the names of the terms dict."
            )
        factors[name] = _args.number(f"loss_weights[{name!r}]", factor)
    return factors


def per_sample(values):
    """One value per sample: further axes averaged."""
    if values.shape.rank and values.shape.rank > 1:
        return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values
