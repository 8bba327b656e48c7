"""Trains a TapeModel MLP on scikit-learn's digits (offline), end to end.

Writes under --output-dir: the model (`model.keras`), the per-epoch log
(`history.csv`), learning curves (`curves.png`); resumes an interrupted run
from `backup/` (Keras' BackupAndRestore).

Usage: python -m scripts.train_digits --output-dir outputs/digits
"""

import argparse
import os
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def save_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to --output-dir {args.output_dir}: {e}")

    import keras

    import fitcustom
    from fitcustom.datasets import load_digits

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=args.seed)
    inputs = keras.Input(x_train.shape[1:])
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    model = fitcustom.TapeModel(inputs, outputs, name="digits_mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        gradient_transforms=[fitcustom.ClipByGlobalNorm(args.clip_norm)],
        log_gradient_norm=True,
    )
    out = args.output_dir
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup")),
        keras.callbacks.CSVLogger(os.path.join(out, "history.csv")),
        keras.callbacks.ModelCheckpoint(os.path.join(out, "model.keras")),
    ]
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=callbacks,
        verbose=args.verbose,
    )
    results = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    import csv

    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    history = {k: [float(r[k]) for r in rows] for k in rows[0] if k != "epoch"}
    save_curves(history, os.path.join(out, "curves.png"))
    print(
        f"test accuracy {results['accuracy']:.4f}, test loss "
        f"{results['loss']:.4f}; model, history.csv and curves.png in {out}"
    )
    return results


if __name__ == "__main__":
    main()
