"""The small models and data of the kill-and-resume jobs
(`resume_job.py`, `durable_job.py`): one builder, so both test the same
kinds of model."""

import keras
import numpy as np

import fitcustom


def build(kind, n_critic=1, dropout=0.0):
    """`(model, x, y)`: a compiled model of `kind` and its data.

    Args:
        kind: "gan" (a TapeGAN with an EMA generator and label noise,
            `y` None: its noise is drawn by the GAN, part of what must
            resume), "classifier" (a TapeClassifier with SAM and label
            smoothing) or "engine" (a TapeModel with a gradient transform
            and the non-finite guard).
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
            "`kind` must be 'gan', 'classifier' or 'engine'. "
            f"Received: kind={kind!r}."
        )
    return model, x, y
