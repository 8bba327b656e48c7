"""The small models and data of the kill-and-resume jobs
(`resume_job.py`, `durable_job.py`): one builder, so both test the same
kinds of model."""

import keras
import numpy as np
import tensorflow as tf

import fitcustom


@keras.saving.register_keras_serializable(package="fitcustom_small_models")
class TwoPlayers(fitcustom.TapeModel):
    """A step of one's own: `encoder` fits the labels' one-hot codes from
    noisy inputs, `decoder` rebuilds the inputs from the codes; two named
    optimizers, one persistent tape, and an EMA copy of the decoder."""

    config_models = ("encoder", "decoder")

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.ema_decoder = self.track_ema(self.decoder, 0.8, "decoder")

    def call(self, x, training=False):
        return self.decoder(self.encoder(x, training=training))

    def train_step(self, data):
        x, y, _ = self.unpack_data(data)
        with tf.GradientTape(persistent=True) as tape:
            noisy = x + 0.1 * self.normal_noise(tf.shape(x))
            code = self.encoder(noisy, training=True)
            target = tf.one_hot(tf.cast(y, tf.int32), 3)
            fit = tf.reduce_sum(tf.square(code - target), axis=-1)
            rebuilt = self.decoder(code, training=True)
            rebuild = tf.reduce_mean(tf.square(rebuilt - x), axis=-1)
            self.minimize(
                tape, {"fit": fit, "rebuild": rebuild}, optimizer="encoder"
            )
            self.minimize(tape, {"rebuild": rebuild}, optimizer="decoder")


def build(kind, n_critic=1, dropout=0.0):
    """`(model, x, y)`: a compiled model of `kind` and its data.

    Args:
        kind: "gan" (a TapeGAN with an EMA generator and label noise,
            `y` None: its noise is drawn by the GAN, part of what must
            resume), "classifier" (a TapeClassifier with SAM and label
            smoothing), "engine" (a TapeModel with a gradient transform
            and the non-finite guard) or "two_players" (a step of its own:
            two named optimizers, an EMA copy, noise from `normal_noise`).
        n_critic: The GAN's discriminator updates per step.
        dropout: Dropout rate after the classifiers' BatchNormalization
            (0: none); the GAN's discriminator always has Dropout(0.2).
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 3, size=96)
    if kind == "gan":
        z = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu")(z)
        h = keras.layers.BatchNormalization()(h)
        generator = keras.Model(z, keras.layers.Dense(6)(h))
        d_in = keras.Input((6,))
        h = keras.layers.Dense(8, activation="relu")(d_in)
        discriminator = keras.Model(
            d_in, keras.layers.Dense(1)(keras.layers.Dropout(0.2)(h))
        )
        model = fitcustom.TapeGAN(
            generator=generator,
            discriminator=discriminator,
            latent_dim=4,
            n_critic=n_critic,
            ema_decay=0.9,
        )
        model.compile(label_noise=0.05)
        return model, x, None
    if kind == "two_players":
        a = keras.Input((6,))
        h = keras.layers.Dropout(0.1)(keras.layers.Dense(8, "relu")(a))
        encoder = keras.Model(a, keras.layers.Dense(3)(h))
        b = keras.Input((3,))
        decoder = keras.Model(b, keras.layers.Dense(6)(b))
        model = TwoPlayers(encoder, decoder)
        model.compile(
            optimizer={
                "encoder": "adam",
                "decoder": keras.optimizers.SGD(0.05, momentum=0.5),
            }
        )
        return model, x, y
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    if dropout:
        h = keras.layers.Dropout(dropout)(h)
    outputs = keras.layers.Dense(3)(h)
    if kind == "classifier":
        model = fitcustom.TapeClassifier(inputs, outputs)
        model.compile(sam_rho=0.05, label_smoothing=0.1)
    elif kind == "engine":
        model = fitcustom.TapeModel(inputs, outputs)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
            skip_nonfinite=True,
        )
    else:
        raise ValueError(
            "`kind` must be 'gan', 'classifier', 'engine' or "
            "'two_players'. "
            f"Received: kind={kind!r}."
        )
    return model, x, y
