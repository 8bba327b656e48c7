"""The two step shapes of keras.io's GAN examples, as TapeGAN options:
every critic update on the same real batch (WGAN-GP), and one
discriminator call on [fake, real] (DCGAN). Each equals a hand-written
loop of that shape, and differs from TapeGAN's default shape."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from gan_builders import LATENT
from gan_builders import FedGAN
from gan_builders import make_discriminator
from gan_builders import make_generator
from gan_builders import real_images
from helpers import assert_weights_close
from helpers import max_abs_diff

STEPS, BATCH = 3, 8


def _batch_norm_discriminator():
    images = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same")(images)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(images, keras.layers.Dense(1)(h), name="discriminator")


def _networks(batch_norm_d=False):
    keras.utils.set_random_seed(0)
    generator = make_generator(batch_norm=False)
    if batch_norm_d:
        return generator, _batch_norm_discriminator()
    return generator, make_discriminator()


def _fed(table, eps=None, batch_norm_d=False, **kwargs):
    generator, discriminator = _networks(batch_norm_d)
    gan = FedGAN(
        generator=generator,
        discriminator=discriminator,
        latent_dim=LATENT,
        **kwargs,
    )
    gan.table = tf.constant(table)
    if eps is not None:
        gan.eps_table = tf.constant(eps)
    return gan


def _fit(gan, images, **compile_kwargs):
    gan.compile(
        d_optimizer=keras.optimizers.SGD(0.05),
        g_optimizer=keras.optimizers.SGD(0.05),
        **compile_kwargs,
    )
    gan.fit(images, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return gan


def _assert_same(gan, generator, discriminator):
    assert_weights_close(generator.get_weights(), gan.generator.get_weights())
    assert_weights_close(
        discriminator.get_weights(), gan.discriminator.get_weights()
    )


@pytest.mark.parametrize("full_batch", [True, False], ids=["option", "default"])
def test_every_critic_update_on_the_same_real_batch(full_batch):
    """keras.io's WGAN-GP step: n_critic critic updates, each on the whole
    real batch with fresh latent vectors, then the generator's."""
    n_critic = 3
    images = real_images(STEPS * BATCH)
    rng = np.random.default_rng(5)
    table = rng.normal(size=(STEPS, n_critic + 1, BATCH, LATENT))
    eps = rng.uniform(size=(STEPS, n_critic, BATCH))
    table, eps = table.astype("float32"), eps.astype("float32")
    generator, discriminator = _networks()
    g_opt, d_opt = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)

    @tf.function
    def hand_step(real, noise, weights):
        for k in range(n_critic):
            with tf.GradientTape() as tape:
                fake = generator(noise[k], training=True)
                d_cost = tf.reduce_mean(
                    discriminator(fake, training=True)
                ) - tf.reduce_mean(discriminator(real, training=True))
                w = tf.reshape(weights[k], [-1, 1, 1, 1])
                mixed = w * real + (1.0 - w) * fake
                with tf.GradientTape() as inner:
                    inner.watch(mixed)
                    scores = discriminator(mixed, training=True)
                g = tf.reshape(inner.gradient(scores, mixed), [BATCH, -1])
                norm = tf.sqrt(tf.reduce_sum(tf.square(g), axis=-1) + 1e-12)
                d_cost += 10.0 * tf.reduce_mean(tf.square(norm - 1.0))
            variables = discriminator.trainable_variables
            d_opt.apply_gradients(
                zip(tape.gradient(d_cost, variables), variables)
            )
        with tf.GradientTape() as tape:
            fake = generator(noise[n_critic], training=True)
            g_cost = -tf.reduce_mean(discriminator(fake, training=True))
        variables = generator.trainable_variables
        g_opt.apply_gradients(zip(tape.gradient(g_cost, variables), variables))

    for i in range(STEPS):
        hand_step(images[i * BATCH : (i + 1) * BATCH], table[i], eps[i])
    if full_batch:
        gan = _fed(table, eps, n_critic=n_critic, full_batch_critic=True)
    else:  # slices of the batch: fewer rows of the tables per update
        m = BATCH // n_critic
        gan = _fed(table[:, :, :m], eps[:, :, :m], n_critic=n_critic)
    _fit(gan, images, loss="wasserstein")
    assert gan.d_optimizer.iterations.numpy() == STEPS * n_critic
    if full_batch:
        _assert_same(gan, generator, discriminator)
    else:  # control: the default shape is another step
        diff = max_abs_diff(
            discriminator.get_weights(), gan.discriminator.get_weights()
        )
        assert diff > 1e-3


@pytest.mark.parametrize("joint", [True, False], ids=["option", "default"])
def test_one_discriminator_call_on_fake_and_real(joint):
    """keras.io's DCGAN step: the discriminator runs once on
    concat([fake, real]), so its BatchNormalization normalises over both
    halves."""
    images = real_images(STEPS * BATCH)
    rng = np.random.default_rng(6)
    table = rng.normal(size=(STEPS, 2, BATCH, LATENT)).astype("float32")
    generator, discriminator = _networks(batch_norm_d=True)
    g_opt, d_opt = keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)
    softplus = tf.nn.softplus

    @tf.function
    def hand_step(real, noise):
        with tf.GradientTape() as tape:
            fake = generator(noise[0], training=True)
            logits = discriminator(tf.concat([fake, real], 0), training=True)
            d_cost = tf.reduce_mean(softplus(-logits[BATCH:])) + (
                tf.reduce_mean(softplus(logits[:BATCH]))
            )
        variables = discriminator.trainable_variables
        d_opt.apply_gradients(zip(tape.gradient(d_cost, variables), variables))
        with tf.GradientTape() as tape:
            fake = generator(noise[1], training=True)
            g_cost = tf.reduce_mean(
                softplus(-discriminator(fake, training=True))
            )
        variables = generator.trainable_variables
        g_opt.apply_gradients(zip(tape.gradient(g_cost, variables), variables))

    for i in range(STEPS):
        hand_step(images[i * BATCH : (i + 1) * BATCH], table[i])
    gan = _fit(
        _fed(table, batch_norm_d=True, joint_discriminator_call=joint),
        images,
    )
    if joint:
        _assert_same(gan, generator, discriminator)
    else:  # control: two calls normalise real and fake apart
        diff = max_abs_diff(
            discriminator.get_weights(), gan.discriminator.get_weights()
        )
        assert diff > 1e-3


def test_the_options_are_saved_and_checked(tmp_path):
    generator, discriminator = _networks()
    gan = FedGAN(
        generator=generator,
        discriminator=discriminator,
        latent_dim=LATENT,
        n_critic=2,
        full_batch_critic=True,
        joint_discriminator_call=True,
    )
    config = gan.get_config()
    assert config["full_batch_critic"] is True
    assert config["joint_discriminator_call"] is True
    # A batch of one image is enough when every update takes the batch.
    gan.check_data(real_images(4), batch_size=1)
    with pytest.raises(ValueError, match="`full_batch_critic` must be True"):
        FedGAN(
            generator=generator,
            discriminator=discriminator,
            latent_dim=LATENT,
            full_batch_critic="yes",
        )
