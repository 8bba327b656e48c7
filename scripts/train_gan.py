"""Trains a TapeGAN (small DCGAN) on the digits, offline, end to end.

Writes under --output-dir: sample grids from a fixed latent seed
(`grids/`), the whole GAN (`gan.keras`), the generator alone
(`generator.keras`), the per-epoch log (`history.csv`), loss curves
(`curves.png`) and the final numbers (`summary.json`). A run that was
interrupted (Ctrl-C, a crash, a killed machine) resumes when the same
command runs again, both optimizers and the noise stream included; a
finished run is kept unless --overwrite is given.

Usage: python -m scripts.train_gan --output-dir outputs/gan
"""

import os

from scripts._common import add_run_arguments
from scripts._common import finish_run
from scripts._common import load_tensorflow
from scripts._common import make_parser
from scripts._common import positive_int
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import resumable
from scripts._common import save_curves
from scripts._common import start_run

# fitcustom.gan_losses.LOSSES, named here so that --help needs no
# TensorFlow import (a test checks that the two agree).
LOSS_NAMES = (
    "non_saturating",
    "minimax",
    "wasserstein",
    "hinge",
    "least_squares",
)


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.train_gan")
    parser.add_argument(
        "--output-dir", required=True, help="where everything is written"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int("--epochs"),
        default=60,
        help="epochs to train",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=64,
        help="images per training step",
    )
    parser.add_argument(
        "--latent-dim",
        type=positive_int("--latent-dim"),
        default=32,
        help="size of the generator's random input",
    )
    parser.add_argument(
        "--loss",
        default="non_saturating",
        metavar="{" + ",".join(LOSS_NAMES) + "}",
        help="the GAN loss",
    )
    parser.add_argument(
        "--grid-every",
        type=positive_int("--grid-every"),
        default=10,
        help="write a grid of samples every this many epochs (and after "
        "the last)",
    )
    parser.add_argument(
        "--quality-every",
        type=positive_int("--quality-every"),
        default=10,
        help="score the samples (KID and FID against held-out digits) "
        "every this many epochs, and after the first and the last",
    )
    add_run_arguments(
        parser, seed_help="seeds the weights, the noise and the data order"
    )
    args = parser.parse_args(argv)
    if args.loss not in LOSS_NAMES:
        parser.error(
            f"--loss must be one of {', '.join(LOSS_NAMES)}; got {args.loss!r}"
        )
    return args


OUTPUTS = [
    "history.csv",
    "gan.keras",
    "generator.keras",
    "curves.png",
    "grids",
]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    load_tensorflow()
    with resumable(args.output_dir):
        return _train(args, args.output_dir)


def _train(args, out):
    import keras

    import fitcustom
    from fitcustom import architectures
    from fitcustom.datasets import load_digits

    (x_train, _), (x_test, _) = load_digits(seed=args.seed)
    images = x_train * 2.0 - 1.0  # tanh range
    start_run(out, args.overwrite, OUTPUTS)
    keras.utils.set_random_seed(args.seed)
    generator, discriminator = architectures.dcgan_8x8(args.latent_dim)
    gan = fitcustom.TapeGAN(
        generator=generator,
        discriminator=discriminator,
        latent_dim=args.latent_dim,
        seed=args.seed,
    )
    gan.compile(
        d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
        g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
        loss=args.loss,
        label_noise=0.05,
    )
    # Samples against the test digits (never trained on), whose two halves
    # give the real-vs-real floor.
    quality = fitcustom.GANQuality(
        x_test * 2.0 - 1.0,
        metrics=("kid", "fid"),
        every=args.quality_every,
        seed=args.seed,
        verbose=0,
    )
    quality.set_model(gan)
    untrained = quality.measure()
    # Everything an epoch writes comes before its backup: a run killed
    # between the two trains that epoch again, and the resume drops its
    # history row.
    callbacks = [
        quality,  # before CSVLogger, which then logs the scores
        keras.callbacks.CSVLogger(
            os.path.join(out, "history.csv"), append=True
        ),
        fitcustom.SampleGrid(
            os.path.join(out, "grids"),
            every=args.grid_every,
            n=36,
            seed=args.seed,
        ),
        fitcustom.BackupAndRestore(
            os.path.join(out, "backup"), delete_checkpoint=False
        ),
        keras.callbacks.TerminateOnNaN(),
    ]
    print(
        f"Training a DCGAN on {len(images)} digits ({args.loss} loss, "
        f"{args.epochs} epochs)."
    )
    gan.fit(
        images,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    gan.save(os.path.join(out, "gan.keras"))
    fitcustom.checkpoints.save_model(
        gan.generator, os.path.join(out, "generator.keras")
    )
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["d_loss", "g_loss", "kid", "fid"],
        title=f"DCGAN on the digits ({args.loss} loss)",
    )
    grids = sorted(os.listdir(os.path.join(out, "grids")))
    summary = {
        "loss": args.loss,
        "epochs": len(history["loss"]),
        "d_loss": history["d_loss"][-1],
        "g_loss": history["g_loss"][-1],
        "kid": history["kid"][-1],
        "fid": history["fid"][-1],
        "kid_real": quality.baseline["kid"],
        "fid_real": quality.baseline["fid"],
        "kid_untrained": untrained["kid"],
        "fid_untrained": untrained["fid"],
        "last_grid": os.path.join(out, "grids", grids[-1]) if grids else None,
        "gan_path": os.path.join(out, "gan.keras"),
        "generator_path": os.path.join(out, "generator.keras"),
        "curves": os.path.join(out, "curves.png"),
    }
    finish_run(out, summary)
    print(
        f"GAN trained for {len(history['loss'])} epochs: d_loss "
        f"{history['d_loss'][-1]:.3f}, g_loss {history['g_loss'][-1]:.3f}; "
        f"grids and models in {out}\n"
        f"Sample quality (lower is better): {_scores(summary)}"
    )
    return history


def _scores(summary):
    """KID and FID of the samples beside the two ends of the scale."""
    parts = []
    for key in ("kid", "fid"):
        real, untrained = summary[f"{key}_real"], summary[f"{key}_untrained"]
        parts.append(
            f"{key.upper()} {summary[key]:.2f} (real images {real:.2f}, "
            f"untrained generator {untrained:.2f})"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
