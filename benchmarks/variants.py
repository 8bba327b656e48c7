"""The ways of running a workload's training steps that the benchmark times.

A variant builds its own copy of the networks from the workload's shared
initial weights (`setup`), runs its training steps once per call (`run`:
one epoch over the same batches), and exposes the mean training loss of its
last run (`train_loss`) and its networks for scoring (`networks`).

Classifiers: built-in `keras.Model.fit`, fitcustom's `fit()`, both with a
larger `steps_per_execution`, a hand-written GradientTape loop under
`tf.function` and in eager mode, and the floor. The loops track loss and
accuracy as `fit()` does (TensorFlow tutorial style), so that every variant
does the same work per step. GAN: built-in `fit()` of a `keras.Model`
whose `train_step` is a hand-written two-tape step (keras.io style),
fitcustom's `TapeGAN.fit`, both with a larger `steps_per_execution`, the
same step in a loop under `tf.function` and eager, and the floor; all of
them draw the same latent noise.
"""

import keras
import tensorflow as tf

import fitcustom
from benchmarks.workloads import LATENT_DIM
from benchmarks.workloads import MULTI_IO

# The classifier is TapeClassifier where it exists, else the engine itself;
# the GAN variants need TapeGAN and are skipped (with a note) without it.
TapeClassifier = getattr(fitcustom, "TapeClassifier", fitcustom.TapeModel)
TapeGAN = getattr(fitcustom, "TapeGAN", None)


def _optimizer(gan=False):
    if gan:
        return keras.optimizers.Adam(2e-4, beta_1=0.5)
    return keras.optimizers.Adam(1e-3)


class Variant:
    """One way of running a workload's steps.

    Args:
        name: Name in the report.
        steps_factor: Fraction of the workload's steps this variant runs
            (the eager loop runs fewer; times are compared per step).
    """

    reference = False

    def __init__(self, name, steps_factor=1.0):
        self.name = name
        self.steps_factor = steps_factor
        self.steps = None
        self._loss = float("nan")

    def setup(self, workload):
        self.steps = min(
            workload.steps,
            max(2, int(round(workload.steps * self.steps_factor))),
        )

    def run(self):
        raise NotImplementedError

    def train_loss(self):
        """Mean training loss over the steps of the last run."""
        return float(self._loss)

    def networks(self):
        raise NotImplementedError


def without_class_id_check(cls):
    """`cls` whose steps skip the in-step class-id check
    (`TapeModel.check_class_ids`): measures what the check costs."""

    class Unchecked(cls):
        def check_class_ids(self, y, y_pred, grads=None):
            return grads

    Unchecked.__name__ = Unchecked.__qualname__ = f"Unchecked{cls.__name__}"
    return Unchecked


class FitVariant(Variant):
    """`model.fit(dataset, epochs=1)` on a functional model of class `cls`
    (`None`: fitcustom's, `TapeClassifier` for a classifier, `TapeModel`
    for the multi-input workload); `checked=False`: fitcustom's without the
    in-step class-id check."""

    def __init__(self, name, cls=None, steps_per_execution=1, checked=True):
        super().__init__(name)
        self.cls = cls
        self.spe = steps_per_execution
        self.checked = checked

    def setup(self, w):
        super().setup(w)
        cls = self.cls
        if cls is None:
            cls = fitcustom.TapeModel if w.name == MULTI_IO else TapeClassifier
            if not self.checked:
                cls = without_class_id_check(cls)
        self.model = w.build_classifier(cls)
        self.model.compile(
            optimizer=_optimizer(),
            jit_compile=w.jit_compile,
            steps_per_execution=self.spe,
            **w.compile_arguments(),
        )
        self.dataset = w.dataset

    def run(self):
        history = self.model.fit(
            self.dataset, epochs=1, verbose=0, shuffle=False
        )
        self._loss = history.history["loss"][-1]

    def networks(self):
        return self.model


class LoopVariant(Variant):
    """A hand-written loop: a GradientTape step per batch, under `tf.function`
    (same `jit_compile`) or eager."""

    def __init__(self, name, compiled=True, steps_factor=1.0):
        super().__init__(name, steps_factor)
        self.compiled = compiled

    def setup(self, w):
        super().setup(w)
        model = w.build_classifier(keras.Model)
        optimizer = _optimizer()
        loss_object = w.loss_function()
        loss_mean = keras.metrics.Mean()
        accuracy = keras.metrics.SparseCategoricalAccuracy()

        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_object(y, logits)
                if model.losses:
                    loss += tf.add_n(model.losses)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            loss_mean.update_state(loss)
            accuracy.update_state(*w.labels_and_logits(y, logits))

        self.step = (
            tf.function(step, jit_compile=w.jit_compile)
            if self.compiled
            else step
        )
        self.metrics = (loss_mean, accuracy)
        self.model = model
        self.dataset = w.dataset.take(self.steps)

    def run(self):
        for metric in self.metrics:
            metric.reset_state()
        for x, y in self.dataset:
            self.step(x, y)
        self._loss = self.metrics[0].result()

    def networks(self):
        return self.model


