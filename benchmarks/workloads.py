"""Workloads of the speed benchmark: networks, data, initial weights, and
how a trained variant is scored.

Every variant of a workload trains the same architecture from the same
initial weights (`Workload.weights`) on the same in-memory arrays, batched
the same way, for the same number of steps. Each workload also holds a
fixed evaluation set on which every variant is scored, outside the timed
runs, before and after training.

Workloads: three classifiers (`mlp`, `vgg_cnn`, `cifar_cnn`), `multi_io`
(a model with two named inputs and two named outputs, a loss per output
with loss weights, accuracy on one output: dict data throughout) and
`dcgan`.

Data (`data=`):

- `"synthetic"` (default): images of the workload's shape made of a
  per-class random template (a 4x4 grid, upsampled) plus uniform noise:
  learnable, so that the losses really go down, and offline. Speed does not
  depend on the values.
- `"digits"`: scikit-learn's bundled handwritten digits (real, offline),
  resized to the workload's shape and repeated to fill the steps.
- `"keras"`: MNIST (MLP, VGG-like CNN, DCGAN) and CIFAR-10 (CIFAR CNN)
  from Keras' dataset cache (downloaded if missing and online).
"""

import keras
import numpy as np
import tensorflow as tf

from fitcustom import architectures
from fitcustom import datasets

NUM_CLASSES = 10
LATENT_DIM = 64
EVAL_SIZE = 512
GAN_EVAL_SIZE = 64
DATA_KINDS = ("synthetic", "digits", "keras")


