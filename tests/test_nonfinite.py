"""Non-finite batches with oneDNN on and off (it changes how NaN flows).

With oneDNN (TensorFlow's CPU default) a fused Dense+ReLU maps NaN inputs
to 0, so the loss can stay finite while the gradients carry NaN into the
weights (CONTRACT.md). The guard checks gradients as well as the loss, so
it must hold in both settings; without it, training must not go on
silently. Each setting runs in a fresh process, since the flag is read at
import.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np
    import fitcustom

    import sys

    def run(guard, kind):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 6)).astype("float32")
        y = rng.integers(0, 3, size=64)
        x[16:32] = np.nan
        if kind == "gan":
            z = keras.Input((4,))
            generator = keras.Model(z, keras.layers.Dense(6)(
                keras.layers.Dense(8, activation="relu")(z)))
            d_in = keras.Input((6,))
            discriminator = keras.Model(d_in, keras.layers.Dense(1)(
                keras.layers.Dense(8, activation="relu")(d_in)))
            model = fitcustom.TapeGAN(generator=generator,
                                      discriminator=discriminator,
                                      latent_dim=4)
            model.compile(skip_nonfinite=guard)
            y = None
            optimizer = model.d_optimizer
        else:
            inputs = keras.Input((6,))
            h = keras.layers.Dense(16, activation="relu")(inputs)
            model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(h))
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                skip_nonfinite=guard,
            )
            optimizer = model.optimizer
        history = model.fit(
            x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN()],
        ).history
        return {
            "finite": all(bool(np.isfinite(w).all())
                          for w in model.get_weights()),
            "epochs": len(history["loss"]),
            "loss": [float(v) for v in history["loss"]],
            "skipped": history.get("nonfinite_steps"),
            "iterations": int(optimizer.iterations.numpy()),
        }

    kind = sys.argv[1]
    print(json.dumps({"guard": run(True, kind),
                      "no_guard": run(False, kind)}))
    """
)


@pytest.mark.parametrize("kind", ["engine", "gan"])
@pytest.mark.parametrize("onednn", ["0", "1"], ids=["onednn_off", "onednn_on"])
def test_nonfinite_batch_with_and_without_guard(onednn, kind):
    env = dict(
        os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3"
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    guard, no_guard = result["guard"], result["no_guard"]
    # Guard on: every epoch runs, the poisoned batch is skipped each time,
    # the weights stay finite and the logged loss is finite.
    assert guard["finite"] and guard["epochs"] == 3
    assert guard["skipped"] == [1.0, 1.0, 1.0]
    assert guard["iterations"] == 9
    assert all(v == v for v in guard["loss"])
    # Guard off: training stops (TerminateOnNaN) instead of going on with
    # corrupted weights.
    assert not no_guard["finite"]
    assert no_guard["epochs"] == 1
