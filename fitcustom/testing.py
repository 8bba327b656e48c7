"""Checks for your own training step: does it train on two replicas what
it trains on one device, and under mixed precision what it trains in
float32?

A custom step can be right on one device and wrong on several (a loss
divided by the replica count twice, or not at all), or right in float32
and wrong under `mixed_float16` (a loss that skips the loss scale). These
helpers train the model you give them both ways, from the same initial
weights on the same data, and report how far weights and logs are apart.

Two replicas need two devices. On a machine with one CPU, call
`split_cpu()` at the start of the program, before TensorFlow runs
anything; it makes two logical CPUs of the first one.

```python
import fitcustom.testing

fitcustom.testing.split_cpu()  # first, before any TensorFlow op

import keras
import numpy as np
import fitcustom

def make_model():
    inputs = keras.Input((4,))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    return model

x = np.random.rand(32, 4).astype("float32")
y = np.random.rand(32, 2).astype("float32")
report = fitcustom.testing.check_replicas(make_model, x, y, batch_size=8)
print(report)
report.assert_ok()
```

May import: nothing of fitcustom's (it checks the models it is given).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf


def split_cpu(count: int = 2):
    """Makes `count` logical CPU devices of the first CPU.

    Must run before TensorFlow initialises its devices (before any op).

    Raises:
        RuntimeError: TensorFlow's devices are already initialised and
            there are fewer than `count` CPUs.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) >= count:
            return
        raise RuntimeError(
            f"split_cpu({count}) must run before TensorFlow runs any "
            "operation (its devices are then fixed). Call it at the very "
            "start of the program."
        ) from e


@dataclasses.dataclass
class Report:
    """How far two trainings of the same model are apart.

    Attributes:
        what: What was compared, e.g. "1 device vs 2 replicas".
        weight_diff: Largest absolute difference between the weights.
        log_diffs: Largest relative difference of each logged value.
        weight_tolerance: The largest `weight_diff` accepted.
        log_tolerance: The largest relative log difference accepted.
        weight_change: How far the first run moved its weights from the
            initial ones (largest absolute change), or `None` where not
            measured: agreement of two runs that hardly trained says
            little.
    """

    what: str
    weight_diff: float
    log_diffs: dict
    weight_tolerance: float
    log_tolerance: float
    weight_change: float | None = None
    details: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether weights and every log agree within the tolerances."""
        return self.weight_diff <= self.weight_tolerance and all(
            d <= self.log_tolerance for d in self.log_diffs.values()
        )

    def __str__(self):
        lines = [
            f"{self.what}: {'agree' if self.ok else 'DISAGREE'}",
            f"  weights: max abs diff {self.weight_diff:.3g} "
            f"(tolerance {self.weight_tolerance:g})",
        ]
        if self.weight_change is not None:
            lines.append(
                f"  weights moved by up to {self.weight_change:.3g} in training"
            )
        for name, diff in sorted(self.log_diffs.items()):
            flag = "" if diff <= self.log_tolerance else "  <-- differs"
            lines.append(f"  {name}: max rel diff {diff:.3g}{flag}")
        lines.extend(f"  {line}" for line in self.details)
        return "\n".join(lines)

    def assert_ok(self):
        """Raises `AssertionError` (with the report) unless `ok`."""
        if not self.ok:
            raise AssertionError(str(self))


def _train(make_model, strategy, initial, x, y, fit_kwargs):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = make_model()
        if initial is not None:
            model.set_weights(initial)
    kwargs = dict(epochs=1, shuffle=False, verbose=0)
    kwargs.update(fit_kwargs)
    history = model.fit(x, y, **kwargs).history
    return model, history


def _log_diffs(a, b):
    if sorted(a) != sorted(b):
        raise AssertionError(
            f"The two runs log different values: {sorted(a)} vs {sorted(b)}."
        )
    diffs = {}
    for name in a:
        u = np.asarray(a[name], np.float64)
        v = np.asarray(b[name], np.float64)
        scale = np.maximum(np.abs(u), 1e-12)
        diffs[name] = float(np.max(np.abs(u - v) / scale))
    return diffs


def _weight_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v))))
        for u, v in zip(a, b, strict=True)
    )


_two_replicas = None


def two_replicas():
    """A `MirroredStrategy` over the first two devices (GPUs, else CPUs),
    made once per process: several instances in one process can abort
    each other's all-reduces."""
    global _two_replicas
    if _two_replicas is None:
        devices = tf.config.list_logical_devices("GPU") or (
            tf.config.list_logical_devices("CPU")
        )
        if len(devices) < 2:
            raise RuntimeError(
                "Two replicas need two devices; TensorFlow sees "
                f"{len(devices)}. Call fitcustom.testing.split_cpu() at "
                "the start of the program, before TensorFlow runs anything."
            )
        _two_replicas = tf.distribute.MirroredStrategy(
            [d.name for d in devices[:2]]
        )
    return _two_replicas


