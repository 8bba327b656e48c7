"""Data and models shared by `multiworker_job.py` and its test.

Imported by `tests/programs/multiworker_job.py` (in each worker) and
loaded by `tests/test_multiworker.py` (for the single-process
reference); not run on its own. `data()` gives the inputs and labels,
`make_model(kind)` a compiled model ("engine", "classifier" or "gan").
"""

import keras
import numpy as np
import tensorflow as tf

import fitcustom


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=64).astype("int32")
    return x, y


NOISE = np.random.default_rng(1).normal(size=(8, 2, 16, 4)).astype("float32")


class FedGAN(fitcustom.TapeGAN):
    # Noise for the global batch of step i; each replica takes its rows.
    def sample_latent(self, batch_size, stream):
        step = tf.cast(self.g_optimizer.iterations, tf.int32)
        rows = tf.gather(tf.constant(NOISE), step)[stream]
        ctx = tf.distribute.get_replica_context()
        start = ctx.replica_id_in_sync_group * batch_size
        return rows[start : start + batch_size]


def make_model(kind):
    keras.utils.set_random_seed(0)
    if kind == "gan":
        z = keras.Input((4,))
        generator = keras.Model(
            z,
            keras.layers.Dense(6)(keras.layers.Dense(8, activation="relu")(z)),
        )
        x = keras.Input((6,))
        discriminator = keras.Model(
            x,
            keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(x)),
        )
        model = FedGAN(
            generator=generator, discriminator=discriminator, latent_dim=4
        )
        model.compile(
            d_optimizer=keras.optimizers.Adam(1e-2),
            g_optimizer=keras.optimizers.Adam(1e-2),
        )
        return model
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    cls = {
        "engine": fitcustom.TapeModel,
        "classifier": fitcustom.TapeClassifier,
    }[kind]
    model = cls(inputs, keras.layers.Dense(3)(h))
    kwargs = dict(
        gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
        log_gradient_norm=True,
    )
    if kind == "engine":
        kwargs.update(
            optimizer="adam",
            metrics=["accuracy"],
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.compile(**kwargs)
    return model