class FloorVariant(Variant):
    """All steps in one compiled graph: a `tf.while_loop` over pre-batched
    tensors already on the device, with the loop's step inside."""

    def setup(self, w):
        super().setup(w)
        model = w.build_classifier(keras.Model)
        optimizer = _optimizer()
        optimizer.build(model.trainable_variables)
        loss_object = w.loss_function()
        xs, ys = w.pre_batched(self.steps)
        steps = self.steps

        def body(i, total, correct):
            x = tf.nest.map_structure(lambda t: t[i], xs)
            y = tf.nest.map_structure(lambda t: t[i], ys)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_object(y, logits)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            labels, logits = w.labels_and_logits(y, logits)
            predicted = tf.argmax(logits, -1, output_type=labels.dtype)
            hits = tf.reduce_sum(tf.cast(predicted == labels, tf.float32))
            return i + 1, total + loss, correct + hits

        @tf.function(jit_compile=w.jit_compile)
        def all_steps():
            _, total, _ = tf.while_loop(
                lambda i, *_: i < steps,
                body,
                (tf.constant(0), tf.constant(0.0), tf.constant(0.0)),
            )
            return total / steps

        self.all_steps = all_steps
        self.model = model

    def run(self):
        self._loss = self.all_steps()

    def networks(self):
        return self.model


# ----------------------------------------------------------------------
# DCGAN
# ----------------------------------------------------------------------


def latent_seed(step):
    """The stateless seed of `TapeGAN`'s latent draw at generator step
    `step` with its defaults (`seed=0`, `simultaneous=True`: stream 0, one
    replica): `fold_in` of the draw's kind (latent: 0), its stream (0) and
    the replica id (0) into `[0, step]`.

    The hand-written loops draw their noise from it, so that every GAN
    variant trains on the same noise as `TapeGAN.fit` and all of them can
    be compared on their final losses (the smoke test checks that they
    agree); it costs the loop the three `fold_in`s that `TapeGAN` does.
    """
    fold_in = tf.random.experimental.stateless_fold_in
    seed = tf.stack([tf.constant(0, tf.int64), step])
    return fold_in(fold_in(fold_in(seed, 0), 0), 0)


def built_gan_optimizers(generator, discriminator):
    """The hand-written GAN's two Adam optimizers `(g_opt, d_opt)`, built
    for the networks' trainable variables."""
    g_opt, d_opt = _optimizer(gan=True), _optimizer(gan=True)
    g_opt.build(generator.trainable_variables)
    d_opt.build(discriminator.trainable_variables)
    return g_opt, d_opt


def gan_step(generator, discriminator, g_opt, d_opt):
    """A hand-written DCGAN step: two tapes over one forward pass,
    non-saturating binary cross-entropy from logits; noise drawn
    statelessly from the generator optimizer's step count as `TapeGAN`
    draws it (`latent_seed`). The optimizers must be built.

    Returns:
        `step(images) -> (d_loss, g_loss)`.
    """
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(images):
        batch = tf.shape(images)[0]
        step_count = tf.cast(g_opt.iterations, tf.int64)
        noise = tf.random.stateless_normal(
            [batch, LATENT_DIM], latent_seed(step_count)
        )
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            generated = generator(noise, training=True)
            real = discriminator(images, training=True)
            fake = discriminator(generated, training=True)
            g_loss = bce(tf.ones_like(fake), fake)
            d_loss = bce(tf.ones_like(real), real) + bce(
                tf.zeros_like(fake), fake
            )
        d_grads = d_tape.gradient(d_loss, discriminator.trainable_variables)
        g_grads = g_tape.gradient(g_loss, generator.trainable_variables)
        d_opt.apply_gradients(zip(d_grads, discriminator.trainable_variables))
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
        return d_loss, g_loss

    return step


class TutorialGAN(keras.Model):
    """Plain `keras.Model.fit` for a GAN: a `keras.Model` whose
    `train_step` is the hand-written step (`gan_step`), as keras.io's DCGAN
    example writes one (with `training=True` and optimizers built before
    `fit()`), logging the epoch means of `d_loss` and `g_loss`."""

    def __init__(self, generator, discriminator, g_opt, d_opt):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.step = gan_step(generator, discriminator, g_opt, d_opt)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def train_step(self, data):
        d_loss, g_loss = self.step(data)
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


class GANFitVariant(Variant):
    """`gan.fit(dataset, epochs=1)` for the GAN that `make_gan` builds from
    the workload's networks."""

    def __init__(self, name, steps_per_execution=1):
        super().__init__(name)
        self.spe = steps_per_execution

    def make_gan(self, w, generator, discriminator):
        raise NotImplementedError

    def setup(self, w):
        super().setup(w)
        self.gan = self.make_gan(w, *w.build_gan())
        self.dataset = w.dataset

    def run(self):
        history = self.gan.fit(self.dataset, epochs=1, verbose=0, shuffle=False)
        self._loss = history.history["d_loss"][-1]

    def networks(self):
        return self.gan.generator, self.gan.discriminator


