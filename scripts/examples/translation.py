"""Unpaired image translation on the digits, offline (CycleGAN-style):
two generators translate between two domains, two patch discriminators
judge each domain, four optimizers, and cycle and identity terms keep the
translations faithful. Domain A is the digits; domain B is other digits,
turned a quarter and with their colours inverted: the translation to learn
is that transformation, never shown as pairs.

Writes under --output-dir: the model (`translation.keras`), the per-epoch
log (`history.csv`), the loss curves (`curves.png`), a picture of held-out
images of both domains and their translations (`translations.png`), and
the final numbers (`summary.json`), with the translation error against
the true transformation.

Usage: python -m scripts.examples.translation --output-dir outputs/translation
"""

import os

import keras
import numpy as np
import tensorflow as tf

import fitcustom
from fitcustom.datasets import load_digits
from scripts._common import add_example_arguments
from scripts._common import add_run_arguments
from scripts._common import final_values
from scripts._common import finish_run
from scripts._common import make_parser
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import save_curves
from scripts._common import save_image_rows
from scripts._common import start_run


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.examples.translation")
    add_example_arguments(parser, epochs=40, batch_size=32)
    parser.add_argument(
        "--cycle-weight",
        type=float,
        default=10.0,
        help="weight of the cycle term",
    )
    add_run_arguments(parser, "seed of the weights and the data split")
    return parser.parse_args(argv)


def to_domain_b(images):
    """The transformation the model must find: a quarter turn and
    inverted colours (images in [-1, 1])."""
    return -np.rot90(images, k=1, axes=(1, 2)).copy()


