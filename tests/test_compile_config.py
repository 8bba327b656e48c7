"""One compile-configuration mechanism (`keep_compile_arguments`) and one
argument check for every model; gradient transforms check every
optimizer they run with."""

import keras
import numpy as np
import pytest
from gan_builders import LATENT
from gan_builders import make_discriminator
from gan_builders import make_generator

import fitcustom
from fitcustom import _args


@keras.saving.register_keras_serializable(package="tests")
class Penalised(fitcustom.TapeModel):
    """A task model with a compile argument of its own."""

    keep = True

    def compile(self, *args, penalty=0.0, **kwargs):
        super().compile(*args, **kwargs)
        self.penalty = _args.number("penalty", penalty, low=0)
        if self.keep:
            self.keep_compile_arguments(penalty=self.penalty)


@keras.saving.register_keras_serializable(package="tests")
class Forgets(Penalised):
    keep = False


def _saved_and_loaded(cls, tmp_path):
    inputs = keras.Input((3,))
    network = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model = cls(network=network)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss="mse",
        penalty=0.25,
        gradient_transforms=[fitcustom.ClipByGlobalNorm(2.0)],
        skip_nonfinite=True,
    )
    x = np.ones((4, 3), "float32")
    model.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0)
    path = tmp_path / f"{cls.__name__}.keras"
    model.save(path)
    return keras.saving.load_model(path)


def test_own_compile_arguments_are_saved_with_the_model(tmp_path):
    loaded = _saved_and_loaded(Penalised, tmp_path)
    assert loaded.penalty == 0.25
    assert loaded.compile_arguments["penalty"] == 0.25
    # The engine's arguments come back too, and Keras' own.
    (clip,) = loaded.gradient_transforms
    assert clip.max_norm == 2.0
    assert loaded.compile_arguments["skip_nonfinite"] is True
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    # Control: a compile() that does not keep its argument loses it.
    assert _saved_and_loaded(Forgets, tmp_path).penalty == 0.0


@pytest.mark.parametrize(
    "check, value, message",
    [
        (lambda v: _args.boolean("flag", v), 1, "`flag` must be True or False"),
        (
            lambda v: _args.whole("n", v),
            0,
            r"whole number >= 1\. Received: n=0",
        ),
        (lambda v: _args.whole("n", v), 2.0, "whole number >= 1"),
        (lambda v: _args.whole("n", v), True, "whole number >= 1"),
        (
            lambda v: _args.number("rate", v, low=0, high=1, high_open=True),
            1.0,
            r"a number in \[0, 1\)\. Received: rate=1\.0",
        ),
        (
            lambda v: _args.number("r", v, low=0, low_open=True, none_ok=True),
            float("nan"),
            "a number > 0 or None",
        ),
        (lambda v: _args.number("r", v), "0.1", "must be a number"),
        (lambda v: _args.integer("seed", v), 1.5, "`seed` must be a whole"),
        (lambda v: _args.model("net", v), "dense", "must be a keras.Model"),
    ],
)
def test_argument_checks_say_what_was_received(check, value, message):
    with pytest.raises(ValueError, match=message):
        check(value)


def test_argument_checks_return_plain_values():
    assert _args.whole("n", np.int64(3)) == 3
    assert type(_args.whole("n", np.int64(3))) is int
    assert _args.number("r", 1) == 1.0
    assert _args.number("r", None, none_ok=True) is None
    assert _args.whole("k", None, none_ok=True) is None


def _scaled():
    return [fitcustom.ScaleByLayer({"dense": 0.1})]


def test_scaling_warning_for_any_task_model():
    """A gradient transform checks every optimizer a model trains with:
    the engine's one, and a GAN's two (it lived in TapeClassifier only)."""
    inputs = keras.Input((3,))
    model = fitcustom.TapeModel(
        inputs, keras.layers.Dense(2, name="dense")(inputs)
    )
    with pytest.warns(UserWarning, match="Adam normalises"):
        model.compile(
            optimizer="adam", loss="mse", gradient_transforms=_scaled()
        )
    gan = fitcustom.TapeGAN(
        generator=make_generator(),
        discriminator=make_discriminator(),
        latent_dim=LATENT,
    )
    with pytest.warns(UserWarning, match="RMSprop normalises") as record:
        gan.compile(
            d_optimizer=keras.optimizers.SGD(0.1),
            g_optimizer=keras.optimizers.RMSprop(),
            gradient_transforms=_scaled(),
        )
    assert len(record) == 1  # SGD scales: no warning for it
