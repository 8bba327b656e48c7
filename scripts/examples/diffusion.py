"""A small denoising diffusion model on the digits, offline: a network
learns to predict the noise mixed into an image; an EMA copy of it (kept
by fitcustom's `track_ema`) generates new digits by removing noise step
by step (deterministic DDIM sampling), scored with `GANQuality` (KID and
FID against held-out digits) during training.

Writes under --output-dir: the model (`diffusion.keras`), the per-epoch
log (`history.csv`), the loss and KID/FID curves (`curves.png`), a grid of
generated digits next to real ones (`samples.png`), and the final numbers
(`summary.json`).

Usage: python -m scripts.examples.diffusion --output-dir outputs/diffusion
"""

import math
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

#: The signal rate at diffusion time 1 and at time 0 (cosine schedule).
MIN_SIGNAL, MAX_SIGNAL = 0.02, 0.98


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.examples.diffusion")
    add_example_arguments(parser, epochs=50, batch_size=64)
    parser.add_argument(
        "--sampling-steps",
        type=positive_int("--sampling-steps"),
        default=20,
        help="denoising steps per generated image",
    )
    parser.add_argument(
        "--quality-every",
        type=positive_int("--quality-every"),
        default=10,
        help="score KID and FID every this many epochs",
    )
    add_run_arguments(parser, "seed of the weights and the noise")
    return parser.parse_args(argv)


