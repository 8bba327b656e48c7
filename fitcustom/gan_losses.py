"""GAN loss families, per example, on discriminator outputs (logits).

Every function returns one value per example; `TapeGAN` reduces them with
`fitcustom.distribute.mean_loss` (mean over the replica's batch divided by
the number of replicas), so that N replicas train like one device.

| name | discriminator | generator |
| --- | --- | --- |
| `non_saturating` (default) | BCE(real, 1) + BCE(fake, 0) | BCE(fake, 1) |
| `minimax` | as above | -BCE(fake, 0) = log(1 - D(G(z))) |
| `wasserstein` | D(fake) - D(real) (+ gradient penalty) | -D(fake) |
| `hinge` | relu(1 - D(real)) + relu(1 + D(fake)) | -D(fake) |
| `least_squares` | ((D(real) - 1)^2 + D(fake)^2) / 2 | (D(fake) - 1)^2 / 2 |

BCE is the sigmoid cross-entropy on logits; its targets may be smoothed or
noisy (`real_target`, `fake_target`).
"""

import tensorflow as tf


def _flat(logits):
    logits = tf.convert_to_tensor(logits)
    return tf.reshape(tf.cast(logits, tf.float32), [tf.shape(logits)[0], -1])


def _per_example(values):
    return tf.reduce_mean(values, axis=-1)


def _bce(logits, target):
    target = tf.broadcast_to(tf.cast(target, logits.dtype), tf.shape(logits))
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)


class GANLoss:
    """A loss family: `discriminator(real, fake)` and `generator(fake)`.

    Args:
        name: The family's name (see the module table).
    """

    #: Whether the family uses a gradient penalty (Wasserstein).
    gradient_penalty = False

    def __init__(self, name):
        self.name = name

    def discriminator(
        self, real_logits, fake_logits, real_target=1.0, fake_target=0.0
    ):
        raise NotImplementedError

    def generator(self, fake_logits):
        raise NotImplementedError


class NonSaturating(GANLoss):
    def __init__(self):
        super().__init__("non_saturating")

    def discriminator(
        self, real_logits, fake_logits, real_target=1.0, fake_target=0.0
    ):
        return _per_example(
            _bce(_flat(real_logits), real_target)
        ) + _per_example(_bce(_flat(fake_logits), fake_target))

    def generator(self, fake_logits):
        return _per_example(_bce(_flat(fake_logits), 1.0))


class Minimax(NonSaturating):
    def __init__(self):
        GANLoss.__init__(self, "minimax")

    def generator(self, fake_logits):
        # log(1 - sigmoid(f)) = -softplus(f) = -BCE(f, 0)
        return -_per_example(_bce(_flat(fake_logits), 0.0))


class Wasserstein(GANLoss):
    gradient_penalty = True

    def __init__(self):
        super().__init__("wasserstein")

    def discriminator(
        self, real_logits, fake_logits, real_target=1.0, fake_target=0.0
    ):
        return _per_example(_flat(fake_logits)) - _per_example(
            _flat(real_logits)
        )

    def generator(self, fake_logits):
        return -_per_example(_flat(fake_logits))


class Hinge(GANLoss):
    def __init__(self):
        super().__init__("hinge")

    def discriminator(
        self, real_logits, fake_logits, real_target=1.0, fake_target=0.0
    ):
        return _per_example(tf.nn.relu(1.0 - _flat(real_logits))) + (
            _per_example(tf.nn.relu(1.0 + _flat(fake_logits)))
        )

    def generator(self, fake_logits):
        return -_per_example(_flat(fake_logits))


class LeastSquares(GANLoss):
    def __init__(self):
        super().__init__("least_squares")

    def discriminator(
        self, real_logits, fake_logits, real_target=1.0, fake_target=0.0
    ):
        real = _flat(real_logits)
        fake = _flat(fake_logits)
        return 0.5 * (
            _per_example(tf.square(real - real_target))
            + _per_example(tf.square(fake - fake_target))
        )

    def generator(self, fake_logits):
        return 0.5 * _per_example(tf.square(_flat(fake_logits) - 1.0))


LOSSES = {
    cls().name: cls
    for cls in (NonSaturating, Minimax, Wasserstein, Hinge, LeastSquares)
}


def get(name):
    """The loss family called `name`; a `ValueError` names the choices."""
    if isinstance(name, GANLoss):
        return name
    if name not in LOSSES:
        raise ValueError(
            f"Unknown GAN loss. Received: loss={name!r}. Expected one of "
            f"{sorted(LOSSES)}."
        )
    return LOSSES[name]()


def gradient_penalty(discriminator, real, fake, weight_seed, conditions=None):
    """Per-example WGAN-GP term (||grad D(x_hat)||_2 - 1)^2.

    `x_hat = eps * real + (1 - eps) * fake` with `eps ~ U[0, 1]` per
    example (Gulrajani et al., 2017), drawn from the stateless seed
    `weight_seed`.
    """
    batch = tf.shape(real)[0]
    shape = tf.concat([[batch], tf.ones([tf.rank(real) - 1], tf.int32)], 0)
    eps = tf.random.stateless_uniform(shape, weight_seed, dtype=real.dtype)
    mixed = eps * real + (1.0 - eps) * tf.cast(fake, real.dtype)
    with tf.GradientTape() as tape:
        tape.watch(mixed)
        scores = _call(discriminator, mixed, conditions)
    grads = tf.reshape(
        tf.cast(tape.gradient(scores, mixed), tf.float32), [batch, -1]
    )
    norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=-1) + 1e-12)
    return tf.square(norm - 1.0)


def r1_penalty(discriminator, real, conditions=None):
    """Per-example R1 term ||grad D(x_real)||^2 (Mescheder et al., 2018);
    the caller multiplies by gamma / 2."""
    with tf.GradientTape() as tape:
        tape.watch(real)
        scores = _call(discriminator, real, conditions)
    grads = tf.reshape(
        tf.cast(tape.gradient(scores, real), tf.float32),
        [tf.shape(real)[0], -1],
    )
    return tf.reduce_sum(tf.square(grads), axis=-1)


def _call(discriminator, images, conditions):
    inputs = images if conditions is None else [images, conditions]
    return discriminator(inputs, training=True)
