"""Workloads of the speed benchmark: models, data, and the step variants.

Every variant of a workload trains the same architecture from the same
initial weights on the same in-memory data, with the same batch size,
number of steps and `jit_compile` setting. Data is synthetic (random
values of the right shape): speed does not depend on the values.
"""

import keras
import numpy as np
import tensorflow as tf

import fitcustom
from fitcustom import architectures

mlp = architectures.mlp_body
vgg_like = architectures.vgg_body


def cifar_cnn(inputs):
    h = inputs
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            h
        )
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            h
        )
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(128, activation="relu")(h)
    return keras.layers.Dense(10)(h)


CLASSIFIERS = {
    "mlp": (mlp, (784,)),
    "vgg_cnn": (vgg_like, (28, 28, 1)),
    "cifar_cnn": (cifar_cnn, (32, 32, 3)),
}


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classifier_data(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype("int32")
    return x, y


def build_classifier(name, cls, weights=None):
    body, shape = CLASSIFIERS[name]
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    model = cls(inputs, body(inputs))
    if weights is not None:
        model.set_weights(weights)
    return model


class Variant:
    """One way of running `steps` training steps; `run()` runs them once."""

    reference = False

    def __init__(self, name, steps_factor=1.0):
        self.name = name
        self.steps_factor = steps_factor

    def setup(self, workload):
        raise NotImplementedError

    def run(self):
        raise NotImplementedError

    def loss(self):
        """The training loss of the last run (mean over its steps)."""
        return float(self._last_loss)


class FitVariant(Variant):
    def __init__(self, name, cls, steps_per_execution=1):
        super().__init__(name)
        self.cls = cls
        self.spe = steps_per_execution

    def setup(self, w):
        self.model = build_classifier(w.name, self.cls, w.weights)
        kwargs = {}
        if self.cls is fitcustom.TapeClassifier:
            kwargs["check_inputs"] = True
        self.model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=loss_fn(),
            metrics=["accuracy"],
            jit_compile=w.jit_compile,
            steps_per_execution=self.spe,
            **kwargs,
        )
        self.dataset = w.dataset

    def run(self):
        history = self.model.fit(self.dataset, epochs=1, verbose=0)
        self._last_loss = history.history["loss"][-1]


class LoopVariant(Variant):
    """The seeds' hand-written loop: a GradientTape step, optionally under
    `tf.function`, over a `tf.data` pipeline of the same arrays."""

    def __init__(self, name, compiled=True, steps_factor=1.0):
        super().__init__(name, steps_factor)
        self.compiled = compiled

    def setup(self, w):
        model = build_classifier(w.name, keras.Model, w.weights)
        optimizer = keras.optimizers.Adam(1e-3)
        loss_object = loss_fn()
        self.dataset = w.dataset.take(max(1, int(w.steps * self.steps_factor)))

        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_object(y, logits) + tf.add_n(
                    [tf.zeros(())] + model.losses
                )
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        self.step = (
            tf.function(step, jit_compile=w.jit_compile)
            if self.compiled
            else step
        )

    def run(self):
        losses = [self.step(x, y) for x, y in self.dataset]
        self._last_loss = float(tf.reduce_mean(losses))


class FloorVariant(Variant):
    """All steps in one compiled graph over pre-batched on-device tensors."""

    def setup(self, w):
        model = build_classifier(w.name, keras.Model, w.weights)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        loss_object = loss_fn()
        steps = len(w.x) // w.batch
        xs = tf.constant(
            w.x[: steps * w.batch].reshape((steps, w.batch) + w.x.shape[1:])
        )
        ys = tf.constant(w.y[: steps * w.batch].reshape((steps, w.batch)))

        @tf.function(jit_compile=w.jit_compile)
        def all_steps():
            def body(i, total):
                with tf.GradientTape() as tape:
                    logits = model(xs[i], training=True)
                    loss = loss_object(ys[i], logits)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return i + 1, total + loss

            _, total = tf.while_loop(
                lambda i, _: i < steps, body, (tf.constant(0), tf.constant(0.0))
            )
            return total / steps

        self.all_steps = all_steps

    def run(self):
        self._last_loss = float(self.all_steps())


# ----------------------------------------------------------------------
# DCGAN
# ----------------------------------------------------------------------

LATENT = 64


