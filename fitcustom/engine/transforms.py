"""Gradient transforms: small composable steps between `tape.gradient` and
`optimizer.apply_gradients`.

A transform maps a list of gradients (aligned with a list of variables) to a
new list. `TapeModel.compile(gradient_transforms=[...])` runs them in order on
*unscaled* gradients (the mixed-precision loss scale is taken out before and
put back after), so a transform never has to know about loss scaling.

Transforms that need a global quantity (a norm) compute it over the gradients
summed across replicas, so that one and several replicas take the same step.
This is where they differ from the optimizer's own `clipnorm` /
`global_clipnorm`, which Keras applies to each replica's gradients before the
all-reduce.

May import: the ground floor and `_keras`.
"""

import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from fitcustom import _args
from fitcustom import distribute
from fitcustom._keras import compat as _compat


class GradientTransform:
    """Base class of gradient transforms.

    Subclasses implement `__call__(grads, variables, model)` and
    `get_config()`; register them with
    `keras.saving.register_keras_serializable` so that a compiled model saves
    and loads with its transforms.

    Example:

    ```python
    import keras
    import fitcustom

    @keras.saving.register_keras_serializable(package="my_project")
    class Negate(fitcustom.GradientTransform):
        def __call__(self, grads, variables, model=None):
            return [None if g is None else -g for g in grads]
    ```
    """

    def __call__(
        self,
        grads: list[tf.Tensor | None],
        variables: Sequence[keras.Variable],
        model: keras.Model | None = None,
    ) -> list[tf.Tensor | None]:
        """Returns the transformed gradients.

        Args:
            grads: List of gradient tensors (or `None`), one per variable.
            variables: List of the variables the gradients belong to.
            model: The model being trained, for transforms that look up
                layers. May be `None`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement "
            "__call__(grads, variables, model=None)."
        )

    def check_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Warns where this transform cannot do what it says with
        `optimizer` (called by `compile()` for each optimizer the model
        trains with). Does nothing by default.

        Args:
            optimizer: A `keras.optimizers.Optimizer` (the inner one of a
                `LossScaleOptimizer`).
        """

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="fitcustom")
class ClipByGlobalNorm(GradientTransform):
    """Rescales the gradients so that their global norm is at most `max_norm`.

    The norm is the one of the gradient summed over replicas (the gradient
    the optimizer applies), so 1 and N replicas clip alike.

    Args:
        max_norm: Positive float, the largest allowed global L2 norm.

    Example:

    ```python
    import keras
    import fitcustom

    inputs = keras.Input((4,))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(
        optimizer="sgd",
        loss="mse",
        gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
    )
    ```
    """

    def __init__(self, max_norm):
        self.max_norm = _args.number("max_norm", max_norm, low=0, low_open=True)

    def __call__(self, grads, variables, model=None):
        norm = distribute.global_norm(grads)
        max_norm = tf.constant(self.max_norm, tf.float32)
        factor = max_norm / tf.maximum(norm, max_norm)
        return [
            None if g is None else g * tf.cast(factor, g.dtype) for g in grads
        ]

    def get_config(self):
        return {"max_norm": self.max_norm}