def cifar_cnn(inputs):
    """A small CIFAR-shaped CNN: conv 16/32/64 pairs, pooling, dense 128."""
    h = inputs
    for filters in (16, 32, 64):
        for _ in range(2):
            h = keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu"
            )(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(128, activation="relu")(h)
    return keras.layers.Dense(NUM_CLASSES)(h)


# name: (body, input shape, image shape of the data, Keras dataset)
CLASSIFIERS = {
    "mlp": (architectures.mlp_body, (784,), (28, 28, 1), "mnist"),
    "vgg_cnn": (architectures.vgg_body, (28, 28, 1), (28, 28, 1), "mnist"),
    "cifar_cnn": (cifar_cnn, (32, 32, 3), (32, 32, 3), "cifar10"),
}
# Two named inputs (the image, and the mean of each of its BANDS rows of
# pixels), two named outputs (the digit, and whether it is even), a loss
# per output with weights, accuracy on the digit.
MULTI_IO = "multi_io"
BANDS = 7
LOSS_WEIGHTS = {"digit": 1.0, "even": 0.5}
WORKLOADS = (*CLASSIFIERS, MULTI_IO, "dcgan")


def multi_io_network(inputs):
    """The multi-input workload's body: a small CNN on the image and a
    dense layer on the band means, joined, then two heads (logits)."""
    h = inputs["image"]
    for filters in (16, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(
            h
        )
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    bands = keras.layers.Dense(16, activation="relu")(inputs["bands"])
    h = keras.layers.Concatenate()([h, bands])
    h = keras.layers.Dense(64, activation="relu")(h)
    return {
        "digit": keras.layers.Dense(NUM_CLASSES, name="digit")(h),
        "even": keras.layers.Dense(1, name="even")(h),
    }


def multi_io_arrays(x, y):
    """`(inputs, targets)` dicts of the multi-input workload from images
    `x` (n, 28, 28, 1) and digit labels `y`."""
    bands = x.reshape(len(x), BANDS, -1).mean(axis=-1).astype("float32")
    inputs = {"image": x, "bands": bands}
    targets = {
        "digit": y.astype("int32"),
        "even": (y % 2 == 0).astype("float32").reshape(-1, 1),
    }
    return inputs, targets


GAN_IMAGE_SHAPE = (28, 28, 1)


def dcgan_networks(seed=0):
    """A small DCGAN for 28x28x1 images in [-1, 1].

    Returns:
        `(generator, discriminator)`: latent vectors to tanh images, and
        images to one logit.
    """
    keras.utils.set_random_seed(seed)
    z = keras.Input((LATENT_DIM,))
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
    generator = keras.Model(z, out, name="generator")
    images = keras.Input(GAN_IMAGE_SHAPE)
    h = keras.layers.Conv2D(32, 4, strides=2, padding="same")(images)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Conv2D(64, 4, strides=2, padding="same")(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Flatten()(h)
    discriminator = keras.Model(
        images, keras.layers.Dense(1)(h), name="discriminator"
    )
    return generator, discriminator


def classification_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def even_loss():
    return keras.losses.BinaryCrossentropy(from_logits=True)


def synthetic_images(image_shape, n, seed=0):
    """Per-class templates plus noise, in [0, 1]; `(x, y)`."""
    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    coarse = rng.random((NUM_CLASSES, 4, 4, c), dtype=np.float32)
    templates = coarse.repeat(-(-h // 4), axis=1).repeat(-(-w // 4), axis=2)
    templates = templates[:, :h, :w]
    y = rng.integers(0, NUM_CLASSES, size=n).astype("int32")
    noise = rng.random((n, h, w, c), dtype=np.float32)
    return 0.5 * templates[y] + 0.5 * noise, y


def _resized(x, image_shape):
    h, w, c = image_shape
    out = tf.image.resize(x, (h, w)).numpy().clip(0.0, 1.0)
    if out.shape[-1] != c:
        out = np.repeat(out, c, axis=-1)
    return out.astype("float32")


def _repeat_to(x, y, n):
    index = np.arange(n) % len(x)
    return x[index], (None if y is None else y[index])


def load_images(data, image_shape, keras_name, n, seed=0):
    """Training and evaluation images of one shape, in [0, 1].

    Returns:
        `((x, y), (x_eval, y_eval), note)` with exactly `n` training
        samples (repeated when the source has fewer) and a one-line
        description of the data for the report.
    """
    if data == "synthetic":
        x, y = synthetic_images(image_shape, n + EVAL_SIZE, seed)
        note = "synthetic (per-class templates plus noise)"
        return (x[:n], y[:n]), (x[n:], y[n:]), note
    if data == "digits":
        (x, y), (x_eval, y_eval) = datasets.load_digits()
        x, x_eval = _resized(x, image_shape), _resized(x_eval, image_shape)
        note = f"scikit-learn digits resized to {image_shape}"
    elif data == "keras":
        loader = {
            "mnist": datasets.load_mnist,
            "cifar10": datasets.load_cifar10,
        }[keras_name]
        (x, y), (x_eval, y_eval) = loader()
        note = f"{keras_name} (Keras' dataset cache)"
    else:
        raise ValueError(
            f"Unknown data kind. Received: data={data!r}. Expected one of "
            f"{DATA_KINDS}."
        )
    if len(x) < n:
        note += f", {len(x)} images repeated to {n}"
    x, y = _repeat_to(x, y, n)
    return (x, y), (x_eval[:EVAL_SIZE], y_eval[:EVAL_SIZE]), note


def pipeline_options():
    """`tf.data` options of the benchmark's input pipeline: autotuning off.

    With autotuning on (TensorFlow's default), destroying an iterator at the
    end of an epoch sometimes blocks until the autotuner's next scheduled
    wake-up (10 ms after the iterator's creation, then doubling: 0.15 s,
    ..., 2.55 s, 5.11 s), so a run of 3.0 s took 3.0 s or exactly 5.11 s
    at random, in `fit()` and in the hand-written loop alike (measured on
    TensorFlow 2.21: the wait sits in the iterator's deletion). The
    pipeline here (in-memory slices, batched) has nothing to tune, and the
    stall is not part of any training step, so it is kept out of the
    timings.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


class Workload:
    """Data, initial weights and settings shared by a workload's variants.

    Args:
        name: One of `WORKLOADS`.
        steps: Training steps per timed run.
        batch: Batch size.
        jit_compile: XLA for every compiled variant.
        data: One of `DATA_KINDS`. Defaults to `"synthetic"`.
    """

    def __init__(self, name, steps, batch, jit_compile, data="synthetic"):
        if name not in WORKLOADS:
            raise ValueError(
                f"Unknown workload. Received: name={name!r}. Expected one "
                f"of {WORKLOADS}."
            )
        self.name = name
        self.steps = steps
        self.batch = batch
        self.jit_compile = jit_compile
        self.is_gan = name == "dcgan"
        n = steps * batch
        if self.is_gan:
            (x, _), (x_eval, _), note = load_images(
                data, GAN_IMAGE_SHAPE, "mnist", n
            )
            self.x, self.y = 2.0 * x - 1.0, None
            self.x_eval = 2.0 * x_eval[:GAN_EVAL_SIZE] - 1.0
            rng = np.random.default_rng(1)
            self.z_eval = rng.normal(size=(len(self.x_eval), LATENT_DIM))
            self.z_eval = self.z_eval.astype("float32")
            self.y_eval = None
            generator, discriminator = dcgan_networks()
            self.weights = (
                generator.get_weights(),
                discriminator.get_weights(),
            )
        elif name == MULTI_IO:
            (x, y), (x_eval, y_eval), note = load_images(
                data, (28, 28, 1), "mnist", n
            )
            self.x, self.y = multi_io_arrays(x, y)
            self.x_eval, self.y_eval = multi_io_arrays(x_eval, y_eval)
            self.weights = self.build_classifier(keras.Model).get_weights()
        else:
            _, shape, image_shape, keras_name = CLASSIFIERS[name]
            (x, y), (x_eval, y_eval), note = load_images(
                data, image_shape, keras_name, n
            )
            self.x = x.reshape((n, *shape))
            self.x_eval = x_eval.reshape((len(x_eval), *shape))
            self.y, self.y_eval = y, y_eval
            self.weights = self.build_classifier(keras.Model).get_weights()
        self.data_note = note
        # One input pipeline for every variant but the floor: the same
        # in-memory arrays, the same batches, built once.
        elements = self.x if self.y is None else (self.x, self.y)
        dataset = tf.data.Dataset.from_tensor_slices(elements).batch(batch)
        self.dataset = dataset.with_options(pipeline_options())

    def build_classifier(self, cls):
        """The workload's classifier as `cls(inputs, outputs)`, with the
        shared initial weights once they exist."""
        keras.utils.set_random_seed(0)
        if self.name == MULTI_IO:
            inputs = {
                "image": keras.Input((28, 28, 1), name="image"),
                "bands": keras.Input((BANDS,), name="bands"),
            }
            model = cls(inputs, multi_io_network(inputs))
        else:
            body, shape, _, _ = CLASSIFIERS[self.name]
            inputs = keras.Input(shape)
            model = cls(inputs, body(inputs))
        if hasattr(self, "weights"):
            model.set_weights(self.weights)
        return model

    def compile_arguments(self):
        """The loss and metrics `compile()` gets (a dict per output for
        the multi-input workload)."""
        if self.name == MULTI_IO:
            return dict(
                loss={"digit": classification_loss(), "even": even_loss()},
                loss_weights=dict(LOSS_WEIGHTS),
                metrics={"digit": ["accuracy"]},
            )
        return dict(loss=classification_loss(), metrics=["accuracy"])

    def loss_function(self):
        """`loss(y, outputs)` as `compile()`'s loss computes it (the
        weighted sum of the per-output means), for the hand-written
        loops."""
        if self.name != MULTI_IO:
            return classification_loss()
        digit, even = classification_loss(), even_loss()

        def loss(y, outputs):
            return LOSS_WEIGHTS["digit"] * digit(
                y["digit"], outputs["digit"]
            ) + LOSS_WEIGHTS["even"] * even(y["even"], outputs["even"])

        return loss

    def labels_and_logits(self, y, outputs):
        """The labels and logits that accuracy is measured on."""
        if self.name == MULTI_IO:
            return y["digit"], outputs["digit"]
        return y, outputs

    def build_gan(self):
        """`(generator, discriminator)` with the shared initial weights."""
        generator, discriminator = dcgan_networks()
        generator.set_weights(self.weights[0])
        discriminator.set_weights(self.weights[1])
        return generator, discriminator

    def pre_batched(self, steps):
        """The first `steps` batches as device tensors `(xs, ys)` of shape
        `(steps, batch, ...)` (`ys` is `None` for the GAN)."""
        n = steps * self.batch

        def batched(array):
            shape = (steps, self.batch, *array.shape[1:])
            return tf.constant(array[:n].reshape(shape))

        xs = tf.nest.map_structure(batched, self.x)
        if self.y is None:
            return xs, None
        return xs, tf.nest.map_structure(batched, self.y)

    def evaluate(self, networks):
        """Scores trained networks on the fixed evaluation set.

        For a classifier: cross-entropy `loss` and `accuracy`. For the GAN
        (`networks` = `(generator, discriminator)`): `loss` is the
        discriminator's loss on fixed real images and on images generated
        from fixed noise, `accuracy` its accuracy on both, plus `g_loss`.
        Inference mode throughout.
        """
        if self.is_gan:
            return _evaluate_gan(*networks, self.x_eval, self.z_eval)
        size = len(tf.nest.flatten(self.x_eval)[0])
        chunks = [
            networks(
                tf.nest.map_structure(
                    lambda a, i=i: a[i : i + 256], self.x_eval
                ),
                training=False,
            )
            for i in range(0, size, 256)
        ]
        outputs = tf.nest.map_structure(
            lambda *parts: tf.concat(parts, axis=0), *chunks
        )
        loss = self.loss_function()(self.y_eval, outputs)
        labels, logits = self.labels_and_logits(self.y_eval, outputs)
        return {
            "loss": float(loss),
            "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
        }


def _evaluate_gan(generator, discriminator, real, z):
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    fake = generator(z, training=False)
    real_logits = discriminator(real, training=False)
    fake_logits = discriminator(fake, training=False)
    ones, zeros = tf.ones_like(real_logits), tf.zeros_like(fake_logits)
    d_loss = bce(ones, real_logits) + bce(zeros, fake_logits)
    correct = tf.concat(
        [
            tf.cast(real_logits > 0, tf.float32),
            tf.cast(fake_logits < 0, tf.float32),
        ],
        axis=0,
    )
    return {
        "loss": float(d_loss),
        "accuracy": float(tf.reduce_mean(correct)),
        "g_loss": float(bce(tf.ones_like(fake_logits), fake_logits)),
    }
