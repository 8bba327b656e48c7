"""Writes `tests/data/saved/`: one small trained `.keras` file of each task
class, with the data it was trained on and what the writing process saw
next (predictions, and the weights after one more epoch), so that
`tests/test_saved_files.py` can check that a file written by an earlier
fitcustom still loads, predicts and continues the same.

Run it only to add a class (the files are a record of an earlier version):
`python tests/programs/make_saved_models.py tests/data/saved`
"""

import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import small_models  # noqa: E402

import fitcustom  # noqa: E402


def distiller():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 3, size=96)
    inputs = keras.Input((6,))
    teacher = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.Dense(8)(inputs))
    )
    s_in = keras.Input((6,))
    student = keras.Model(s_in, keras.layers.Dense(3)(s_in))
    model = fitcustom.TapeDistiller(
        student=student, teacher=teacher, alpha=0.3, temperature=2.0
    )
    model.compile(optimizer="sgd")
    return model, x, y


def main(out):
    os.makedirs(out, exist_ok=True)
    builders = {
        "engine": lambda: small_models.build("engine"),
        "classifier": lambda: small_models.build("classifier", dropout=0.2),
        "gan": lambda: small_models.build("gan", n_critic=2),
        "distiller": distiller,
    }
    for name, build in builders.items():
        keras.utils.set_random_seed(0)
        model, x, y = build()
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        model.save(os.path.join(out, f"{name}.keras"))
        if name == "gan":
            seen = model.generate(8, seed=1)
        else:
            seen = model.predict(x, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        arrays = {"x": x, "seen": seen}
        if y is not None:
            arrays["y"] = y
        for i, w in enumerate(model.get_weights()):
            arrays[f"after_{i}"] = w
        np.savez(os.path.join(out, f"{name}.npz"), **arrays)
        print(name, type(model).__name__, fitcustom.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
