"""Trains a variational autoencoder on the digits, offline: a step of
its own whose loss is two terms (reconstruction and KL), written with
fitcustom's `minimize`.

Writes under --output-dir: the model (`vae.keras`), the per-epoch log
(`history.csv`), the loss curves (`curves.png`) and a picture of held-out
digits, their reconstructions and new digits decoded from random codes
(`digits.png`), and the final numbers (`summary.json`).

Usage: python -m scripts.examples.vae --output-dir outputs/vae
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
from scripts._common import positive_int
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import save_curves
from scripts._common import save_image_rows
from scripts._common import start_run


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.examples.vae")
    add_example_arguments(parser, epochs=150, batch_size=64)
    parser.add_argument(
        "--latent-dim",
        type=positive_int("--latent-dim"),
        default=8,
        help="size of the code each digit is encoded to",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="Adam's learning rate",
    )
    add_run_arguments(parser, "seed of the weights and the noise")
    return parser.parse_args(argv)


@keras.saving.register_keras_serializable(package="fitcustom_examples")
class VAE(fitcustom.TapeModel):
    """An encoder to a Gaussian code and a decoder to pixel logits.

    `call()` (so `predict()`) gives the pixel probabilities of the
    reconstruction from the code's mean; `decode(codes)` those of any
    code.
    """

    config_models = ("encoder", "decoder")
    config_values = ("noise_seed",)

    def __init__(self, encoder, decoder, noise_seed=0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.noise_seed = noise_seed

    def call(self, images, training=False):
        mean, _ = self.encoder(images, training=training)
        return tf.sigmoid(self.decoder(mean, training=training))

    def terms(self, images, training):
        """The two terms of the loss, one value per image (in nats)."""
        mean, log_var = self.encoder(images, training=training)
        codes = mean + tf.exp(0.5 * log_var) * self.normal_noise(tf.shape(mean))
        logits = self.decoder(codes, training=training)
        images = tf.cast(images, logits.dtype)
        pixels = tf.nn.sigmoid_cross_entropy_with_logits(images, logits)
        kl = 1.0 + log_var - tf.square(mean) - tf.exp(log_var)
        return {
            "reconstruction": tf.reduce_sum(pixels, axis=[1, 2, 3]),
            "kl": -0.5 * tf.reduce_sum(kl, axis=1),
        }

    def train_step(self, data):
        images = self.unpack_data(data)[0]
        with tf.GradientTape() as tape:
            self.minimize(tape, self.terms(images, training=True))

    def test_step(self, data):
        images = self.unpack_data(data)[0]
        self.log_loss(self.terms(images, training=False))

    def decode(self, codes):
        """Pixel probabilities of the images that `codes` stand for."""
        return tf.sigmoid(self.decoder(codes, training=False))


def build_vae(image_shape=(8, 8, 1), latent_dim=8, width=128, seed=0):
    """An uncompiled `VAE` with a dense encoder and decoder."""
    pixels = 1
    for d in image_shape:
        pixels *= d
    images = keras.Input(image_shape)
    h = keras.layers.Flatten()(images)
    h = keras.layers.Dense(width, activation="silu")(h)
    encoder = keras.Model(
        images,
        [keras.layers.Dense(latent_dim)(h), keras.layers.Dense(latent_dim)(h)],
        name="encoder",
    )
    codes = keras.Input((latent_dim,))
    h = keras.layers.Dense(width, activation="silu")(codes)
    h = keras.layers.Reshape(image_shape)(keras.layers.Dense(pixels)(h))
    decoder = keras.Model(codes, h, name="decoder")
    return VAE(encoder=encoder, decoder=decoder, noise_seed=seed)


def save_picture(vae, images, path, latent_dim, seed):
    """Held-out digits, their reconstructions, and digits decoded from
    random codes, each row titled."""
    n = len(images)
    codes = np.random.default_rng(seed).normal(size=(2 * n, latent_dim))
    samples = np.asarray(vae.decode(codes.astype("float32")))
    rows = [
        ("held-out digits", images),
        ("their reconstructions", vae.predict(images, verbose=0)),
        ("decoded from random codes", samples[:n]),
        ("", samples[n:]),
    ]
    save_image_rows(rows, path, "Variational autoencoder on the 8x8 digits")


#: What a run writes in --output-dir (removed by --overwrite).
OUTPUTS = ["history.csv", "vae.keras", "curves.png", "digits.png"]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    start_run(args.output_dir, args.overwrite, OUTPUTS)

    keras.utils.set_random_seed(args.seed)
    (x_train, _), (x_test, _) = load_digits()
    epochs = args.epochs
    if args.smoke:
        x_train, x_test, epochs = x_train[:128], x_test[:64], 2
    vae = build_vae(latent_dim=args.latent_dim, seed=args.seed)
    vae.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    out = args.output_dir
    history = vae.fit(
        x_train,
        batch_size=args.batch_size,
        epochs=epochs,
        validation_data=(x_test,),
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
    vae.save(os.path.join(out, "vae.keras"))
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["loss", "reconstruction", "kl"],
        "VAE loss per image (nats)",
        labels={
            "loss": "loss (reconstruction + KL)",
            "reconstruction": "reconstruction (cross-entropy)",
            "kl": "KL divergence to N(0, 1)",
        },
    )
    save_picture(
        vae,
        x_test[:10],
        os.path.join(out, "digits.png"),
        args.latent_dim,
        args.seed,
    )
    last = final_values(history)
    finish_run(out, {"epochs": epochs, "final": last})
    print(
        f"held-out loss {last['val_loss']:.2f} per image "
        f"(reconstruction {last['val_reconstruction']:.2f}, "
        f"KL {last['val_kl']:.2f}); pictures in {out}"
    )
    return last


if __name__ == "__main__":
    main()
