"""The small GAN networks and data the GAN tests share: 8x8 one-channel
images, an 8-dimensional latent space, and `FedGAN`, a `TapeGAN` whose
noise comes from tables (so a hand-written loop can draw the same)."""

import keras
import numpy as np
import tensorflow as tf

import fitcustom

LATENT = 8


def _activation(smooth):
    # LeakyReLU has a kink at 0; SiLU is smooth (see the replica test).
    if smooth:
        return keras.layers.Activation("silu")
    return keras.layers.LeakyReLU(0.2)


def make_generator(conditional=False, batch_norm=True, smooth=False):
    z = keras.Input((LATENT,))
    inputs = z
    if conditional:
        labels = keras.Input((), dtype="int32")
        embedded = keras.layers.Embedding(10, 4)(labels)
        z = keras.layers.Concatenate()([z, embedded])
        inputs = [inputs, labels]
    h = keras.layers.Dense(4 * 4 * 8)(z)
    if batch_norm:  # training=True must reach it
        h = keras.layers.BatchNormalization()(h)
    h = _activation(smooth)(h)
    h = keras.layers.Reshape((4, 4, 8))(h)
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same")(h)
    h = _activation(smooth)(h)
    out = keras.layers.Conv2D(1, 3, padding="same", activation="tanh")(h)
    return keras.Model(inputs, out, name="generator")


def make_discriminator(conditional=False, dropout=False, smooth=False):
    images = keras.Input((8, 8, 1))
    inputs = images
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same")(images)
    h = _activation(smooth)(h)
    h = keras.layers.Flatten()(h)
    if dropout:  # its masks come from a SeedGenerator, saved with the GAN
        h = keras.layers.Dropout(0.3)(h)
    if conditional:
        labels = keras.Input((), dtype="int32")
        h = keras.layers.Concatenate()(
            [h, keras.layers.Embedding(10, 4)(labels)]
        )
        inputs = [images, labels]
    return keras.Model(inputs, keras.layers.Dense(1)(h), name="discriminator")


def real_images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 8, 8, 1)).astype("float32")


class FedGAN(fitcustom.TapeGAN):
    """Noise from tables: row `iterations` of draw `stream`, this
    replica's rows of the global batch (latent vectors and the gradient
    penalty's interpolation weights)."""

    table = None
    eps_table = None

    def _rows(self, table, batch_size, index):
        step = tf.cast(self.g_optimizer.iterations, tf.int32)
        start = fitcustom.distribute.replica_id() * batch_size
        return tf.gather(table, step)[index][start : start + batch_size]

    def sample_latent(self, batch_size, stream):
        return self._rows(self.table, batch_size, stream)

    def interpolation_weights(self, batch_size, index):
        if self.eps_table is None:
            return super().interpolation_weights(batch_size, index)
        return self._rows(self.eps_table, batch_size, index)


def fed_gan(
    table, eps_table=None, batch_norm=True, smooth=False, cls=None, **kwargs
):
    keras.utils.set_random_seed(0)
    gan = (cls or FedGAN)(
        generator=make_generator(batch_norm=batch_norm, smooth=smooth),
        discriminator=make_discriminator(smooth=smooth),
        latent_dim=LATENT,
        **kwargs,
    )
    gan.table = tf.constant(table)
    if eps_table is not None:
        gan.eps_table = tf.constant(eps_table)
    return gan


def copies():
    keras.utils.set_random_seed(0)
    return make_generator(), make_discriminator()
