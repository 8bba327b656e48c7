"""TapeGAN refuses (or warns about) the inputs people get wrong, before any
weight changes."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from gan_builders import LATENT
from gan_builders import make_discriminator
from gan_builders import make_generator
from gan_builders import real_images
from helpers import strategy_scope

import fitcustom


def _gan(discriminator=None, **kwargs):
    keras.utils.set_random_seed(0)
    return fitcustom.TapeGAN(
        generator=make_generator(),
        discriminator=discriminator or make_discriminator(),
        latent_dim=LATENT,
        **kwargs,
    )


def _discriminator(units=1, activation=None):
    images = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(images)
    return keras.Model(
        images, keras.layers.Dense(units, activation=activation)(h)
    )


def _weights(gan):
    return gan.generator.get_weights() + gan.discriminator.get_weights()


def _refused(gan, match, *args, **kwargs):
    before = _weights(gan)
    with pytest.raises(ValueError, match=match):
        gan.fit(*args, verbose=0, **kwargs)
    for a, b in zip(before, _weights(gan), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", ["non_saturating", "minimax"])
def test_discriminator_ending_in_sigmoid_is_refused(loss):
    """keras.io's DCGAN ends its discriminator in a sigmoid; TapeGAN's
    cross-entropy takes logits (trained that way it stalls)."""
    gan = _gan(_discriminator(activation="sigmoid"))
    with pytest.raises(ValueError, match="ends in a sigmoid.*Dense\\(1\\)"):
        gan.compile(loss=loss)
    _gan(_discriminator()).compile(loss=loss)  # logits: accepted


def test_discriminator_with_two_outputs_is_refused():
    with pytest.raises(ValueError, match=r"one score.*shape \(2,\)"):
        _gan(_discriminator(units=2))


def test_nan_images_are_refused():
    gan = _gan()
    gan.compile()
    images = real_images(32)
    images[5, 2, 2, 0] = np.nan
    _refused(gan, "images.*NaN", images)


def test_images_in_0_255_for_a_tanh_generator_warn():
    gan = _gan()
    gan.compile()
    images = ((real_images(32) + 1) * 127.5).astype("uint8")
    with pytest.warns(UserWarning, match=r"up to 2\d\d.*127\.5 - 1"):
        gan.fit(images, batch_size=16, verbose=0)


def test_a_tanh_generator_behind_a_reshape_warns_too():
    z = keras.Input((LATENT,))
    h = keras.layers.Dense(64, activation="tanh")(z)
    generator = keras.Model(z, keras.layers.Reshape((8, 8, 1))(h))
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(generator, make_discriminator(), LATENT)
    gan.compile()
    images = ((real_images(32) + 1) * 127.5).astype("float32")
    with pytest.warns(UserWarning, match=r"ends in tanh.*up to 2\d\d"):
        gan.fit(images, batch_size=16, verbose=0)
    # Control: the same images in [-1, 1] do not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gan.fit(real_images(32), batch_size=16, verbose=0)


def test_labels_for_an_unconditional_gan_are_refused():
    gan = _gan()
    gan.compile()
    labels = np.zeros(32, "int32")
    _refused(gan, "unconditional", real_images(32), labels)
    dataset = tf.data.Dataset.from_tensor_slices(
        (real_images(32), labels)
    ).batch(8)
    _refused(gan, "unconditional", dataset)
    with pytest.raises(ValueError, match="unconditional.*Drop `labels=`"):
        gan.generate(4, labels=np.zeros(4, "int32"))


def test_batch_smaller_than_n_critic_is_refused():
    gan = _gan(n_critic=4)
    gan.compile()
    _refused(gan, r"n_critic=4.*batch_size=2", real_images(32), batch_size=2)


def test_second_fit_on_images_of_another_shape_is_refused():
    gan = _gan()
    gan.compile()
    gan.fit(real_images(16), verbose=0)
    _refused(
        gan,
        r"images of shape \(9, 9, 1\)\. Expected: \(8, 8, 1\)",
        np.zeros((16, 9, 9, 1), "float32"),
    )


def test_generate_takes_numpy_integers():
    gan = _gan()
    a = gan.generate(np.int64(4), seed=np.int32(1))
    b = gan.generate(4, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 8, 8, 1)


def test_predict_on_latent_vectors_points_to_generate():
    gan = _gan()
    with pytest.raises(ValueError, match=r"latent vectors.*generate\(n\)"):
        gan.predict(np.zeros((4, LATENT), "float32"), verbose=0)
    scores = gan.predict(real_images(4), verbose=0)
    assert scores.shape == (4, 1)


def test_label_noise_keeps_targets_in_0_1():
    """Noise moves targets towards the other class: real targets above 1
    leave the cross-entropy on logits without a lower bound."""
    gan = _gan()
    gan.compile(label_noise=0.05)
    real, fake = (t.numpy() for t in gan._targets(2000, 0))
    assert 0.95 <= real.min() and real.max() <= 1.0
    assert real.min() < 0.951  # the noise is there
    assert 0.0 <= fake.min() and fake.max() <= 0.05


def _short_last_batch_run(data, strategy=None, run_eagerly=False, **fit):
    with strategy_scope(strategy):
        gan = _gan(n_critic=3)
        gan.compile(run_eagerly=run_eagerly)
    history = gan.fit(data, epochs=2, verbose=0, shuffle=False, **fit)
    return (
        _weights(gan),
        history.history,
        int(gan.g_optimizer.iterations.numpy()),
    )


@pytest.mark.parametrize("mode", ["graph", "eager", "two_replicas"])
def test_batch_too_short_for_n_critic_is_skipped(mode, request):
    """A last batch with fewer images than n_critic (per replica) trains
    nothing: its empty slices would put NaN into BatchNormalization and
    the optimizers' momentum would still move the weights."""
    strategy = request.getfixturevalue(mode) if mode == "two_replicas" else None
    images = real_images(26)
    kwargs = dict(strategy=strategy, run_eagerly=mode == "eager")
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(12)
    skipped = _short_last_batch_run(dataset, **kwargs)  # batches 12, 12, 2
    reference = _short_last_batch_run(
        tf.data.Dataset.from_tensor_slices(images[:24]).batch(12), **kwargs
    )
    assert skipped[2] == reference[2] == 4  # 2 steps per epoch
    for a, b in zip(skipped[0], reference[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert skipped[1] == reference[1]
    assert all(np.isfinite(v).all() for v in skipped[1].values())


def test_short_last_batch_of_arrays_warns():
    with pytest.warns(
        UserWarning, match=r"last batch.*2 image\(s\).*n_critic=3"
    ):
        _short_last_batch_run(real_images(26), batch_size=12)


def _reshaped_label_gan():
    """A conditional GAN whose label Embedding sits behind a Reshape."""
    z, label = keras.Input((LATENT,)), keras.Input((), dtype="int32")
    code = keras.layers.Flatten()(
        keras.layers.Embedding(10, 4)(keras.layers.Reshape((1,))(label))
    )
    h = keras.layers.Dense(64, activation="tanh")(
        keras.layers.Concatenate()([z, code])
    )
    generator = keras.Model([z, label], keras.layers.Reshape((8, 8, 1))(h))
    images, d_label = keras.Input((8, 8, 1)), keras.Input((), dtype="int32")
    d_code = keras.layers.Flatten()(
        keras.layers.Embedding(10, 4)(keras.layers.Reshape((1,))(d_label))
    )
    both = keras.layers.Concatenate()([keras.layers.Flatten()(images), d_code])
    discriminator = keras.Model([images, d_label], keras.layers.Dense(1)(both))
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(generator, discriminator, latent_dim=LATENT)
    gan.compile()
    return gan


def test_labels_reaching_the_embedding_through_a_reshape_are_checked():
    gan = _reshaped_label_gan()
    images, labels = real_images(32), np.arange(32) % 10
    _refused(gan, r"\[0, 9\].*input_dim=10.*from 5 to 14", images, labels + 5)
    with pytest.raises(ValueError, match=r"from 3 to 12"):
        gan.generate(2, labels=np.array([3, 12]))
    gan.fit(images, labels, batch_size=16, verbose=0)  # in range: trains


def test_conditional_labels_outside_the_embedding_are_refused():
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(conditional=True),
        discriminator=make_discriminator(conditional=True),
        latent_dim=LATENT,
    )
    gan.compile()
    images = real_images(32)
    labels = np.arange(32) % 10
    _refused(gan, r"\[0, 9\].*input_dim=10.*from 1 to 10", images, labels + 1)
    _refused(gan, r"from -1 to 8", images, labels - 1)
    _refused(gan, "integer class ids.*float", images, labels + 0.5)
    with pytest.raises(ValueError, match=r"from 10 to 10"):
        gan.generate(2, labels=np.array([10, 10]))
    gan.fit(images, labels, batch_size=16, verbose=0)  # in range: trains
    assert gan.generate(2, labels=np.array([0, 9])).shape == (2, 8, 8, 1)