@keras.saving.register_keras_serializable(package="fitcustom")
class ScaleByLayer(GradientTransform):
    """Multiplies the gradients of chosen layers by a factor (0 freezes).

    Args:
        scales: Dict mapping a layer name (as in `model.get_layer(name)`,
            nested sub-models included) to a non-negative float. The
            gradients of every trainable variable of that layer are
            multiplied by the factor; other gradients pass unchanged.

    Example:

    ```python
    import keras
    import fitcustom

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="backbone")(inputs)
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(hidden))
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        gradient_transforms=[fitcustom.ScaleByLayer({"backbone": 0.1})],
    )
    ```
    """

    def __init__(self, scales):
        if not isinstance(scales, dict) or not scales:
            raise ValueError(
                "`scales` must be a non-empty dict mapping layer names to "
                f"factors. Received: scales={scales!r}."
            )
        for name, factor in scales.items():
            if not isinstance(name, str):
                raise ValueError(
                    "Every key of `scales` must be a layer name (str). "
                    f"Received: key {name!r} of type {type(name).__name__}."
                )
            _args.number(f"scales[{name!r}]", factor, low=0)
        self.scales = {k: float(v) for k, v in scales.items()}

    def check_optimizer(self, optimizer):
        """Warns where scaling cannot work: an optimizer that normalises
        gradient magnitudes (any but SGD) undoes a factor other than 0
        and 1, and weight decay still shrinks weights frozen with 0."""
        partial = sorted(
            k for k, f in self.scales.items() if f not in (0.0, 1.0)
        )
        if partial and not isinstance(optimizer, keras.optimizers.SGD):
            warnings.warn(
                f"ScaleByLayer scales the gradients of {partial}, but "
                f"{type(optimizer).__name__} normalises gradient magnitudes, "
                "so their updates hardly change (Adam: a 0.1 factor changes "
                "the first epoch's update by ~0.2%). Use "
                "optimizer=keras.optimizers.SGD(...) for a scaled step, or "
                "freeze the layers with a factor of 0.",
                stacklevel=4,
            )
        frozen = sorted(k for k, f in self.scales.items() if f == 0.0)
        if frozen and getattr(optimizer, "weight_decay", None):
            warnings.warn(
                f"ScaleByLayer freezes the gradients of {frozen}, but the "
                f"optimizer's weight_decay={optimizer.weight_decay} still "
                "shrinks their weights. Set layer.trainable = False to "
                "exclude them from the optimizer entirely.",
                stacklevel=4,
            )

    def _factors(self, variables, model):
        if model is None:
            raise ValueError(
                "ScaleByLayer needs the model to find layers by name; it is "
                "called by TapeModel with the model. Received: model=None."
            )
        by_id = {}
        for name, factor in self.scales.items():
            layer = _find_layer(model, name)
            for v in layer.trainable_variables:
                by_id[id(v)] = factor
        return [by_id.get(id(v), 1.0) for v in variables]

    def __call__(self, grads, variables, model=None):
        factors = self._factors(variables, model)
        out = []
        for g, factor in zip(grads, factors):
            if g is None or factor == 1.0:
                out.append(g)
            elif factor == 0.0:
                out.append(tf.zeros_like(g))
            else:
                out.append(g * tf.cast(factor, g.dtype))
        return out

    def get_config(self):
        return {"scales": dict(self.scales)}


def _find_layer(model, name):
    layers = _compat.sublayers(model)
    for layer in layers:
        if layer.name == name:
            return layer
    names = sorted(layer.name for layer in layers)
    raise ValueError(
        f"ScaleByLayer: the model has no layer named {name!r}. "
        f"Available layers: {names}."
    )


def apply_transforms(transforms, grads, variables, model=None):
    """Runs `transforms` in order; returns the final gradients."""
    for transform in transforms:
        grads = list(transform(grads, variables, model))
        if len(grads) != len(variables):
            raise ValueError(
                f"{transform!r} returned {len(grads)} gradients for "
                f"{len(variables)} variables. A gradient transform must "
                "return one gradient (or None) per variable."
            )
    return grads


def validate_transforms(transforms):
    """Checks a `gradient_transforms=` argument; returns a tuple."""
    if transforms is None:
        return ()
    if isinstance(transforms, GradientTransform):
        transforms = [transforms]
    if not isinstance(transforms, (list, tuple)):
        raise ValueError(
            "`gradient_transforms` must be a list of GradientTransform "
            f"objects. Received: gradient_transforms={transforms!r}."
        )
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise ValueError(
                "Every item of `gradient_transforms` must be a "
                "fitcustom.GradientTransform (e.g. "
                "fitcustom.ClipByGlobalNorm(1.0)). "
                f"Received: {t!r} of type {type(t).__name__}."
            )
    return tuple(transforms)