@keras.saving.register_keras_serializable(package="fitcustom_examples")
class Translation(fitcustom.TapeModel):
    """Generators `a_to_b`, `b_to_a` and discriminators `judge_a`,
    `judge_b`, each with the optimizer of the same name. `call()` (so
    `predict()`) translates images of domain A to domain B."""

    config_models = ("a_to_b", "b_to_a", "judge_a", "judge_b")
    config_values = ("cycle_weight", "identity_weight")

    def __init__(
        self,
        a_to_b,
        b_to_a,
        judge_a,
        judge_b,
        cycle_weight=10.0,
        identity_weight=5.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.a_to_b, self.b_to_a = a_to_b, b_to_a
        self.judge_a, self.judge_b = judge_a, judge_b
        self.cycle_weight = cycle_weight
        self.identity_weight = identity_weight

    def call(self, images, training=False):
        return self.a_to_b(images, training=training)

    def train_step(self, data):
        a, b, _ = self.unpack_data(data)

        def run(network, images):  # terms in float32 under mixed precision
            return tf.cast(network(images, training=True), tf.float32)

        with tf.GradientTape(persistent=True) as tape:
            fake_b, fake_a = run(self.a_to_b, a), run(self.b_to_a, b)
            back_a, back_b = run(self.b_to_a, fake_b), run(self.a_to_b, fake_a)
            cycle = self.cycle_weight * (
                tf.abs(a - back_a) + tf.abs(b - back_b)
            )
            same_a, same_b = run(self.b_to_a, a), run(self.a_to_b, b)
            # Least-squares GAN terms on each discriminator's 2x2 patches.
            score_fake_a = run(self.judge_a, fake_a)
            score_fake_b = run(self.judge_b, fake_b)
            score_real_a = run(self.judge_a, a)
            score_real_b = run(self.judge_b, b)
            self.minimize(
                tape,
                {
                    "fool_b": tf.square(score_fake_b - 1.0),
                    "cycle": cycle,
                    "identity_b": self.identity_weight * tf.abs(b - same_b),
                },
                optimizer="a_to_b",
            )
            self.minimize(
                tape,
                {
                    "fool_a": tf.square(score_fake_a - 1.0),
                    "cycle": cycle,
                    "identity_a": self.identity_weight * tf.abs(a - same_a),
                },
                optimizer="b_to_a",
            )
            self.minimize(
                tape,
                {
                    "judge_a_loss": 0.5
                    * (tf.square(score_real_a - 1.0) + tf.square(score_fake_a))
                },
                optimizer="judge_a",
            )
            self.minimize(
                tape,
                {
                    "judge_b_loss": 0.5
                    * (tf.square(score_real_b - 1.0) + tf.square(score_fake_b))
                },
                optimizer="judge_b",
            )


def _generator(name):
    images = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(images)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(128, activation="relu")(h)
    h = keras.layers.Dense(64, activation="tanh")(h)
    return keras.Model(images, keras.layers.Reshape((8, 8, 1))(h), name=name)


def _judge(name):
    images = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same")(images)
    h = keras.layers.LeakyReLU(0.2)(h)
    patches = keras.layers.Conv2D(1, 3, strides=2, padding="same")(h)
    return keras.Model(images, patches, name=name)  # (batch, 2, 2, 1)


def build_translation(**kwargs):
    """An uncompiled `Translation` with small networks for 8x8 images."""
    return Translation(
        _generator("a_to_b"),
        _generator("b_to_a"),
        _judge("judge_a"),
        _judge("judge_b"),
        **kwargs,
    )


def optimizers():
    """One Adam per network, named like it."""
    return {
        name: keras.optimizers.Adam(
            2e-4 if "judge" in name else 1e-3, beta_1=0.5
        )
        for name in ("a_to_b", "b_to_a", "judge_a", "judge_b")
    }


def domains(seed=0):
    """`(a_train, b_train, a_test, b_test)`: digits in [-1, 1]; the B
    images are other digits than the A images, transformed."""
    (x_train, _), (x_test, _) = load_digits(seed=seed)
    x_train, x_test = x_train * 2.0 - 1.0, x_test * 2.0 - 1.0
    half, test_half = len(x_train) // 2, len(x_test) // 2
    return (
        x_train[:half],
        to_domain_b(x_train[half : 2 * half]),
        x_test[:test_half],
        to_domain_b(x_test[test_half : 2 * test_half]),
    )


def save_picture(model, a, b, path):
    """Held-out images of both domains and their translations."""
    rows = [
        ("domain A (digits)", a),
        ("translated to B", np.asarray(model.a_to_b(a))),
        ("domain B (turned, inverted)", b),
        ("translated to A", np.asarray(model.b_to_a(b))),
    ]
    save_image_rows(
        rows,
        path,
        "Unpaired translation between two digit domains",
        value_range=(-1.0, 1.0),
    )


#: What a run writes in --output-dir (removed by --overwrite).
OUTPUTS = ["history.csv", "translation.keras", "curves.png", "translations.png"]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    start_run(args.output_dir, args.overwrite, OUTPUTS)
    keras.utils.set_random_seed(args.seed)
    a_train, b_train, a_test, b_test = domains(args.seed)
    epochs = args.epochs
    if args.smoke:
        a_train, b_train, epochs = a_train[:64], b_train[:64], 2
    model = build_translation(cycle_weight=args.cycle_weight)
    model.compile(optimizer=optimizers())
    out = args.output_dir
    history = model.fit(
        a_train,
        b_train,
        batch_size=args.batch_size,
        epochs=epochs,
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
    model.save(os.path.join(out, "translation.keras"))
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["cycle", "fool_b", "judge_b_loss", "identity_b"],
        "Unpaired translation: generator and discriminator terms",
        labels={
            "cycle": "cycle term (weighted L1)",
            "fool_b": "A-to-B generator's adversarial term",
            "judge_b_loss": "domain B discriminator's loss",
            "identity_b": "identity term (weighted L1)",
        },
    )
    save_picture(
        model,
        a_test[:10],
        b_test[:10],
        os.path.join(out, "translations.png"),
    )
    translated = np.asarray(model.a_to_b(a_test))
    error = float(np.mean(np.abs(translated - to_domain_b(a_test))))
    unrelated = float(
        np.mean(np.abs(to_domain_b(a_test) - b_test[: len(a_test)]))
    )
    last = final_values(history)
    finish_run(
        out,
        {
            "epochs": epochs,
            "final": last,
            "translation_error": error,
            "unrelated_b_error": unrelated,
        },
    )
    print(
        f"mean absolute error of held-out A-to-B translations against the "
        f"true transformation {error:.3f} (other B images: "
        f"{unrelated:.3f}); pictures in {out}"
    )
    return dict(last, translation_error=error, unrelated_b_error=unrelated)


if __name__ == "__main__":
    main()
