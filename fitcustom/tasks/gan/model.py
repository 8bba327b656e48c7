"""`TapeGAN`: a generator and a discriminator trained adversarially by fit().

May import: the engine, the GAN's own modules and the ground floor.
"""

import typing

import keras
import numpy as np
import tensorflow as tf

from fitcustom import _args
from fitcustom import distribute
from fitcustom import networks
from fitcustom.distribute import run_if
from fitcustom.engine import TapeModel
from fitcustom.tasks.gan import losses as gan_losses
from fitcustom.tasks.gan.inputs import GANInputs
from fitcustom.tasks.gan.inputs import two_optimizers


class _CriticLoss(typing.NamedTuple):
    """One discriminator update's loss: its terms per image (`d_loss`,
    and the penalties by name), the penalties' weights, and the scores of
    the fake images."""

    terms: dict
    weights: dict
    fake_logits: tf.Tensor


# What a stateless draw is for; folded into the step's seed with the index
# of the draw within the step, so no two draws of a run share a seed.
_LATENT, _TARGETS, _INTERPOLATION = 0, 1, 2


@keras.saving.register_keras_serializable(package="fitcustom")
class TapeGAN(GANInputs, TapeModel):
    """A GAN trained with `compile()` / `fit(real_images)`.

    Each step runs `n_critic` discriminator updates, each on its own slice
    of the real batch (update `k` uses images `k, k + n_critic,
    k + 2 * n_critic, ...`: `batch_size // n_critic` images; make
    `batch_size` a multiple of `n_critic` times the number of replicas, or
    the remainder is not used), then one generator update on as many latent
    vectors (with the labels of the first slice when conditional). A batch
    with fewer than `n_critic` images on some replica (a dataset's short
    last batch) is skipped: no update, nothing logged. With
    `full_batch_critic=True` every update uses the whole batch instead.
    With
    `simultaneous=True` (and `n_critic=1`) both networks are updated from
    one forward pass, as in TensorFlow's DCGAN tutorial. Both networks are
    called with `training=True`. Losses are reduced per replica and divided
    by the number of replicas, like Keras' own; both optimizers get loss
    scaling under `mixed_float16`. The step reuses the engine's pieces, so
    `gradient_transforms`, `log_gradient_norm` and `skip_nonfinite` apply
    to both networks.

    Randomness (latent vectors, label noise, the gradient penalty's
    interpolation weights) is drawn with stateless RNG from `seed`, the
    step (the generator optimizer's `iterations`), what the draw is for and
    the replica id: replicas draw different noise, and a model restored by
    `BackupAndRestore` or `load_model` continues with exactly the noise the
    uninterrupted run would have drawn (the RNG state is the optimizer
    state, saved with it). Override `sample_latent` (and
    `interpolation_weights`) to feed noise yourself.

    When the data is `(images, labels)`, the GAN is conditional: the
    generator is called on `[z, labels]` and the discriminator on
    `[images, labels]`.

    Logged (epoch means over the samples seen): `d_loss` (without
    penalties), `g_loss`, `gradient_penalty` / `r1_penalty` when used, and
    `loss` = `d_loss + g_loss` (per step, the mean of its discriminator
    losses plus its generator loss). `loss` is no quantity any network
    minimises; it is there so that `TerminateOnNaN` (which reads `loss`)
    stops a run as soon as either loss is NaN, and as a default `monitor`.
    Monitor `g_loss` or `d_loss` for `EarlyStopping` / `ModelCheckpoint`.

    `evaluate()` reports `d_loss`, `g_loss` and `loss` on held-out images
    with both networks in inference mode, fixed latent vectors and no
    label noise, and updates nothing. `call()` (hence `predict()`) returns
    the discriminator's scores for images (`[images, labels]` when
    conditional); `generate()` samples images.

    Args:
        generator: `keras.Model` mapping `latent_dim` vectors (and labels)
            to images.
        discriminator: `keras.Model` mapping images (and labels) to one
            logit (or score) per image.
        latent_dim: Size of the latent vectors.
        n_critic: Discriminator updates per generator update. Defaults
            to 1.
        ema_decay: If set (e.g. 0.999), keep an exponential moving average
            of the generator's weights (`ema_generator`), used by
            `generate()`: it starts equal to the generator, the first
            generator update copies the weights, each later one applies
            `ema = ema_decay * ema + (1 - ema_decay) * weights`, and a step
            skipped by `skip_nonfinite` leaves it alone. Defaults to `None`.
        simultaneous: Update both networks from the same forward pass.
            Defaults to `False`.
        seed: Base seed of the latent noise. Defaults to 0.
        full_batch_critic: Every discriminator update of a step uses the
            whole real batch, as keras.io's WGAN-GP example does. Defaults
            to `False`: with `n_critic > 1` the batch is split into
            `n_critic` interleaved slices, one per update, so that each
            real image is used once per step.
        joint_discriminator_call: Run the discriminator once per update on
            `concat([fake, real])`, as keras.io's DCGAN example does, in
            place of one call on the real and one on the fake images. It
            matters with BatchNormalization in the discriminator: its
            batch statistics then cover both halves. Defaults to `False`.

    Example:

    ```python
    import keras
    import numpy as np
    import fitcustom

    generator = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
        keras.layers.Reshape((4, 4, 1))])
    discriminator = keras.Sequential([
        keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    gan = fitcustom.TapeGAN(generator=generator,
                            discriminator=discriminator, latent_dim=8)
    gan.compile(d_optimizer=keras.optimizers.Adam(2e-4),
                g_optimizer=keras.optimizers.Adam(2e-4))
    real = np.random.uniform(-1, 1, (64, 4, 4, 1)).astype("float32")
    history = gan.fit(real, batch_size=16, epochs=1, verbose=0)
    samples = gan.generate(4, seed=1)  # the same for the same seed
    ```
    """

    config_models = ("generator", "discriminator")
    config_values = (
        "latent_dim",
        "n_critic",
        "ema_decay",
        "simultaneous",
        "seed",
        "full_batch_critic",
        "joint_discriminator_call",
    )

    def __init__(
        self,
        generator,
        discriminator,
        latent_dim: int,
        n_critic: int = 1,
        ema_decay: float | None = None,
        simultaneous: bool = False,
        seed: int = 0,
        full_batch_critic: bool = False,
        joint_discriminator_call: bool = False,
        **kwargs,
    ):
        _args.model("generator", generator)
        _args.model("discriminator", discriminator)
        latent_dim = _args.whole("latent_dim", latent_dim)
        n_critic = _args.whole("n_critic", n_critic)
        ema_decay = _args.number(
            "ema_decay",
            ema_decay,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
            none_ok=True,
        )
        _args.boolean("simultaneous", simultaneous)
        _args.boolean("full_batch_critic", full_batch_critic)
        _args.boolean("joint_discriminator_call", joint_discriminator_call)
        if simultaneous and n_critic != 1:
            raise ValueError(
                "`simultaneous=True` updates both networks from one forward "
                f"pass and needs n_critic=1. Received: n_critic={n_critic}."
            )
        outputs = getattr(discriminator, "outputs", None)
        if outputs:
            width = tuple(outputs[0].shape[1:])
            if len(outputs) != 1 or (width and networks.prod(width) != 1):
                raise ValueError(
                    "The discriminator must give one score (a logit) per "
                    f"image. Received: {len(outputs)} output(s), the first "
                    f"of shape {width}. End it with keras.layers.Dense(1) "
                    "(no activation)."
                )
        kwargs.setdefault("name", "tape_gan")
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.n_critic = n_critic
        self.ema_decay = ema_decay
        self.simultaneous = bool(simultaneous)
        self.seed = _args.integer("seed", seed)
        self.full_batch_critic = full_batch_critic
        self.joint_discriminator_call = joint_discriminator_call
        self.ema_generator = None
        if ema_decay is not None:
            # Follows the generator optimizer's updates (follow_emas).
            try:
                self.ema_generator = self.track_ema(
                    generator, ema_decay, optimizer="generator"
                )
            except ValueError as e:
                raise ValueError(
                    "`ema_decay` needs a generator that keras.models."
                    "clone_model can copy (functional or Sequential). "
                    f"Received: {type(generator).__name__}: {e}"
                ) from e
        self.d_optimizer = None
        self.g_optimizer = None
        self.gan_loss = gan_losses.get("non_saturating")

    def _may_skip_steps(self):
        # A batch smaller than n_critic is skipped (see train_step).
        return super()._may_skip_steps() or self._slices_batch()

    def _slices_batch(self):
        """Whether each discriminator update takes its own slice of the
        batch (then a batch too small for them is skipped)."""
        return (
            self.n_critic > 1
            and not self.simultaneous
            and not self.full_batch_critic
        )

    def call(self, inputs, training=None):
        """The discriminator's scores for `inputs` (images, or
        `[images, labels]` for a conditional GAN)."""
        return self.discriminator(inputs, training=training)

    # ------------------------------------------------------------------
    # compile and building
    # ------------------------------------------------------------------

    def compile(
        self,
        d_optimizer=None,
        g_optimizer=None,
        loss="non_saturating",
        *,
        gp_weight: float | None = None,
        r1_gamma: float | None = None,
        label_smoothing: float = 0.0,
        label_noise: float = 0.0,
        check_inputs: bool = True,
        optimizer=None,
        **kwargs,
    ):
        """Configures adversarial training.

        Args:
            d_optimizer: Discriminator optimizer (name or instance).
                Defaults to `None`: `"adam"`.
            g_optimizer: Generator optimizer. Defaults to `None`:
                `"adam"`.
            loss: Loss family: one of `fitcustom.gan_losses.LOSSES`
                (`"non_saturating"`, `"minimax"`, `"wasserstein"`,
                `"hinge"`, `"least_squares"`), or a `gan_losses.GANLoss`
                of your own (register its class with
                `keras.saving.register_keras_serializable` so that a saved
                GAN loads compiled). Defaults to `"non_saturating"`.
            gp_weight: Weight of the gradient penalty
                `(||grad D(x_hat)||_2 - 1)^2` on points `x_hat` between real
                and fake images (interpolation weight uniform in [0, 1]).
                Defaults to `None`: 10 for `"wasserstein"`, 0 (off) for the
                other families; any value > 0 adds it to any family.
            r1_gamma: If set, adds `r1_gamma / 2 * ||grad D(real)||^2` to
                the discriminator loss. Defaults to `None`.
            label_smoothing: Real-image target `1 - label_smoothing` for
                the discriminator. Only for the families with targets
                (`non_saturating`, `minimax`, `least_squares`). Defaults
                to 0.
            label_noise: Moves the discriminator's targets towards the
                other class by `label_noise * U[0, 1]` (real targets down,
                fake targets up, so they stay in [0, 1]), drawn anew for
                every discriminator update (the scripts use 0.05). Same
                families as `label_smoothing`; `label_smoothing +
                label_noise` must be at most 0.5. Defaults to 0.
            check_inputs: Check the values of in-memory images before
                `fit()` / `evaluate()` (NaN or inf refused, a range that
                does not match a tanh generator warned about). Defaults to
                `True`; turn it off to feed non-finite batches on purpose
                (with `skip_nonfinite=True`).
            optimizer: The two optimizers by name, as any
                `fitcustom.TapeModel` takes them: `{"discriminator": ...,
                "generator": ...}`, in place of `d_optimizer` and
                `g_optimizer`. Defaults to `None`. Either way they are
                the model's named optimizers (`gan.optimizers`,
                `gan.get_optimizer("generator")`, `minimize(...,
                optimizer="generator")` in a step of your own), also
                reachable as `d_optimizer` and `g_optimizer`.
            **kwargs: `fitcustom.TapeModel.compile` options
                (`gradient_transforms`, `skip_nonfinite`, `run_eagerly`,
                `steps_per_execution`, `jit_compile`, ...).
        """
        _args.boolean("check_inputs", check_inputs)
        optimizers = two_optimizers(optimizer, d_optimizer, g_optimizer)
        gan_loss = gan_losses.get(loss)
        r1_gamma, gp_weight = self._check_compile_arguments(
            gan_loss, label_smoothing, label_noise, r1_gamma, gp_weight, kwargs
        )
        # Named optimizers of the engine (resolved, wrapped for loss
        # scaling, checked against the transforms, built on the networks'
        # weights). Kept as `d_optimizer` and `g_optimizer`, in that
        # order: Keras saves their state under the compile arguments
        # (`compile_arguments/adam`, `.../adam_1`), where files saved
        # before have it.
        super().compile(optimizer=optimizers, loss=None, **kwargs)
        self._forget_compile_argument("optimizer")
        self.d_optimizer = self.get_optimizer("discriminator")
        self.g_optimizer = self.get_optimizer("generator")
        self.gan_loss = gan_loss
        self.keep_compile_arguments(
            d_optimizer=self.d_optimizer,
            g_optimizer=self.g_optimizer,
            # Built-in families by name, others as serialized objects.
            loss=(
                gan_loss.name
                if gan_losses.LOSSES.get(gan_loss.name) is type(gan_loss)
                else gan_loss
            ),
            gp_weight=gp_weight,
            r1_gamma=r1_gamma,
            label_smoothing=float(label_smoothing),
            label_noise=float(label_noise),
            check_inputs=check_inputs,
        )

    def _needs_build(self):
        optimizer = self.d_optimizer
        return not (self.built and optimizer is not None and optimizer.built)

    def build_from_batch(self, batch):
        images, labels, _ = self.unpack_data(batch)
        self.build_networks(images.shape, labels)

    # ------------------------------------------------------------------
    # Pieces
    # ------------------------------------------------------------------

    def _seed(self, kind, index):
        """Stateless seed of one draw: (seed, step, kind, index, replica)."""
        step = tf.cast(self.g_optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.seed, tf.int64), step])
        fold_in = tf.random.experimental.stateless_fold_in
        seed = fold_in(fold_in(seed, kind), index)
        return fold_in(seed, distribute.replica_id())

    def sample_latent(self, batch_size, stream):
        """Latent vectors for one draw of a step (override to feed noise).

        Standard normal, from a stateless seed of (`seed`, step, `stream`,
        replica id): different on every replica and reproducible after a
        restore.

        Args:
            batch_size: Number of vectors (this replica's).
            stream: Index of the draw within the step: `0..n_critic - 1`
                for the discriminator updates, `n_critic` for the
                generator update (0 for both with `simultaneous=True`).

        Returns:
            float32 tensor of shape `(batch_size, latent_dim)`.
        """
        return tf.random.stateless_normal(
            [batch_size, self.latent_dim], self._seed(_LATENT, stream)
        )

    def interpolation_weights(self, batch_size, index):
        """Weights `eps ~ U[0, 1]` of the gradient penalty's points
        `eps * real + (1 - eps) * fake`, one per example (override to feed).

        Args:
            batch_size: Number of weights (this replica's).
            index: Index of the discriminator update within the step.

        Returns:
            float32 tensor of shape `(batch_size,)`.
        """
        return tf.random.stateless_uniform(
            [batch_size], self._seed(_INTERPOLATION, index)
        )

    def _generate(self, z, conditions, training, ema=False):
        net = self.ema_generator if ema else self.generator
        inputs = z if conditions is None else [z, conditions]
        return net(inputs, training=training)

    def _discriminate(self, images, conditions, training):
        inputs = images if conditions is None else [images, conditions]
        return self.discriminator(inputs, training=training)

    def _discriminate_both(self, real, fake, conditions, training=True):
        """`(real_logits, fake_logits)`: two calls, or in a training update
        one on `concat([fake, real])` (`joint_discriminator_call`)."""
        if not (self.joint_discriminator_call and training):
            return (
                self._discriminate(real, conditions, training=training),
                self._discriminate(fake, conditions, training=training),
            )
        images = tf.concat([tf.cast(fake, real.dtype), real], axis=0)
        both = None
        if conditions is not None:
            both = tf.concat([conditions, conditions], axis=0)
        logits = self._discriminate(images, both, training=True)
        n = tf.shape(fake)[0]
        return logits[n:], logits[:n]

    def _targets(self, batch_size, index, noisy=True):
        """`(real, fake)` targets: smoothed, and in training noisy."""
        args = self.compile_arguments
        real = tf.fill([batch_size, 1], 1.0 - args.get("label_smoothing", 0))
        fake = tf.zeros([batch_size, 1])
        noise = args.get("label_noise", 0.0)
        if noise and noisy:
            seed = self._seed(_TARGETS, index)
            u = tf.random.stateless_uniform([2, batch_size, 1], seed)
            # Towards the other class, so targets stay in [0, 1] (above 1
            # the cross-entropy on logits has no lower bound).
            real = real - noise * u[0]
            fake = fake + noise * u[1]
        return real, fake

    def _critic_loss(self, real, fake, conditions, index, training=True):
        """The terms of one discriminator update (`_CriticLoss`); with
        `training=False` (`evaluate()`) the networks run in inference
        mode, the targets have no label noise and the penalties (training
        regularisers) are left out."""
        args = self.compile_arguments if training else {}
        batch = tf.shape(real)[0]
        real_logits, fake_logits = self._discriminate_both(
            real, fake, conditions, training
        )
        real_t, fake_t = self._targets(batch, index, noisy=training)
        terms = {
            "d_loss": self.gan_loss.discriminator(
                real_logits, fake_logits, real_t, fake_t
            )
        }
        weights = {}
        if args.get("gp_weight"):
            terms["gradient_penalty"] = gan_losses.gradient_penalty(
                self.discriminator,
                real,
                fake,
                self.interpolation_weights(batch, index),
                conditions,
            )
            weights["gradient_penalty"] = args["gp_weight"]
        if args.get("r1_gamma"):
            terms["r1_penalty"] = gan_losses.r1_penalty(
                self.discriminator, real, conditions
            )
            weights["r1_penalty"] = 0.5 * args["r1_gamma"]
        return _CriticLoss(terms, weights, fake_logits)

    def _logged(self):
        """The names this model's steps log."""
        names = ["d_loss", "g_loss"]
        if self.compile_arguments.get("gp_weight"):
            names.append("gradient_penalty")
        if self.compile_arguments.get("r1_gamma"):
            names.append("r1_penalty")
        return names

    def _build_named_optimizers(self):
        super()._build_named_optimizers()
        # Created before the step (a step part under a condition runs in
        # threads of its own on several replicas).
        self.create_logs(self._logged())

    # ------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------

    def train_step(self, data):
        real, conditions, _ = self.unpack_data(data)
        if self.d_optimizer is None:
            self._require_compiled("fit")
        if self.simultaneous:
            self._simultaneous_step(real, conditions)
        elif self.n_critic == 1 or self.full_batch_critic:
            self._alternating_step(real, conditions)
        else:
            # A batch too small to give every discriminator update an
            # image (the short last batch of a dataset) is skipped as a
            # whole: on empty slices the forward passes would put NaN
            # into BatchNormalization's statistics and the optimizers
            # would still move the weights by their momentum.
            full = distribute.all_true(tf.shape(real)[0] >= self.n_critic)
            run_if(full, self._guarded_step, real, conditions)
            self._note_logged(self._logged())
        return self.get_metrics_result()

    def _guarded_step(self, real, conditions):
        # Values made under a condition stay in its branch: the step's
        # `loss` log is added there.
        self._run_in_context(self._alternating_step, real, real, conditions)

    def _simultaneous_step(self, real, conditions):
        """Both networks updated from one forward pass."""
        z = self.sample_latent(tf.shape(real)[0], 0)
        with tf.GradientTape() as d_tape, tf.GradientTape() as g_tape:
            fake = self._generate(z, conditions, training=True)
            critic = self._critic_loss(real, fake, conditions, 0)
            g_terms = {"g_loss": self.gan_loss.generator(critic.fake_logits)}
            with g_tape.stop_recording():
                self._update_discriminator(d_tape, critic)
            with d_tape.stop_recording():
                self.minimize(g_tape, g_terms, optimizer="generator")

    def _alternating_step(self, real, conditions):
        """`n_critic` discriminator updates, then one generator update."""
        n = self.n_critic
        m = tf.shape(real)[0] // n
        if self.full_batch_critic:
            m = tf.shape(real)[0]
        for k in range(n):
            # Strided slices: update k uses images k, k + n, k + 2n... of
            # the batch, so N replicas (each with a contiguous part of the
            # global batch) use the same images as one device.
            real_k, cond_k = real, conditions
            if not self.full_batch_critic:
                real_k = real[k : m * n : n]
                if conditions is not None:
                    cond_k = conditions[k : m * n : n]
            z = self.sample_latent(m, k)
            with tf.GradientTape() as tape:
                fake = self._generate(z, cond_k, training=True)
                critic = self._critic_loss(real_k, fake, cond_k, k)
                self._update_discriminator(tape, critic, batch_size=m)
        cond_g = conditions
        if conditions is not None and not self.full_batch_critic:
            cond_g = conditions[0 : m * n : n]
        z = self.sample_latent(m, n)
        with tf.GradientTape() as tape:
            fake = self._generate(z, cond_g, training=True)
            fake_logits = self._discriminate(fake, cond_g, True)
            terms = {"g_loss": self.gan_loss.generator(fake_logits)}
            self.minimize(tape, terms, optimizer="generator", batch_size=m)

    def _update_discriminator(self, tape, critic, batch_size=None):
        """`minimize` of a discriminator update: its penalties weighted,
        logged unweighted."""
        self.minimize(
            tape,
            critic.terms,
            optimizer="discriminator",
            loss_weights=critic.weights,
            batch_size=batch_size,
        )

    def evaluation_latent(self, images):
        """The latent vectors `evaluate()` pairs with real images: one per
        image, drawn from a seed made of `seed` and the image's content.

        Keyed to the image, not to its batch or replica, so `evaluate()`
        gives the same numbers for any `batch_size` and number of
        replicas, and on every run.

        Args:
            images: A batch of real images.

        Returns:
            float32 tensor of shape `(batch, latent_dim)`.
        """
        flat = tf.reshape(
            tf.cast(images, tf.float32), [tf.shape(images)[0], -1]
        )
        bits = tf.cast(tf.bitcast(flat, tf.int32), tf.int64)
        # An exact integer hash of each row (no rounding, so the same for
        # any batch layout): a weighted sum of its bits modulo a prime.
        prime = tf.constant(2147483647, tf.int64)
        position = tf.range(tf.shape(flat)[1], dtype=tf.int64)
        weights = tf.math.floormod(position * 2654435761, 65521) + 1
        terms = tf.math.floormod(bits * weights[None, :], prime)
        keys = tf.math.floormod(tf.reduce_sum(terms, axis=1), prime)
        base = tf.constant(self.seed, tf.int64)

        def draw(key):
            return tf.random.stateless_normal(
                [self.latent_dim], tf.stack([base, key])
            )

        return tf.map_fn(draw, keys, fn_output_signature=tf.float32)

    def test_step(self, data):
        """`evaluate()`: `d_loss`, `g_loss` and `loss` on held-out images,
        updating nothing. Each image is paired with latent vectors keyed to
        its content (`evaluation_latent`), so evaluations agree for any
        batch size; no label noise, and the penalties (training
        regularisers) are not computed: `loss` is `d_loss + g_loss` plus
        the networks' regularization losses."""
        real, conditions, _ = self.unpack_data(data)
        z = self.evaluation_latent(real)
        fake = self._generate(z, conditions, training=False)
        critic = self._critic_loss(real, fake, conditions, 0, training=False)
        self.log_loss(critic.terms, optimizer="discriminator")
        g_loss = self.gan_loss.generator(critic.fake_logits)
        self.log_loss({"g_loss": g_loss}, optimizer="generator")
        return {}

    # ------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------

    def generate(self, n: int, seed: int = 0, labels=None, use_ema=True):
        """`n` samples from the latent seed `seed` (same seed, same samples).

        Args:
            n: Number of samples.
            seed: Seed of the latent vectors. Defaults to 0.
            labels: Class labels for a conditional GAN (length `n`).
            use_ema: Use the EMA generator when there is one. Defaults to
                `True`.

        Returns:
            A NumPy array of `n` generated images.
        """
        n = _args.whole("n", n)
        _args.integer("seed", seed)
        inputs = getattr(self.generator, "inputs", None) or []
        if labels is None and len(inputs) > 1:
            raise ValueError(
                "The generator takes labels (a conditional GAN): pass "
                f"`labels=` with one class label per sample. Received: "
                f"labels=None for n={n}."
            )
        if labels is not None and len(inputs) < 2:
            raise ValueError(
                "`labels` were given, but the GAN is unconditional (its "
                "generator takes only latent vectors). Received: labels of "
                f"length {len(labels)}. Drop `labels=`."
            )
        conditions = None
        if labels is not None:
            self._check_label_range(labels)
            conditions = tf.convert_to_tensor(labels)
            if conditions.shape.rank == 0 or conditions.shape[0] != n:
                raise ValueError(
                    "`labels` must hold one label per sample. Received: "
                    f"labels of shape {tuple(conditions.shape)} for n={n}."
                )
        z = tf.random.stateless_normal(
            [n, self.latent_dim], tf.constant([int(seed), 0], tf.int64)
        )
        ema = use_ema and self.ema_generator is not None
        out = self._generate(z, conditions, training=False, ema=ema)
        return np.asarray(keras.ops.convert_to_numpy(out), dtype="float32")
