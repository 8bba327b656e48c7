"""Helpers shared by the training scripts."""

import os
import sys


def prepare_output_dir(path):
    """Creates `path` and checks it is writable; exits with one line if not."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to --output-dir {path}: {e}")


def positive_int(name):
    """An argparse type for ints >= 1 whose message names the option."""
    import argparse

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be an integer, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{name} must be >= 1, got {value}"
            )
        return value

    return parse


def save_curves(history, path, keys):
    """A PNG of the learning curves (train and validation) for `keys`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5))
    axes = [axes] if len(keys) == 1 else axes
    for ax, key in zip(axes, keys):
        ax.plot(range(1, len(history[key]) + 1), history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(
                range(1, len(history[key]) + 1),
                history[f"val_{key}"],
                label="validation",
            )
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_csv_history(path):
    """The per-epoch logs that Keras' CSVLogger wrote, as lists."""
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    history = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        # CSVLogger writes "NA" val_ columns even without validation data.
        if key != "epoch" and any(v != "NA" for v in values):
            history[key] = [
                float("nan") if v == "NA" else float(v) for v in values
            ]
    return history
