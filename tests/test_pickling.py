"""Functional fitcustom models pickle and deep-copy as Keras models do
(multiprocessing, joblib and Ray rely on it): the copy predicts the same,
carries the optimizer state, and trains on exactly as the original."""

import copy
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import assert_weights_close

import fitcustom


def _trained(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, "relu")(inputs))
    if kind == "classifier":
        model = fitcustom.TapeClassifier(inputs, outputs)
        model.compile(label_smoothing=0.1)
    else:
        model = fitcustom.TapeModel(inputs, outputs)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, x, y


@pytest.mark.parametrize("kind", ["engine", "classifier"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_predicts_and_trains_on_like_the_original(kind, how):
    model, x, y = _trained(kind)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = copy.deepcopy(model)
    assert type(twin).__name__ == type(model).__name__
    np.testing.assert_array_equal(
        twin.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    a = [v.numpy() for v in model.optimizer.variables]
    b = [v.numpy() for v in twin.optimizer.variables]
    assert len(a) == len(b) > 2
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    for m in (model, twin):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(model.get_weights(), twin.get_weights(), atol=1e-7)


def test_a_pickled_model_loads_in_a_process_that_never_imported_it(
    tmp_path,
):
    model, x, _ = _trained("classifier")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    np.save(tmp_path / "x.npy", x)
    code = (
        "import pickle, sys, numpy as np\n"
        "model = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "np.save(sys.argv[2], model.predict(np.load(sys.argv[3]), verbose=0))\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "model.pkl"),
            str(tmp_path / "out.npy"),
            str(tmp_path / "x.npy"),
        ],
        check=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), model.predict(x, verbose=0), atol=1e-6
    )
