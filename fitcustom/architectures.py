"""Reference architectures of the scripts and the benchmark, as functional
building blocks.

Used by the scripts, the benchmark and the tests, so that all of them
train the same networks.

May import: Keras only (nothing of fitcustom's).
"""

import keras


def mlp_body(inputs, width=64):
    """Flatten, Dense(width) x2 with ReLU, Dense(10) logits (the MLP,
    784-64-64-10 on 28x28 inputs)."""
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(width, activation="relu")(h)
    h = keras.layers.Dense(width, activation="relu")(h)
    return keras.layers.Dense(10)(h)


def cnn_body(inputs, num_classes=10):
    """A small CNN for images from 8x8 (the digits) to 32x32: conv 32 x2,
    max-pool, conv 64 x2, max-pool (3x3 convolutions, ReLU), flatten,
    dropout 0.3, `num_classes` logits. No BatchNorm, so it learns from the
    first epoch on a thousand images (on the digits: 0.987 test accuracy
    after 30 epochs, against the MLP's 0.964-0.971)."""
    h = inputs
    for filters in (32, 64):
        for _ in range(2):
            h = keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu"
            )(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dropout(0.3)(h)
    return keras.layers.Dense(num_classes)(h)


def vgg_body(inputs, num_classes=10):
    """A VGG-like CNN: conv 16; conv 32 x2; conv 64 x3 (3x3,
    BatchNorm, ReLU, max-pool after each group); dense 256, BatchNorm,
    dropout 0.5; `num_classes` logits."""
    h = inputs
    for filters, repeats in ((16, 1), (32, 2), (64, 3)):
        for _ in range(repeats):
            h = keras.layers.Conv2D(filters, 3, padding="same")(h)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D(padding="same")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(256)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dropout(0.5)(h)
    return keras.layers.Dense(num_classes)(h)


def dcgan_8x8(latent_dim=32):
    """A small DCGAN for 8x8x1 images in [-1, 1] (scikit-learn's digits).

    Returns:
        `(generator, discriminator)`: the generator maps `latent_dim`
        vectors to tanh images, the discriminator images to one logit.
    """
    z = keras.Input((latent_dim,))
    h = keras.layers.Dense(4 * 4 * 64)(z)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Reshape((4, 4, 64))(h)
    h = keras.layers.Conv2DTranspose(32, 4, strides=2, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    out = keras.layers.Conv2D(1, 3, padding="same", activation="tanh")(h)
    generator = keras.Model(z, out, name="generator")
    images = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same")(images)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Conv2D(64, 3, strides=2, padding="same")(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Dropout(0.3)(keras.layers.Flatten()(h))
    discriminator = keras.Model(
        images, keras.layers.Dense(1)(h), name="discriminator"
    )
    return generator, discriminator
