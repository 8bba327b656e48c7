"""Cost of the paths where fitcustom cannot call a graph traced for the
batch's static shape, against built-in fit() on the same work.

fitcustom's step calls a concrete function traced for each batch shape
(the fast path). Three inputs take another path:

- `two_replicas`: under `MirroredStrategy` a batch is a per-replica value,
  which goes through the `tf.function` itself (argument binding and cache
  lookup every call), as built-in fit() does;
- `two_replicas_spe10`: `steps_per_execution=10` on two replicas, where
  Keras 3.15's multi-step loop fails; fitcustom runs the call's steps one
  by one (compared with built-in fit() at one step per call, the only
  built-in setting that runs);
- `generator`: a Python generator of batches, which Keras wraps in a
  `tf.data` pipeline fed through `tf.py_function`.

Method (as the main benchmark): the same model, initial weights and data
for both; warm-up (tracing) apart; interleaved rounds whose order
alternates; per-round paired ratios, median and min-max; built-in fit()
timed twice per round for the noise band.

Usage: python -m benchmarks.general_paths [--rounds 7] [--steps 60]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 64


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.general_paths",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds")
    parser.add_argument(
        "--steps", type=int, default=60, help="training steps per timed run"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 10:
        parser.error("--rounds must be >= 2 and --steps >= 10")
    return args


def _graph():
    """Two named inputs, two named outputs (the main benchmark's
    multi_io shape, smaller)."""
    import keras

    image = keras.Input((8, 8, 1), name="image")
    means = keras.Input((8,), name="means")
    h = keras.layers.Flatten()(image)
    h = keras.layers.Concatenate()([h, means])
    h = keras.layers.Dense(128, activation="relu")(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    digit = keras.layers.Dense(10, name="digit")(h)
    parity = keras.layers.Dense(1, name="parity")(h)
    return {"image": image, "means": means}, {"digit": digit, "parity": parity}


def _data(steps):
    import numpy as np

    from fitcustom.datasets import load_digits

    (x, y), _ = load_digits()
    n = steps * BATCH
    reps = -(-n // len(x))
    x = np.concatenate([x] * reps)[:n]
    y = np.concatenate([y] * reps)[:n]
    inputs = {"image": x, "means": x.mean(axis=2)[..., 0]}
    targets = {"digit": y, "parity": (y % 2).astype("float32")[:, None]}
    return inputs, targets


def _build(cls, strategy, spe):
    import contextlib

    import keras

    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(0)
        model = cls(*_graph())
        model.compile(
            optimizer="adam",
            loss={
                "digit": keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                "parity": keras.losses.BinaryCrossentropy(from_logits=True),
            },
            loss_weights={"digit": 1.0, "parity": 0.5},
            steps_per_execution=spe,
        )
    return model


def _fit_kwargs(case, inputs, targets):
    if case != "generator":
        return dict(x=inputs, y=targets, batch_size=BATCH, shuffle=False)
    n = len(targets["digit"])

    def batches():
        for start in range(0, n, BATCH):
            end = start + BATCH
            yield (
                {k: v[start:end] for k, v in inputs.items()},
                {k: v[start:end] for k, v in targets.items()},
            )

    return dict(x=batches())


def _timed_fit(model, case, inputs, targets):
    kwargs = _fit_kwargs(case, inputs, targets)
    start = time.perf_counter()
    model.fit(epochs=1, verbose=0, **kwargs)
    return (time.perf_counter() - start) / (len(targets["digit"]) // BATCH)


CASES = ("two_replicas", "two_replicas_spe10", "generator")


def measure(case, rounds, steps):
    """Per-round seconds per step of built-in fit() (twice) and
    fitcustom's fit() on `case`."""
    import keras

    import fitcustom

    strategy = fitcustom.testing.two_replicas() if "replicas" in case else None
    spe = 10 if case.endswith("spe10") else 1
    inputs, targets = _data(steps)
    models = {
        "builtin_fit": _build(keras.Model, strategy, 1),
        "builtin_fit_repeat": _build(keras.Model, strategy, 1),
        "fitcustom_fit": _build(fitcustom.TapeModel, strategy, spe),
    }
    warm_inputs, warm_targets = _data(12)
    for model in models.values():  # tracing, apart from the timed runs
        _timed_fit(model, case, warm_inputs, warm_targets)
    times = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_timed_fit(models[name], case, inputs, targets))
    return times


def main(argv=None):
    args = parse_args(argv)
    import fitcustom.testing

    fitcustom.testing.split_cpu(2)
    from benchmarks import stats

    print(
        f"{args.rounds} rounds of {args.steps} steps, batch {BATCH}; "
        "ratio = fitcustom fit() / built-in fit(), time per step"
    )
    results = {}
    for case in CASES:
        times = measure(case, args.rounds, args.steps)
        ratio = stats.paired_ratio(times["fitcustom_fit"], times["builtin_fit"])
        noise = stats.noise_band(
            times["builtin_fit"], times["builtin_fit_repeat"]
        )
        ms = 1e3 * stats.median(times["fitcustom_fit"])
        results[case] = dict(ratio=ratio, noise=noise)
        print(
            f"  {case:20s} {ratio['median']:.3f} "
            f"[{ratio['min']:.3f}-{ratio['max']:.3f}]  noise ±{noise:.3f}  "
            f"fitcustom {ms:.2f} ms/step"
        )
    return results


if __name__ == "__main__":
    main()
