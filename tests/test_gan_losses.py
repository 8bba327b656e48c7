"""GAN loss families against their formulas on fixed tensors."""

import re

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
    eps = tf.random.uniform([5], seed=3)
    gp = gan_losses.gradient_penalty(critic, real, fake, eps)
    np.testing.assert_allclose(
        gp.numpy(), np.full(5, (5.0 - 1.0) ** 2), rtol=1e-5
    )


def test_gradient_penalty_at_the_interpolated_points():
    """D(x) = sum(x^2): grad D(x_hat) = 2 x_hat, so the penalty checks both
    the interpolation x_hat = eps real + (1 - eps) fake and the norm."""

    def critic(x, training=True):
        return tf.reduce_sum(x**2, axis=[1, 2, 3])[:, None]

    rng = np.random.default_rng(0)
    real = rng.normal(size=(3, 2, 2, 1)).astype("float32")
    fake = rng.normal(size=(3, 2, 2, 1)).astype("float32")
    eps = np.array([0.0, 0.25, 1.0], np.float32)
    x_hat = (
        eps[:, None, None, None] * real + (1 - eps[:, None, None, None]) * fake
    )
    norm = np.sqrt((2 * x_hat).reshape(3, -1).__pow__(2).sum(1))
    gp = gan_losses.gradient_penalty(
        critic, tf.constant(real), tf.constant(fake), eps
    )
    np.testing.assert_allclose(gp.numpy(), (norm - 1) ** 2, rtol=1e-5)


def test_gradient_penalty_reaches_the_critic_weights():
    """Inside an outer tape the penalty has a gradient w.r.t. the weights
    (double backprop), else it would not regularise anything."""
    w = tf.Variable([[3.0], [4.0]])
    real = tf.ones([4, 2])
    fake = tf.zeros([4, 2])
    with tf.GradientTape() as tape:
        gp = tf.reduce_mean(
            gan_losses.gradient_penalty(
                lambda x, training=True: tf.matmul(x, w),
                real,
                fake,
                tf.fill([4], 0.5),
            )
        )
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w| = 2 * 4 * (3, 4) / 5
    np.testing.assert_allclose(
        tape.gradient(gp, w).numpy()[:, 0], [4.8, 6.4], rtol=1e-5
    )


def test_r1_penalty_of_a_quadratic_critic():
    def critic(x, training=True):
        return tf.reduce_sum(x**2, axis=-1, keepdims=True)

    real = tf.constant([[1.0, 2.0], [0.0, -1.0]])
    # grad = 2x: ||2x||^2 = 4 |x|^2
    np.testing.assert_allclose(
        gan_losses.r1_penalty(critic, real).numpy(), [20.0, 4.0], rtol=1e-6
    )


def test_r1_penalty_of_a_conditional_critic_sees_the_labels():
    seen = []

    def critic(inputs, training=True):
        images, labels = inputs
        seen.append(labels)
        return tf.reduce_sum(images, axis=-1, keepdims=True) * labels

    real = tf.constant([[1.0, 2.0], [0.0, -1.0]])
    labels = tf.constant([[2.0], [3.0]])
    # grad = labels * (1, 1): ||.||^2 = 2 labels^2
    np.testing.assert_allclose(
        gan_losses.r1_penalty(critic, real, labels).numpy(),
        [8.0, 18.0],
        rtol=1e-6,
    )
    assert seen[0] is labels


def test_which_families_use_targets_and_the_penalty():
    uses = {
        name: gan_losses.get(name).uses_targets for name in gan_losses.LOSSES
    }
    assert uses == {
        "non_saturating": True,
        "minimax": True,
        "wasserstein": False,
        "hinge": False,
        "least_squares": True,
    }
    assert [
        n for n in gan_losses.LOSSES if gan_losses.get(n).gradient_penalty
    ] == ["wasserstein"]


def test_mixed_precision_logits_give_float32_losses():
    real = tf.constant(REAL, tf.float16)
    fake = tf.constant(FAKE, tf.float16)
    for name in gan_losses.LOSSES:
        loss = gan_losses.get(name)
        assert loss.discriminator(real, fake).dtype == tf.float32, name
        assert loss.generator(fake).dtype == tf.float32, name


def test_module_example_runs():
    block = re.findall(r"```python\n(.*?)```", gan_losses.__doc__, re.S)
    assert len(block) == 1
    exec(compile(block[0], "<gan_losses example>", "exec"), {})


@pytest.mark.parametrize("name", ["wgan", None, ["hinge"]])
def test_unknown_loss_is_named(name):
    with pytest.raises(ValueError, match=r"Unknown GAN loss.*Received: loss="):
        gan_losses.get(name)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        gan_losses.get(name)
