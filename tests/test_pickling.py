"""fitcustom models pickle and deep-copy as Keras models do
(multiprocessing, joblib and Ray rely on it): functional, subclassed and
wrapped models and each task model; the copy predicts the same, carries
every optimizer's state, and trains on exactly as the original."""

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


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class Subclassed(fitcustom.TapeModel):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(units)

    def call(self, x, training=False):
        return self.head(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _trained(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, "relu")(inputs))
    if kind == "classifier":
        model = fitcustom.TapeClassifier(inputs, outputs)
        model.compile(label_smoothing=0.1)
    elif kind in ("subclassed", "wrapped"):
        if kind == "subclassed":
            model = Subclassed()
        else:
            network = keras.Sequential(
                [keras.Input((4,)), keras.layers.Dense(3)]
            )
            model = fitcustom.TapeModel(network=network)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
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


@pytest.mark.parametrize(
    "kind", ["engine", "classifier", "subclassed", "wrapped"]
)
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


def _optimizer_state(model):
    optimizers = [model.optimizer] + list(model.optimizers.values())
    return [v.numpy() for o in optimizers if o is not None for v in o.variables]


def _gan():
    from gan_builders import LATENT
    from gan_builders import make_discriminator
    from gan_builders import make_generator
    from gan_builders import real_images

    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        make_generator(), make_discriminator(), LATENT, ema_decay=0.9
    )
    gan.compile()
    return gan, real_images(32), None


def _distiller():
    import test_distiller

    x, y = test_distiller._data()
    return test_distiller.build(), x, y


@pytest.mark.parametrize("kind", ["gan", "distiller"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_of_a_task_model_carries_every_optimizer(kind, how):
    model, x, y = _gan() if kind == "gan" else _distiller()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    twin = (
        pickle.loads(pickle.dumps(model))
        if how == "pickle"
        else (copy.deepcopy(model))
    )
    assert type(twin) is type(model)
    if kind == "gan":
        np.testing.assert_array_equal(
            twin.generate(4, seed=1), model.generate(4, seed=1)
        )
    else:
        np.testing.assert_array_equal(
            twin.predict(x, verbose=0), model.predict(x, verbose=0)
        )
    a, b = _optimizer_state(model), _optimizer_state(twin)
    assert len(a) == len(b) >= 2  # the step counts at least
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