class GANBuiltinFit(GANFitVariant):
    """`TutorialGAN.fit`: built-in `fit()` running the hand-written step."""

    def make_gan(self, w, generator, discriminator):
        g_opt, d_opt = built_gan_optimizers(generator, discriminator)
        gan = TutorialGAN(generator, discriminator, g_opt, d_opt)
        gan.compile(
            optimizer=None,
            jit_compile=w.jit_compile,
            steps_per_execution=self.spe,
        )
        return gan


class GANFit(GANFitVariant):
    """`TapeGAN.fit`, both networks updated from one forward pass
    (`simultaneous=True`), as the hand-written step does."""

    def make_gan(self, w, generator, discriminator):
        gan = TapeGAN(
            generator=generator,
            discriminator=discriminator,
            latent_dim=LATENT_DIM,
            simultaneous=True,
        )
        gan.compile(
            d_optimizer=_optimizer(gan=True),
            g_optimizer=_optimizer(gan=True),
            loss="non_saturating",
            jit_compile=w.jit_compile,
            steps_per_execution=self.spe,
        )
        return gan


class GANLoop(Variant):
    """The hand-written DCGAN loop under `tf.function` or eager, or (with
    `floor=True`) all its steps in one `tf.while_loop` graph."""

    def __init__(self, name, compiled=True, steps_factor=1.0, floor=False):
        super().__init__(name, steps_factor)
        self.compiled = compiled
        self.floor = floor

    def setup(self, w):
        super().setup(w)
        self.generator, self.discriminator = w.build_gan()
        g_opt, d_opt = built_gan_optimizers(self.generator, self.discriminator)
        step = gan_step(self.generator, self.discriminator, g_opt, d_opt)
        self.d_mean = keras.metrics.Mean()
        if self.floor:
            xs, _ = w.pre_batched(self.steps)
            steps = self.steps

            @tf.function(jit_compile=w.jit_compile)
            def all_steps():
                def body(i, total):
                    d_loss, _ = step(xs[i])
                    return i + 1, total + d_loss

                _, total = tf.while_loop(
                    lambda i, _: i < steps,
                    body,
                    (tf.constant(0), tf.constant(0.0)),
                )
                return total / steps

            self.all_steps = all_steps
            return

        def tracked(images):
            d_loss, _ = step(images)
            self.d_mean.update_state(d_loss)

        self.step = (
            tf.function(tracked, jit_compile=w.jit_compile)
            if self.compiled
            else tracked
        )
        self.dataset = w.dataset.take(self.steps)

    def run(self):
        if self.floor:
            self._loss = self.all_steps()
            return
        self.d_mean.reset_state()
        for images in self.dataset:
            self.step(images)
        self._loss = self.d_mean.result()

    def networks(self):
        return self.generator, self.discriminator


def _with_repeat(variants, repeat):
    """`variants` with the reference's repeat in the middle: as the rounds
    rotate the order, the two timings of the reference stay about half a
    round apart, so that drift within a round shows up in the noise
    band."""
    middle = (len(variants) + 1) // 2
    return variants[:middle] + [repeat] + variants[middle:]


#: The suffix of a variant without the in-step class-id check: its
#: counterpart without the suffix is the same variant with it.
UNCHECKED = "_unchecked"


def classifier_variants(spe, eager_factor, check_cost=False):
    """The classifier variants, reference first and its repeat in the
    middle; with `check_cost`, fitcustom's `fit()` variants also without
    the in-step class-id check (named with `UNCHECKED`)."""
    reference = FitVariant("builtin_fit", keras.Model)
    reference.reference = True
    out = [reference, FitVariant("fitcustom_fit")]
    if check_cost:
        out.append(FitVariant("fitcustom_fit" + UNCHECKED, checked=False))
    if spe > 1:
        out += [
            FitVariant(f"builtin_fit_spe{spe}", keras.Model, spe),
            FitVariant(f"fitcustom_fit_spe{spe}", None, spe),
        ]
        if check_cost:
            out.append(
                FitVariant(
                    f"fitcustom_fit_spe{spe}{UNCHECKED}", None, spe, False
                )
            )
    out += [
        LoopVariant("loop_tf_function"),
        LoopVariant("loop_eager", compiled=False, steps_factor=eager_factor),
        FloorVariant("floor_while_loop"),
    ]
    return _with_repeat(out, FitVariant("builtin_fit_repeat", keras.Model))


def gan_variants(spe, eager_factor):
    """The GAN variants (reference: the hand-written loop under `tf.function`);
    without `fitcustom.TapeGAN`, the loops only."""
    reference = GANLoop("loop_tf_function")
    reference.reference = True
    out = [reference, GANBuiltinFit("builtin_fit")]
    if spe > 1:
        out.append(GANBuiltinFit(f"builtin_fit_spe{spe}", spe))
    if TapeGAN is not None:
        out.append(GANFit("fitcustom_fit"))
        if spe > 1:
            out.append(GANFit(f"fitcustom_fit_spe{spe}", spe))
    out += [
        GANLoop("loop_eager", compiled=False, steps_factor=eager_factor),
        GANLoop("floor_while_loop", floor=True),
    ]
    return _with_repeat(out, GANLoop("loop_tf_function_repeat"))