def check_replicas(
    make_model,
    x,
    y=None,
    *,
    strategy=None,
    weight_tolerance=1e-5,
    log_tolerance=1e-5,
    **fit_kwargs,
) -> Report:
    """Trains on one device and on two replicas; compares the results.

    Both runs start from the same weights (the first run's initial ones)
    and train on the same data with the same arguments, one epoch unless
    `epochs` says otherwise. On two replicas each step's batch is split
    in two, so a step that reduces and scales its loss right gives the
    same update (up to float rounding). BatchNormalization in training
    mode normalises each replica's part of the batch (in built-in `fit()`
    too), so a model with it differs by design: compare with
    `BatchNormalization(synchronized=True)`.

    Args:
        make_model: A function that builds and compiles the model (called
            under each run's distribution strategy).
        x, y: Training data, as for `fit()`.
        strategy: The two-replica strategy. Defaults to `two_replicas()`.
        weight_tolerance: Largest accepted absolute weight difference.
            Defaults to 1e-5.
        log_tolerance: Largest accepted relative difference of a logged
            value. Defaults to 1e-5.
        **fit_kwargs: Passed to `fit()` (`batch_size`, `epochs`, ...).

    Returns:
        A `Report`; `report.assert_ok()` raises when they disagree.

    Raises:
        RuntimeError: Fewer than two devices (see `split_cpu`).
    """
    strategy = strategy or two_replicas()
    one_device = tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with one_device.scope():
        initial = make_model().get_weights()
    one, h_one = _train(make_model, one_device, initial, x, y, fit_kwargs)
    two, h_two = _train(make_model, strategy, initial, x, y, fit_kwargs)
    return Report(
        "1 device vs 2 replicas",
        _weight_diff(one.get_weights(), two.get_weights()),
        _log_diffs(h_one, h_two),
        weight_tolerance,
        log_tolerance,
        weight_change=_weight_diff(initial, one.get_weights()),
    )


def _optimizers(model):
    own = getattr(model, "_training_optimizers", None)
    if own is not None:
        return list(own())
    return [] if model.optimizer is None else [model.optimizer]


def _applied(optimizers):
    """Each optimizer's applied updates (a loss-scale optimizer's inner
    step count, which a skipped overflowing step leaves alone)."""
    return [int(o.iterations.numpy()) for o in optimizers]


def check_mixed_precision(
    make_model, x, y=None, *, tolerance=0.05, **fit_kwargs
) -> Report:
    """Trains in float32 and under `mixed_float16`; compares the results.

    Float16 arithmetic rounds, so weights and logs cannot agree exactly;
    what a wrong step gets wrong is the size of the update (a loss that
    skips the loss scale moves the weights about 32768 times less). The
    report holds the relative difference of the update sizes (the norm of
    the weight change) and of each logged value, against `tolerance`.

    A loss-scale optimizer skips the steps whose gradients overflow while
    its scale comes down from 32768: that is normal, but a short run would
    then compare fewer updates with float32's. So the mixed-precision run
    is trained twice from the same weights: first to let every optimizer's
    loss scale settle, then from the settled scales, which is the run that
    is compared. The report lists each optimizer's applied updates in
    both runs (`details`).

    Args:
        make_model: A function that builds and compiles the model (called
            under each dtype policy; it must create new layers on each
            call, as a layer takes the policy current at its creation).
        x, y: Training data, as for `fit()`.
        tolerance: Largest accepted relative difference. Defaults to 0.05.
        **fit_kwargs: Passed to `fit()`.

    Returns:
        A `Report` (its `weight_diff` is the update sizes' relative
        difference).
    """
    previous = keras.config.dtype_policy()
    strategy = tf.distribute.get_strategy()
    scaled = keras.optimizers.LossScaleOptimizer
    try:
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(0)
        initial = make_model().get_weights()
        model, h32 = _train(make_model, strategy, initial, x, y, fit_kwargs)
        size32 = _update_size(model, initial)
        applied32 = _applied(_optimizers(model))
        keras.config.set_dtype_policy("mixed_float16")
        warm, _ = _train(make_model, strategy, initial, x, y, fit_kwargs)
        settled = [
            float(o.dynamic_scale.numpy()) if isinstance(o, scaled) else None
            for o in _optimizers(warm)
        ]
        warm_applied = _applied(_optimizers(warm))

        def from_settled_scales():
            model = make_model()
            for optimizer, scale in zip(_optimizers(model), settled):
                if scale is None:
                    continue
                if optimizer.built:
                    optimizer.dynamic_scale.assign(scale)
                else:
                    optimizer.initial_scale = scale
            return model

        model, h16 = _train(
            from_settled_scales, strategy, initial, x, y, fit_kwargs
        )
        size16 = _update_size(model, initial)
        applied16 = _applied(_optimizers(model))
    finally:
        keras.config.set_dtype_policy(previous)
    return Report(
        "float32 vs mixed_float16 (update size)",
        float(abs(size16 - size32) / max(size32, 1e-12)),
        _log_diffs(h32, h16),
        tolerance,
        tolerance,
        details=[
            f"applied updates per optimizer: float32 {applied32}, "
            f"mixed_float16 {applied16} (from the settled loss scales "
            f"{settled}; the run that settled them applied {warm_applied})"
        ],
    )


def _update_size(model, initial):
    return float(
        np.sqrt(
            sum(
                np.sum((np.asarray(w, np.float64) - w0) ** 2)
                for w, w0 in zip(model.get_weights(), initial)
            )
        )
    )
