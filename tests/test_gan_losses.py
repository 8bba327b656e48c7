"""GAN loss families against their formulas on fixed tensors."""

import numpy as np
import pytest
import tensorflow as tf

from fitcustom import gan_losses

REAL = np.array([[2.0], [-1.0], [0.5]], np.float32)
FAKE = np.array([[-3.0], [0.2], [1.5]], np.float32)


def softplus(v):
    return np.log1p(np.exp(v))


def bce(logit, target):
    return softplus(logit) - target * logit


@pytest.mark.parametrize(
    "name, d_expected, g_expected",
    [
        ("non_saturating", bce(REAL, 1) + bce(FAKE, 0), bce(FAKE, 1)),
        ("minimax", bce(REAL, 1) + bce(FAKE, 0), -softplus(FAKE)),
        ("wasserstein", FAKE - REAL, -FAKE),
        ("hinge", np.maximum(0, 1 - REAL) + np.maximum(0, 1 + FAKE), -FAKE),
        (
            "least_squares",
            0.5 * ((REAL - 1) ** 2 + FAKE**2),
            0.5 * (FAKE - 1) ** 2,
        ),
    ],
)
def test_loss_matches_formula(name, d_expected, g_expected):
    loss = gan_losses.get(name)
    np.testing.assert_allclose(
        loss.discriminator(REAL, FAKE).numpy(), d_expected[:, 0], rtol=1e-6
    )
    np.testing.assert_allclose(
        loss.generator(FAKE).numpy(), g_expected[:, 0], rtol=1e-6
    )


def test_smoothed_and_noisy_targets():
    loss = gan_losses.get("non_saturating")
    real_t = np.array([[0.9], [0.95], [1.0]], np.float32)
    fake_t = np.array([[0.05], [0.0], [0.02]], np.float32)
    np.testing.assert_allclose(
        loss.discriminator(REAL, FAKE, real_t, fake_t).numpy(),
        (bce(REAL, real_t) + bce(FAKE, fake_t))[:, 0],
        rtol=1e-6,
    )


def test_gradient_penalty_of_a_linear_critic():
    """For D(x) = w.x the gradient is w everywhere: GP = (|w| - 1)^2,
    whatever the interpolation weights."""
    w = tf.constant([[3.0], [4.0]])

    def critic(x, training=True):
        return tf.matmul(x, w)

    real = tf.random.normal([5, 2], seed=1)
    fake = tf.random.normal([5, 2], seed=2)
    gp = gan_losses.gradient_penalty(critic, real, fake, [1, 2])
    np.testing.assert_allclose(
        gp.numpy(), np.full(5, (5.0 - 1.0) ** 2), rtol=1e-5
    )


def test_interpolation_weights_are_uniform_in_unit_interval():
    """The penalty is evaluated between real and fake, never outside."""
    seen = []

    def critic(x, training=True):
        seen.append(x)
        return tf.reduce_sum(x, axis=-1, keepdims=True)

    real = tf.zeros([4000, 1])
    fake = tf.ones([4000, 1])
    gan_losses.gradient_penalty(critic, real, fake, [3, 4])
    mixed = 1.0 - seen[0].numpy().ravel()  # = eps
    assert mixed.min() >= 0.0 and mixed.max() <= 1.0
    # Uniform, not normal: mean 1/2 and variance 1/12.
    assert abs(mixed.mean() - 0.5) < 0.02
    assert abs(mixed.var() - 1 / 12) < 0.01


def test_r1_penalty_of_a_quadratic_critic():
    def critic(x, training=True):
        return tf.reduce_sum(x**2, axis=-1, keepdims=True)

    real = tf.constant([[1.0, 2.0], [0.0, -1.0]])
    # grad = 2x: ||2x||^2 = 4 |x|^2
    np.testing.assert_allclose(
        gan_losses.r1_penalty(critic, real).numpy(), [20.0, 4.0], rtol=1e-6
    )


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="Unknown GAN loss.*'wgan'"):
        gan_losses.get("wgan")