def embed(noise_rates, size=16):
    """Sine and cosine features of the noise level at `size // 2`
    frequencies (geometric from 1 to 1000), one row per image: what tells
    the network how much noise to remove."""
    frequencies = tf.exp(tf.linspace(0.0, math.log(1000.0), size // 2))
    angles = 2.0 * math.pi * tf.reshape(noise_rates, [-1, 1]) * frequencies
    return tf.concat([tf.sin(angles), tf.cos(angles)], axis=1)


def rates(times):
    """`(signal_rate, noise_rate)` at diffusion `times` in [0, 1] (a
    cosine schedule: signal_rate**2 + noise_rate**2 == 1)."""
    start, end = math.acos(MAX_SIGNAL), math.acos(MIN_SIGNAL)
    angles = start + times * (end - start)
    return tf.cos(angles), tf.sin(angles)


@keras.saving.register_keras_serializable(package="fitcustom_examples")
class Diffusion(fitcustom.TapeModel):
    """A noise-predicting `network([noisy_images, embed(noise_rates)])`
    and its EMA copy, which `generate` samples with. `call()` takes
    `[noisy_images, noise_rates]`, not a training batch: the model is built
    from its networks."""

    config_models = ("network",)
    config_values = ("ema_decay", "noise_seed")

    def __init__(self, network, ema_decay=0.995, noise_seed=0, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.ema_decay = ema_decay
        self.noise_seed = noise_seed
        self.ema_network = self.track_ema(self.network, ema_decay)

    def call(self, inputs, training=False):
        noisy, noise_rates = inputs
        return self.network([noisy, embed(noise_rates)], training=training)

    def noise_loss(self, images, network, training):
        """Squared error of the predicted noise, per image."""
        n = tf.shape(images)[0]
        images = tf.cast(images, tf.float32)
        noise = self.normal_noise(tf.shape(images), 0, tf.float32)
        u = self.normal_noise([n, 1, 1, 1], 1, tf.float32)
        times = 0.5 * (1.0 + tf.math.erf(u / math.sqrt(2.0)))  # U[0, 1]
        signal_rates, noise_rates = rates(times)
        noisy = signal_rates * images + noise_rates * noise
        predicted = network([noisy, embed(noise_rates)], training=training)
        return tf.square(tf.cast(predicted, tf.float32) - noise)

    def train_step(self, data):
        images = self.unpack_data(data)[0]
        with tf.GradientTape() as tape:
            loss = self.noise_loss(images, self.network, training=True)
            self.minimize(tape, {"noise_loss": loss})

    def test_step(self, data):
        images = self.unpack_data(data)[0]
        loss = self.noise_loss(images, self.ema_network, training=False)
        self.log_loss({"noise_loss": loss})

    def generate(self, n, seed=0, steps=20):
        """`n` new images in [-1, 1] from the EMA network: noise from
        `seed`, denoised in `steps` deterministic (DDIM) steps."""
        shape = (n,) + tuple(self.network.inputs[0].shape[1:])
        x = tf.random.stateless_normal(shape, tf.constant([seed, 0]))
        for step in range(steps):
            t = 1.0 - step / steps
            signal, noise_rate = rates(tf.fill([n, 1, 1, 1], t))
            predicted = self.ema_network([x, embed(noise_rate)], training=False)
            predicted = tf.cast(predicted, tf.float32)
            images = (x - noise_rate * predicted) / signal
            next_signal, next_noise = rates(
                tf.fill([n, 1, 1, 1], t - 1.0 / steps)
            )
            x = next_signal * images + next_noise * predicted
        return np.clip(np.asarray(images), -1.0, 1.0)


def build_diffusion(image_shape=(8, 8, 1), width=256, depth=3, **kwargs):
    """An uncompiled `Diffusion` with a dense noise-predicting network."""
    noisy = keras.Input(image_shape, name="noisy_images")
    levels = keras.Input((16,), name="noise_levels")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(noisy), levels])
    for _ in range(depth):
        h = keras.layers.Dense(width, activation="silu")(h)
    pixels = int(np.prod(image_shape))
    out = keras.layers.Reshape(image_shape)(keras.layers.Dense(pixels)(h))
    network = keras.Model([noisy, levels], out, name="network")
    return Diffusion(network, **kwargs)


def save_samples(model, real, path, steps, seed):
    """Generated digits (EMA network) beside real ones, rows titled."""
    n = 10
    fake = model.generate(3 * n, seed=seed, steps=steps)
    rows = [("real digits", real[:n])] + [
        ("generated" if r == 0 else "", fake[r * n : (r + 1) * n])
        for r in range(3)
    ]
    save_image_rows(
        rows,
        path,
        f"Diffusion model on the 8x8 digits ({steps} DDIM steps)",
        value_range=(-1.0, 1.0),
    )


#: What a run writes in --output-dir (removed by --overwrite).
OUTPUTS = ["history.csv", "diffusion.keras", "curves.png", "samples.png"]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    start_run(args.output_dir, args.overwrite, OUTPUTS)
    keras.utils.set_random_seed(args.seed)
    (x_train, _), (x_test, _) = load_digits()
    x_train, x_test = x_train * 2.0 - 1.0, x_test * 2.0 - 1.0
    epochs, every = args.epochs, args.quality_every
    if args.smoke:
        x_train, x_test, epochs, every = x_train[:128], x_test[:64], 2, 1
    model = build_diffusion(noise_seed=args.seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    quality = fitcustom.GANQuality(
        x_test,
        metrics=("kid", "fid"),
        every=every,
        seed=args.seed,
        verbose=0,
    )
    out = args.output_dir
    history = model.fit(
        x_train,
        batch_size=args.batch_size,
        epochs=epochs,
        validation_data=(x_test,),
        verbose=args.verbose,
        callbacks=[
            quality,
            keras.callbacks.CSVLogger(
                os.path.join(out, "history.csv"), append=True
            ),
            fitcustom.BackupAndRestore(
                os.path.join(out, "backup"), delete_checkpoint=False
            ),
        ],
    )
    model.save(os.path.join(out, "diffusion.keras"))
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["noise_loss", "kid", "fid"],
        "Diffusion model on the digits",
        labels={"noise_loss": "noise prediction error (MSE)"},
    )
    save_samples(
        model,
        x_test,
        os.path.join(out, "samples.png"),
        args.sampling_steps,
        args.seed,
    )
    last = final_values(history)
    finish_run(
        out,
        {
            "epochs": epochs,
            "final": last,
            "real_vs_real": {k: float(v) for k, v in quality.baseline.items()},
        },
    )
    print(
        f"KID {last['kid']:.2f} / FID {last['fid']:.2f} of generated "
        f"digits (real vs real: KID {quality.baseline['kid']:.2f} / FID "
        f"{quality.baseline['fid']:.2f}); pictures in {out}"
    )
    return last


if __name__ == "__main__":
    main()
