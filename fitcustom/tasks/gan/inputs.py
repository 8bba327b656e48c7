"""`TapeGAN`'s checks of its arguments, data and networks (a mixin of
`TapeGAN`): `compile()`'s GAN arguments against the loss family, real
images and labels before any step, the networks' shapes when they are
built, and `predict()`'s guard against latent vectors.

May import: the ground floor, `_keras`, `tasks.gan.losses`.
"""

import warnings

import numpy as np
import tensorflow as tf

from fitcustom import _args
from fitcustom import checks
from fitcustom import networks
from fitcustom.tasks.gan import losses as gan_losses


class GANInputs:
    """What `TapeGAN` checks before it trains or predicts (part of
    `fitcustom.TapeGAN`)."""

    def _check_compile_arguments(
        self,
        gan_loss,
        label_smoothing,
        label_noise,
        r1_gamma,
        gp_weight,
        kwargs,
    ):
        """Checks `compile()`'s GAN arguments against the loss family and
        the discriminator, before anything is compiled; drops Keras'
        `metrics` / `loss_weights` (`None` only) from `kwargs`. Returns
        `(r1_gamma, gp_weight)` checked, the penalty's default filled in.
        """
        if gan_loss.takes_logits:
            if not networks.outputs_logits(self.discriminator):
                raise ValueError(
                    f"The {gan_loss.name!r} loss takes the discriminator's "
                    "logits, but the discriminator ends in a sigmoid (or "
                    "softmax): its scores saturate and training stalls. "
                    "Received: a discriminator whose last layer outputs "
                    "probabilities. Remove the final activation "
                    "(keras.layers.Dense(1))."
                )
        for name in ("metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"TapeGAN logs its own losses and takes no `{name}`. "
                    f"Received: {name}={kwargs[name]!r}. Remove it; compute "
                    "sample quality in a callback (see "
                    "fitcustom.SampleGrid)."
                )
            kwargs.pop(name, None)
        for name, value in (
            ("label_smoothing", label_smoothing),
            ("label_noise", label_noise),
        ):
            _args.number(name, value, low=0, high=1, high_open=True)
            if value and not gan_loss.uses_targets:
                raise ValueError(
                    f"The {gan_loss.name!r} loss has no targets, so "
                    f"`{name}` would be ignored. Received: {name}={value} "
                    f"with loss={gan_loss.name!r}. Remove it, or use one of "
                    + ", ".join(
                        repr(n)
                        for n, family in gan_losses.LOSSES.items()
                        if family.uses_targets
                    )
                    + "."
                )
        if label_smoothing + label_noise > 0.5:
            raise ValueError(
                "`label_smoothing + label_noise` must be at most 0.5, or "
                "some real targets would sit below fake ones. Received: "
                f"label_smoothing={label_smoothing}, "
                f"label_noise={label_noise}."
            )
        r1_gamma = _args.number(
            "r1_gamma", r1_gamma, low=0, low_open=True, none_ok=True
        )
        if gp_weight is None:
            gp_weight = 10.0 if gan_loss.gradient_penalty else 0.0
        gp_weight = _args.number("gp_weight", gp_weight, low=0)
        return r1_gamma, gp_weight

    def check_data(self, x, y=None, sample_weight=None, batch_size=None):
        """Checks real images (and labels) before any step uses them.

        Refuses labels for an unconditional GAN (they would be dropped),
        images that do not fit the discriminator, NaN or inf in the
        images, and a batch too small for `n_critic` discriminator
        updates; warns about images in [0, 255] for a generator that
        ends in tanh (these two value checks only with
        `compile(check_inputs=True)`, the default). Arrays are checked in
        memory; a dataset by its element spec.
        """
        images, labels = x, y
        if isinstance(x, tf.data.Dataset):
            spec = x.element_spec
            if isinstance(spec, tuple) and len(spec) > 1:
                images, labels = spec[0], spec[1]
            else:
                images, labels = spec, None
        elif isinstance(x, (tuple, list)) and len(x) == 2 and y is None:
            images, labels = x
        conditional = len(getattr(self.generator, "inputs", None) or []) > 1
        if labels is not None and not conditional:
            raise ValueError(
                "Labels were given, but the GAN is unconditional (its "
                "generator takes only latent vectors), so they would be "
                "ignored. Received: labels with the images. Drop them, or "
                "give both networks a label input for a conditional GAN."
            )
        d_shape = networks.input_shape(self.discriminator)
        shape = getattr(images, "shape", None)
        if shape is not None and d_shape is not None:
            if not networks.fits(tuple(shape)[1:], d_shape[1:]):
                raise ValueError(
                    "The real images do not fit the discriminator. "
                    f"Received: images of shape {tuple(shape)[1:]}. "
                    f"Expected: {tuple(d_shape[1:])}. Resize or reshape "
                    "the data, or change the discriminator's input."
                )
        checks.check_not_empty(images)
        if (
            self.compile_arguments.get("check_inputs", True)
            and checks.is_array(images)
            and not isinstance(images, tf.TypeSpec)
        ):
            checks.check_finite("images", images)
            self._warn_if_out_of_range(images)
        if (
            labels is not None
            and checks.is_array(labels)
            and not isinstance(labels, tf.TypeSpec)
        ):
            self._check_label_range(labels)
        if (
            batch_size is not None
            and batch_size < self.n_critic
            and self._slices_batch()
        ):
            raise ValueError(
                f"Each step gives each of the n_critic={self.n_critic} "
                "discriminator updates its own slice of the batch, so a "
                f"batch needs at least {self.n_critic} images. Received: "
                f"batch_size={batch_size}. Use batch_size >= n_critic "
                "(best a multiple of it), or full_batch_critic=True."
            )

    def _check_label_range(self, labels):
        """Labels feeding an Embedding must be integers in its range (out
        of range, TensorFlow fails inside the step, or a GPU silently
        reads zeros)."""
        classes = min(
            (
                networks.embedding_sizes(self.generator)
                + networks.embedding_sizes(self.discriminator)
            )
            or [None],
            key=lambda v: float("inf") if v is None else v,
        )
        if classes is None:
            return
        labels = np.asarray(labels)
        if labels.size == 0:
            return
        if labels.dtype.kind not in "iu" and not (
            labels.dtype.kind == "f" and np.all(labels == np.round(labels))
        ):
            raise ValueError(
                "Conditional labels go into an Embedding and must be "
                f"integer class ids. Received: labels of dtype {labels.dtype}. "
                "Convert them, e.g. labels.astype('int32')."
            )
        low, high = labels.min(), labels.max()
        if low < 0 or high >= classes:
            raise ValueError(
                f"Conditional labels must be class ids in [0, {classes - 1}] "
                f"(the label Embedding has input_dim={classes}). Received: "
                f"labels from {low:g} to {high:g}. Map the classes to "
                "0..n-1, or give the Embeddings a larger input_dim."
            )

    def _warn_if_out_of_range(self, images):
        images = np.asarray(images)
        if images.size == 0 or images.dtype.kind not in "biuf":
            return
        high = float(images.max())
        if networks.final_activation(self.generator) == "tanh" and high > 1.5:
            warnings.warn(
                "The generator ends in tanh (values in [-1, 1]) but the "
                f"real images go up to {high:g}: the discriminator tells "
                "them apart by their range alone. Scale the images to "
                "[-1, 1], e.g. images / 127.5 - 1.",
                stacklevel=4,
            )

    def check_fit_data(
        self, x, y, sample_weight, validation_data, batch_size=None
    ):
        if batch_size is None and checks.is_array(x):
            batch_size = min(32, len(x))  # Keras' default
        self.check_data(x, y, sample_weight, batch_size)
        self._warn_if_last_batch_skipped(x, batch_size)
        if isinstance(validation_data, tf.data.Dataset):
            self.check_data(validation_data)
        elif isinstance(validation_data, (list, tuple)) and validation_data:
            self.check_data(*validation_data[:2])

    def _warn_if_last_batch_skipped(self, x, batch_size):
        if not self._slices_batch() or not batch_size:
            return
        if not checks.is_array(x) or isinstance(x, tf.TypeSpec):
            return
        images = x[0] if isinstance(x, (tuple, list)) else x
        rest = len(images) % batch_size
        replicas = self.distribute_strategy.num_replicas_in_sync
        if 0 < rest < self.n_critic * replicas:
            warnings.warn(
                f"The last batch of each epoch has {rest} image(s), fewer "
                f"than n_critic={self.n_critic} per replica "
                f"({replicas} replica(s)), so it is skipped: {rest} "
                f"image(s) of {len(images)} are never trained on. Use a "
                "batch_size that divides the number of images, or drop "
                "the last ones.",
                stacklevel=4,
            )

    def predict(
        self, x, batch_size=None, verbose="auto", steps=None, callbacks=None
    ):
        """The discriminator's scores for images; see `keras.Model.predict`.

        To sample images, use `generate(n)`.
        """
        shape = getattr(x, "shape", None)
        d_shape = networks.input_shape(self.discriminator)
        if shape is not None and d_shape is not None:
            if not networks.fits(tuple(shape)[1:], d_shape[1:]):
                hint = (
                    " These look like latent vectors: to sample images, "
                    "call gan.generate(n)."
                    if tuple(shape)[1:] == (self.latent_dim,)
                    else ""
                )
                raise ValueError(
                    "predict() scores images with the discriminator. "
                    f"Received: x of shape {tuple(shape)}. Expected: "
                    f"images of shape {tuple(d_shape[1:])}.{hint}"
                )
        return super().predict(
            x,
            batch_size=batch_size,
            verbose=verbose,
            steps=steps,
            callbacks=callbacks,
        )

    def build_networks(self, image_shape, labels=None):
        """Builds both networks (and optimizers) and checks they fit.

        Args:
            image_shape: Shape of a batch of real images.
            labels: Optional batch of class labels (conditional GAN).

        Raises:
            ValueError: The images do not fit the discriminator, or the
                generator's output does not.
        """
        conditions = None
        if labels is not None:
            conditions = tf.zeros([1] + list(labels.shape[1:]), labels.dtype)
        z = tf.zeros([1, self.latent_dim])
        try:
            fake = self._generate(z, conditions, training=False)
        except Exception as e:
            raise ValueError(
                f"The generator cannot take latent vectors of size "
                f"{self.latent_dim}"
                + (" with labels" if conditions is not None else "")
                + f". Received: {type(e).__name__}: {e}"
            ) from e
        d_shape = networks.input_shape(self.discriminator)
        if d_shape is not None:
            expected = tuple(d_shape[1:])
            if not networks.fits(fake.shape[1:], expected):
                raise ValueError(
                    "The generator's output does not fit the "
                    f"discriminator. Received: generator output shape "
                    f"{tuple(fake.shape[1:])}. Expected: the "
                    f"discriminator's input shape {expected}."
                )
            if not networks.fits(image_shape[1:], expected):
                raise ValueError(
                    "The real images do not fit the discriminator. "
                    f"Received: images of shape {tuple(image_shape[1:])}. "
                    f"Expected: {expected}. Resize or reshape the data, or "
                    "change the discriminator's input."
                )
        try:
            self._discriminate(fake, conditions, training=False)
        except Exception as e:
            raise ValueError(
                "The generator's output does not fit the discriminator. "
                f"Received: generator output of shape {tuple(fake.shape)}"
                + (" with labels" if conditions is not None else "")
                + f"; the discriminator raised {type(e).__name__}: {e}"
            ) from e
        if not networks.fits(image_shape[1:], fake.shape[1:]):
            raise ValueError(
                "The real images do not fit the discriminator. Received: "
                f"images of shape {tuple(image_shape[1:])}. Expected: "
                f"{tuple(fake.shape[1:])}, the generator's output shape. "
                "Resize or reshape the data, or change the networks."
            )
        if self.ema_generator is not None and not self.ema_generator.built:
            self._generate(z, conditions, training=False, ema=True)
            self.ema_generator.set_weights(self.generator.get_weights())
        self._build_named_optimizers()
        self.built = True


