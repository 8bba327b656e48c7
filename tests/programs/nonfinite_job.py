"""Trains with a non-finite batch, with and without the guard.

    python tests/programs/nonfinite_job.py KIND

`KIND` is "engine" (a TapeModel) or "gan" (a TapeGAN). Trains three
epochs on data whose second batch is NaN, once with `skip_nonfinite=True`
and once without (with `TerminateOnNaN`), and prints one JSON line
`{"guard": ..., "no_guard": ...}` describing each run. Run by
`tests/test_nonfinite.py` with `TF_ENABLE_ONEDNN_OPTS` set to 0 or 1.
"""

import json
import sys

import keras
import numpy as np

import fitcustom


def run(guard, kind):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=64)
    x[16:32] = np.nan
    if kind == "gan":
        z = keras.Input((4,))
        generator = keras.Model(
            z,
            keras.layers.Dense(6)(keras.layers.Dense(8, activation="relu")(z)),
        )
        d_in = keras.Input((6,))
        discriminator = keras.Model(
            d_in,
            keras.layers.Dense(1)(
                keras.layers.Dense(8, activation="relu")(d_in)
            ),
        )
        model = fitcustom.TapeGAN(
            generator=generator, discriminator=discriminator, latent_dim=4
        )
        model.compile(skip_nonfinite=guard, check_inputs=False)
        y = None
        optimizer = model.d_optimizer
    else:
        inputs = keras.Input((6,))
        h = keras.layers.Dense(16, activation="relu")(inputs)
        model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(h))
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            skip_nonfinite=guard,
        )
        optimizer = model.optimizer
    initial = model.get_weights()
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    return {
        "finite": all(bool(np.isfinite(w).all()) for w in model.get_weights()),
        "initial": all(
            np.array_equal(a, b) for a, b in zip(initial, model.get_weights())
        ),
        "epochs": len(history["loss"]),
        "loss": [float(v) for v in history["loss"]],
        "skipped": history.get("nonfinite_steps"),
        "iterations": int(optimizer.iterations.numpy()),
    }


kind = sys.argv[1]
print(json.dumps({"guard": run(True, kind), "no_guard": run(False, kind)}))