def dcgan_networks(seed=0):
    keras.utils.set_random_seed(seed)
    z = keras.Input((LATENT,))
    h = keras.layers.Dense(7 * 7 * 64)(z)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Reshape((7, 7, 64))(h)
    h = keras.layers.Conv2DTranspose(32, 4, strides=2, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    out = keras.layers.Conv2DTranspose(
        1, 4, strides=2, padding="same", activation="tanh"
    )(h)
    generator = keras.Model(z, out)
    images = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(32, 4, strides=2, padding="same")(images)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Conv2D(64, 4, strides=2, padding="same")(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Flatten()(h)
    discriminator = keras.Model(images, keras.layers.Dense(1)(h))
    return generator, discriminator


class GANFit(Variant):
    def __init__(self, name, steps_per_execution=1):
        super().__init__(name)
        self.spe = steps_per_execution

    def setup(self, w):
        generator, discriminator = dcgan_networks()
        generator.set_weights(w.weights[0])
        discriminator.set_weights(w.weights[1])
        self.gan = fitcustom.TapeGAN(
            generator=generator,
            discriminator=discriminator,
            latent_dim=LATENT,
            simultaneous=True,
        )
        self.gan.compile(
            d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
            g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
            jit_compile=w.jit_compile,
            steps_per_execution=self.spe,
        )
        self.dataset = w.dataset

    def run(self):
        history = self.gan.fit(self.dataset, epochs=1, verbose=0)
        self._last_loss = history.history["g_loss"][-1]


def _gan_step(generator, discriminator, g_opt, d_opt, batch, seed_var):
    cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(images):
        seed = tf.stack([tf.constant(0, tf.int64), seed_var])
        noise = tf.random.stateless_normal([batch, LATENT], seed)
        seed_var.assign_add(1)
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated, training=True)
            gen_loss = cross_entropy(tf.ones_like(fake_output), fake_output)
            disc_loss = cross_entropy(
                tf.ones_like(real_output), real_output
            ) + cross_entropy(tf.zeros_like(fake_output), fake_output)
        g_grads = gen_tape.gradient(gen_loss, generator.trainable_variables)
        d_grads = disc_tape.gradient(
            disc_loss, discriminator.trainable_variables
        )
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
        d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))
        return gen_loss

    return step


class GANLoop(Variant):
    """The seeds' DCGAN step: two tapes, `tf.function` (or eager)."""

    def __init__(self, name, compiled=True, steps_factor=1.0, floor=False):
        super().__init__(name, steps_factor)
        self.compiled = compiled
        self.floor = floor

    def setup(self, w):
        generator, discriminator = dcgan_networks()
        generator.set_weights(w.weights[0])
        discriminator.set_weights(w.weights[1])
        g_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
        d_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
        g_opt.build(generator.trainable_variables)
        d_opt.build(discriminator.trainable_variables)
        self.seed_var = tf.Variable(0, dtype=tf.int64)
        step = _gan_step(
            generator, discriminator, g_opt, d_opt, w.batch, self.seed_var
        )
        n = int(len(w.x) * self.steps_factor) // w.batch
        if self.floor:
            xs = tf.constant(
                w.x[: n * w.batch].reshape((n, w.batch) + w.x.shape[1:])
            )

            @tf.function(jit_compile=w.jit_compile)
            def all_steps():
                def body(i, total):
                    return i + 1, total + step(xs[i])

                _, total = tf.while_loop(
                    lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0))
                )
                return total / n

            self.all_steps = all_steps
            return
        self.dataset = w.dataset.take(n)
        self.step = (
            tf.function(step, jit_compile=w.jit_compile)
            if self.compiled
            else step
        )

    def run(self):
        if self.floor:
            self._last_loss = float(self.all_steps())
            return
        losses = [self.step(x) for x in self.dataset]
        self._last_loss = float(tf.reduce_mean(losses))


class Workload:
    """Data, initial weights and settings shared by a workload's variants."""

    def __init__(self, name, steps, batch, jit_compile):
        self.name = name
        self.batch = batch
        self.steps = steps
        self.jit_compile = jit_compile
        n = steps * batch
        if name == "dcgan":
            rng = np.random.default_rng(0)
            self.x = rng.uniform(-1, 1, (n, 28, 28, 1)).astype("float32")
            self.y = None
            g, d = dcgan_networks()
            self.weights = (g.get_weights(), d.get_weights())
        else:
            self.x, self.y = classifier_data(CLASSIFIERS[name][1], n)
            self.weights = build_classifier(name, keras.Model).get_weights()
        # One input pipeline for every variant but the floor: the same
        # in-memory arrays, the same batches, built once.
        elements = self.x if self.y is None else (self.x, self.y)
        self.dataset = tf.data.Dataset.from_tensor_slices(elements).batch(batch)

    def variants(self, spe, eager_factor):
        if self.name == "dcgan":
            reference = GANLoop("loop_tf_function")
            reference.reference = True
            return [
                reference,
                GANLoop("loop_tf_function_repeat"),
                GANFit("fitcustom_fit"),
                GANFit(f"fitcustom_fit_spe{spe}", spe),
                GANLoop(
                    "loop_eager", compiled=False, steps_factor=eager_factor
                ),
                GANLoop("floor_while_loop", floor=True),
            ]
        reference = FitVariant("builtin_fit", keras.Model)
        reference.reference = True
        return [
            reference,
            FitVariant("builtin_fit_repeat", keras.Model),
            FitVariant("fitcustom_fit", fitcustom.TapeClassifier),
            FitVariant(f"builtin_fit_spe{spe}", keras.Model, spe),
            FitVariant(
                f"fitcustom_fit_spe{spe}", fitcustom.TapeClassifier, spe
            ),
            LoopVariant("loop_tf_function"),
            LoopVariant(
                "loop_eager", compiled=False, steps_factor=eager_factor
            ),
            FloorVariant("floor_while_loop"),
        ]