#: The names of TapeGAN's two optimizers.
OPTIMIZER_NAMES = ("discriminator", "generator")


def two_optimizers(optimizer, d_optimizer, g_optimizer):
    """`{"discriminator": ..., "generator": ...}` from `compile()`'s
    `optimizer` dict, or from `d_optimizer` and `g_optimizer` ("adam"
    for one left out)."""
    if optimizer is None:
        return {
            "discriminator": "adam" if d_optimizer is None else d_optimizer,
            "generator": "adam" if g_optimizer is None else g_optimizer,
        }
    if not isinstance(optimizer, dict):
        raise ValueError(
            "TapeGAN has two optimizers: pass d_optimizer= and "
            "g_optimizer=, or optimizer={'discriminator': ..., "
            f"'generator': ...}}. Received: optimizer={optimizer!r}."
        )
    if d_optimizer is not None or g_optimizer is not None:
        raise ValueError(
            "Pass TapeGAN's optimizers once: optimizer={...} or "
            "d_optimizer= and g_optimizer=. Received: both."
        )
    if set(optimizer) != set(OPTIMIZER_NAMES):
        raise ValueError(
            "TapeGAN's optimizers are named 'discriminator' and "
            f"'generator'. Received: optimizer with keys {sorted(optimizer)}."
        )
    return {name: optimizer[name] for name in OPTIMIZER_NAMES}
