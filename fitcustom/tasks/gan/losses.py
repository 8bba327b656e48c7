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

BCE is the sigmoid cross-entropy on logits. The families that compare
with targets (`uses_targets`: the two cross-entropy families and
least-squares) accept smoothed or noisy ones (`real_target`, `fake_target`,
scalars or one per example); Wasserstein and hinge have none.

Example:

```python
import numpy as np
from fitcustom import gan_losses

loss = gan_losses.get("hinge")
real = np.array([[2.0], [0.5]], "float32")  # D(x) on real images
fake = np.array([[-3.0], [0.2]], "float32")  # D(G(z))
d = loss.discriminator(real, fake)  # relu(1 - real) + relu(1 + fake)
np.testing.assert_allclose(d.numpy(), [0.0, 0.5 + 1.2], rtol=1e-6)
```

May import: Keras and TensorFlow only.
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

    Both return one loss per example (shape `(batch,)`, float32), computed
    from the discriminator's outputs (logits or scores); the caller reduces
    them.

    Args:
        name: The family's name (see the module table).
    """

    #: Whether the family is meant to be used with the gradient penalty
    #: (Wasserstein: `TapeGAN` then adds it with weight 10 by default).
    gradient_penalty = False
    #: Whether `discriminator()` uses `real_target` / `fake_target` (label
    #: smoothing and label noise apply).
    uses_targets = False
    #: Whether the family reads the discriminator's outputs as the logits
    #: of a sigmoid (the cross-entropy families): `TapeGAN` then refuses a
    #: discriminator that ends in a sigmoid, whose scores saturate.
    takes_logits = False

    def __init__(self, name):
        self.name = name

    def get_config(self):
        """Constructor arguments, for saving a compiled `TapeGAN`.

        A family of your own is saved by class: register it with
        `@keras.saving.register_keras_serializable()` and return its
        constructor arguments here if it takes any.
        """
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def discriminator(
        self,
        real_logits: tf.Tensor,
        fake_logits: tf.Tensor,
        real_target: tf.Tensor | float = 1.0,
        fake_target: tf.Tensor | float = 0.0,
    ) -> tf.Tensor:
        raise NotImplementedError

    def generator(self, fake_logits: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


class NonSaturating(GANLoss):
    """Goodfellow et al.'s non-saturating loss: D minimises
    BCE(D(x), 1) + BCE(D(G(z)), 0), G minimises BCE(D(G(z)), 1)."""

    uses_targets = True
    takes_logits = True

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
    """The original minimax game: G minimises log(1 - D(G(z)))."""

    def __init__(self):
        GANLoss.__init__(self, "minimax")

    def generator(self, fake_logits):
        # log(1 - sigmoid(f)) = -softplus(f) = -BCE(f, 0)
        return -_per_example(_bce(_flat(fake_logits), 0.0))


class Wasserstein(GANLoss):
    """Wasserstein critic loss D(G(z)) - D(x); G minimises -D(G(z)). Use
    with the gradient penalty (`TapeGAN` adds it by default)."""

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
    """Hinge loss: D minimises relu(1 - D(x)) + relu(1 + D(G(z)));
    G minimises -D(G(z))."""

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
    """Least-squares GAN (Mao et al., 2017) with targets 1 (real) and 0
    (fake); G pulls D(G(z)) towards 1."""

    uses_targets = True

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
    """The loss family called `name` (or `name` itself if it is a `GANLoss`).

    Raises:
        ValueError: `name` is not one of `LOSSES`; the message lists them.
    """
    if isinstance(name, GANLoss):
        return name
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(
            f"Unknown GAN loss. Received: loss={name!r}. Expected one of "
            f"{sorted(LOSSES)}."
        )
    return LOSSES[name]()


def gradient_penalty(discriminator, real, fake, epsilon, conditions=None):
    """Per-example WGAN-GP term (||grad D(x_hat)||_2 - 1)^2.

    `x_hat = eps * real + (1 - eps) * fake` (Gulrajani et al., 2017), where
    the caller draws one `eps ~ U[0, 1]` per example (`TapeGAN` does it in
    `interpolation_weights`). Call it inside the outer tape: the penalty's
    gradient flows to the discriminator's weights.

    Args:
        discriminator: Callable `discriminator(inputs, training=True)`.
        real: Batch of real images.
        fake: Batch of generated images, same shape.
        epsilon: Interpolation weights, shape `(batch,)`, in [0, 1].
        conditions: Optional labels (conditional GAN), passed with the
            images as `[images, conditions]`.

    Returns:
        float32 tensor of shape `(batch,)`.
    """
    batch = tf.shape(real)[0]
    shape = tf.concat([[batch], tf.ones([tf.rank(real) - 1], tf.int32)], 0)
    eps = tf.reshape(tf.cast(epsilon, real.dtype), shape)
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
