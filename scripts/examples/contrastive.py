"""Contrastive pretraining on the digits, offline (SimCLR-style): an
encoder learns from two augmented views of each image, each view's
positive its twin and its negatives every other image of the *global*
batch; a linear probe on the (frozen) representation learns the labels
at the same time, with an optimizer of its own.

Writes under --output-dir: the model (`contrastive.keras`), the per-epoch
log (`history.csv`), the curves of the contrastive loss and of the
probe's accuracy on training and held-out digits (`curves.png`), and the
final numbers (`summary.json`).

Usage: python -m scripts.examples.contrastive --output-dir outputs/contrastive
"""

import os

import keras
import tensorflow as tf

import fitcustom
from fitcustom import distribute
from fitcustom.datasets import load_digits
from scripts._common import add_example_arguments
from scripts._common import add_run_arguments
from scripts._common import final_values
from scripts._common import finish_run
from scripts._common import make_parser
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import save_curves
from scripts._common import start_run


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.examples.contrastive")
    add_example_arguments(parser, epochs=60, batch_size=128)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.2,
        help="of the contrastive loss's softmax",
    )
    add_run_arguments(parser, "seed of the weights and the augmentations")
    return parser.parse_args(argv)


@keras.saving.register_keras_serializable(package="fitcustom_examples")
class Contrastive(fitcustom.TapeModel):
    """An encoder and projection head trained with a contrastive loss
    (optimizer `"contrastive"`), and a linear probe trained on the labels
    over the encoder's stopped representation (optimizer `"probe"`).
    `call()` (so `predict()`) gives the probe's class logits."""

    config_models = ("encoder", "projection", "probe")
    config_values = ("temperature", "noise_seed")

    def __init__(
        self,
        encoder,
        projection,
        probe,
        temperature=0.2,
        noise_seed=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projection = projection
        self.probe = probe
        self.temperature = temperature
        self.noise_seed = noise_seed

    def call(self, images, training=False):
        return self.probe(self.encoder(images, training=training))

    def optimizer_variables(self, name):
        if name == "contrastive":
            return (
                self.encoder.trainable_weights
                + self.projection.trainable_weights
            )
        return super().optimizer_variables(name)  # "probe": self.probe

    def augment(self, images, stream):
        """A view of each image: shifted by up to one pixel, its contrast
        scaled and pixel noise added (a draw of its own per `stream`)."""
        n = tf.shape(images)[0]
        noise = self.normal_noise([n, 3 + 8 * 8], stream)
        images = tf.cast(images, noise.dtype)  # float16 under mixed precision
        uniform = 0.5 * (1.0 + tf.math.erf(noise[:, :2] / 2**0.5))
        shifts = tf.cast(tf.floor(uniform * 3.0), tf.int32) - 1
        padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]])
        rows = tf.range(8)[None, :] + 1 + shifts[:, :1]
        cols = tf.range(8)[None, :] + 1 + shifts[:, 1:]
        view = tf.gather(padded, rows, axis=1, batch_dims=1)
        view = tf.gather(view, cols, axis=2, batch_dims=1)
        contrast = tf.exp(0.2 * noise[:, 2])[:, None, None, None]
        pixels = tf.reshape(noise[:, 3:], tf.shape(images))
        return view * contrast + 0.1 * pixels

    def gather(self, *views):
        """Every replica's projections of each view (the global batch's: a
        view's negatives are all the others) and where this replica's rows
        are in them."""
        rows = distribute.local_rows(tf.shape(views[0])[0])
        return [distribute.all_gather(v) for v in views], rows

    def contrastive_loss(self, a, b):
        """NT-Xent, one value per image: each view against its twin
        (positive) and every other view of the global batch."""
        a = tf.math.l2_normalize(tf.cast(a, tf.float32), axis=1)
        b = tf.math.l2_normalize(tf.cast(b, tf.float32), axis=1)
        (all_a, all_b), own = self.gather(a, b)
        total = tf.shape(all_a)[0]
        self_mask = tf.one_hot(own, total) * 1e9

        def side(x, all_x, all_y):
            twins = tf.matmul(x, all_y, transpose_b=True) / self.temperature
            same = tf.matmul(x, all_x, transpose_b=True) / self.temperature
            logits = tf.concat([twins, same - self_mask], axis=1)
            return tf.nn.sparse_softmax_cross_entropy_with_logits(own, logits)

        return 0.5 * (side(a, all_a, all_b) + side(b, all_b, all_a))

    def probe_terms(self, features, labels):
        logits = tf.cast(self.probe(tf.stop_gradient(features)), tf.float32)
        labels = tf.cast(labels, tf.int32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        right = tf.cast(
            tf.equal(tf.argmax(logits, 1, tf.int32), labels), tf.float32
        )
        return loss, right

    def train_step(self, data):
        images, labels, _ = self.unpack_data(data)
        with tf.GradientTape(persistent=True) as tape:
            one, two = self.augment(images, 0), self.augment(images, 1)
            h_one = self.encoder(one, training=True)
            h_two = self.encoder(two, training=True)
            loss = self.contrastive_loss(
                self.projection(h_one, training=True),
                self.projection(h_two, training=True),
            )
            probe_loss, right = self.probe_terms(h_one, labels)
            self.minimize(
                tape, {"contrastive_loss": loss}, optimizer="contrastive"
            )
            self.minimize(tape, {"probe_loss": probe_loss}, optimizer="probe")
        self.log_mean("probe_accuracy", right)

    def test_step(self, data):
        images, labels, _ = self.unpack_data(data)
        probe_loss, right = self.probe_terms(self.encoder(images), labels)
        self.log_loss({"probe_loss": probe_loss})
        self.log_mean("probe_accuracy", right)


def build_contrastive(width=128, features=64, projected=32, **kwargs):
    """An uncompiled `Contrastive` with dense networks for 8x8 images."""
    images = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(images)
    h = keras.layers.Dense(width, activation="relu")(h)
    h = keras.layers.Dense(features, activation="relu")(h)
    encoder = keras.Model(images, h, name="encoder")
    f = keras.Input((features,))
    h = keras.layers.Dense(width, activation="relu")(f)
    projection = keras.Model(
        f, keras.layers.Dense(projected)(h), name="projection"
    )
    f = keras.Input((features,))
    probe = keras.Model(f, keras.layers.Dense(10)(f), name="probe")
    return Contrastive(encoder, projection, probe, **kwargs)


#: What a run writes in --output-dir (removed by --overwrite).
OUTPUTS = ["history.csv", "contrastive.keras", "curves.png"]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    start_run(args.output_dir, args.overwrite, OUTPUTS)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits()
    epochs = args.epochs
    if args.smoke:
        x_train, y_train, epochs = x_train[:256], y_train[:256], 2
        x_test, y_test = x_test[:64], y_test[:64]
    model = build_contrastive(
        temperature=args.temperature, noise_seed=args.seed
    )
    model.compile(
        optimizer={
            "contrastive": keras.optimizers.Adam(1e-3),
            "probe": keras.optimizers.Adam(1e-2),
        }
    )
    out = args.output_dir
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=epochs,
        validation_data=(x_test, y_test),
        verbose=args.verbose,
        callbacks=[
            keras.callbacks.CSVLogger(
                os.path.join(out, "history.csv"), append=True
            ),
            fitcustom.BackupAndRestore(
                os.path.join(out, "backup"), delete_checkpoint=False
            ),
        ],
    )
    model.save(os.path.join(out, "contrastive.keras"))
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["contrastive_loss", "probe_accuracy", "probe_loss"],
        "Contrastive pretraining with a linear probe (digits)",
        labels={
            "contrastive_loss": "contrastive loss (NT-Xent)",
            "probe_accuracy": "linear probe accuracy",
            "probe_loss": "linear probe loss (cross-entropy)",
        },
    )
    last = final_values(history)
    finish_run(out, {"epochs": epochs, "final": last})
    print(
        f"linear probe accuracy on held-out digits "
        f"{last['val_probe_accuracy']:.3f} (training "
        f"{last['probe_accuracy']:.3f}); pictures in {out}"
    )
    return last


if __name__ == "__main__":
    main()
