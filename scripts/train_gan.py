"""Trains a TapeGAN (small DCGAN) on the digits, offline, end to end.

Writes under --output-dir: sample grids from a fixed latent seed
(`grids/`), the whole GAN (`gan.keras`), the generator alone
(`generator.keras`), the per-epoch log (`history.csv`) and loss curves
(`curves.png`); a killed run started again with the same command resumes
from `backup/` (both optimizers and the noise stream included).

Usage: python -m scripts.train_gan --output-dir outputs/gan
"""

import argparse
import os

from scripts._common import positive_int
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import save_curves


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=60)
    parser.add_argument(
        "--batch-size", type=positive_int("--batch-size"), default=64
    )
    parser.add_argument(
        "--latent-dim", type=positive_int("--latent-dim"), default=32
    )
    parser.add_argument("--loss", default="non_saturating")
    parser.add_argument(
        "--grid-every", type=positive_int("--grid-every"), default=10
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    from fitcustom import gan_losses

    if args.loss not in gan_losses.LOSSES:
        parser.error(
            f"--loss must be one of {sorted(gan_losses.LOSSES)}, got "
            f"{args.loss!r}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    import keras

    import fitcustom
    from fitcustom import architectures
    from fitcustom.datasets import load_digits

    (x_train, _), _ = load_digits(seed=args.seed)
    images = x_train * 2.0 - 1.0  # tanh range
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
    out = args.output_dir
    callbacks = [
        fitcustom.BackupAndRestore(os.path.join(out, "backup")),
        keras.callbacks.CSVLogger(
            os.path.join(out, "history.csv"), append=True
        ),
        keras.callbacks.TerminateOnNaN(),
        fitcustom.SampleGrid(
            os.path.join(out, "grids"),
            every=args.grid_every,
            n=36,
            seed=args.seed,
        ),
    ]
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
    save_curves(history, os.path.join(out, "curves.png"), ["d_loss", "g_loss"])
    print(
        f"GAN trained for {len(history['loss'])} epochs: d_loss "
        f"{history['d_loss'][-1]:.3f}, g_loss {history['g_loss'][-1]:.3f}; "
        f"grids and models in {out}"
    )
    return history


if __name__ == "__main__":
    main()
