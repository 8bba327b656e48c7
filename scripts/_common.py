"""Helpers shared by the training scripts: output directories, runs that
resume or start fresh, pictures."""

import contextlib
import csv
import json
import os
import re
import shutil
import sys

# Before TensorFlow loads: no C++ info and warning lines (errors still
# show). The scripts run as `python -m scripts.NAME`, so this runs first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A C++ log line: severity letter, date, time, thread, file:line]. Lines
# printed before abseil's logging starts come with its banner.
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog()"


def kept_while_loading(text, min_level):
    """The lines of what TensorFlow printed while it loaded that
    TF_CPP_MIN_LOG_LEVEL=`min_level` lets through (0 info, 1 warnings,
    2 errors, 3 fatal only). TensorFlow 2.21 prints some lines (oneDNN's
    notice on CPUs where it is on) before the level applies; a line that
    does not start a log line goes with the one before it, anything
    else printed is kept."""
    kept = []
    keep = True
    for line in text.splitlines(keepends=True):
        start = _LOG_LINE.match(line)
        if start:
            keep = "IWEF".index(start.group(1)) >= min_level
        elif line.startswith(_ABSL_BANNER):
            if min_level < 1:
                kept.append(line)
            keep = True
            continue
        if keep:
            kept.append(line)
    return "".join(kept)


def load_tensorflow():
    """Imports TensorFlow with TF_CPP_MIN_LOG_LEVEL applied to what it
    prints while it loads (`kept_while_loading`). Its C++ code writes to
    the process's stderr, so that is caught in a file for the import."""
    if "tensorflow" in sys.modules:
        return
    import tempfile

    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        stderr = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            sys.stderr.write(kept_while_loading(text, min_level))
            sys.stderr.flush()


SUMMARY = "summary.json"
BACKUP = "backup"


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


def fraction(name):
    """An argparse type for floats strictly between 0 and 1."""
    import argparse

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number, got {text!r}"
            ) from None
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(
                f"{name} must be between 0 and 1 (exclusive), got {value}"
            )
        return value

    return parse


def make_parser(doc, module):
    """An argument parser for `python -m module` whose --help shows the
    script's description and every option's default (an option needs a
    `help` text for its default to show)."""
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):
            if action.required or action.default is None:
                return action.help
            if action.default is False:  # a flag, off unless given
                return action.help
            return super()._get_help_string(action)

    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n\n")[0].replace("\n", " "),
        formatter_class=Formatter,
    )


def add_run_arguments(parser, seed_help):
    """The options every training script ends with: --seed, --verbose,
    --overwrite."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="0 silent, 1 progress bar, 2 one line per epoch",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output-dir (finished or interrupted) "
        "with a new one",
    )


LABELS = {
    "loss": "loss (cross-entropy)",
    "accuracy": "accuracy",
    "d_loss": "discriminator loss",
    "g_loss": "generator loss",
    "kid": "KID (lower is better)",
    "fid": "FID (lower is better)",
}


def save_curves(history, path, keys, title, labels=None):
    """A PNG of the learning curves (train and validation) for `keys`,
    under `title`; `labels` names axes beyond the shared `LABELS`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in keys if k in history]
    cols = len(keys) if len(keys) <= 2 else 2
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.5 * cols, 0.4 + 3.2 * rows), squeeze=False
    )
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        values = np.asarray(history[key], float)
        epochs = np.arange(1, len(values) + 1)
        scored = np.isfinite(values)
        if scored.all():
            ax.plot(epochs, values, label="training")
        else:  # scored every few epochs (GANQuality): points, joined
            ax.plot(epochs[scored], values[scored], "o-", label="samples")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        if f"{key}_real" in history:
            ax.axhline(
                history[f"{key}_real"][-1],
                color="grey",
                ls="--",
                label="real images (the floor)",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel({**LABELS, **(labels or {})}.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_csv_history(path):
    """The per-epoch logs that Keras' CSVLogger wrote, as lists."""
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


def final_values(history):
    """Each log's value at its last epoch that has one (a metric computed
    every few epochs, such as KID, leaves the others empty)."""
    final = {}
    for key, values in history.items():
        kept = [v for v in values if v == v]  # not NaN
        if kept:
            final[key] = kept[-1]
    return final


def _remove(out, names):
    for name in names:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _keep_epochs(path, epochs):
    """Keeps the first `epochs` epochs of a CSVLogger file: rows written
    after the backup that the run resumes from are trained again."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < epochs]
    temp = path + ".tmp"
    with open(temp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(temp, path)


def start_run(out, overwrite, outputs):
    """Starts a run in `out` from what the directory holds.

    - With `overwrite`, whatever is there (`outputs`, a backup, a summary)
      is removed: a fresh run.
    - A finished run (its summary file) is refused with a one-line hint.
    - An interrupted run (a backup) resumes: it says so, and the history
      file keeps the epochs the backup holds.
    - Otherwise a fresh run; leftovers of a run stopped before its first
      backup are removed.

    Returns:
        The epochs already completed (0 for a fresh run).
    """
    from fitcustom import BackupAndRestore

    everything = [*outputs, BACKUP, SUMMARY]
    if overwrite:
        _remove(out, everything)
        return 0
    if os.path.exists(os.path.join(out, SUMMARY)):
        sys.exit(
            f"error: {out} holds a finished run; add --overwrite to replace "
            "it, or choose another --output-dir"
        )
    progress = BackupAndRestore.progress(os.path.join(out, BACKUP))
    if progress is None:
        _remove(out, everything)
        return 0
    epochs, batches = progress
    _keep_epochs(os.path.join(out, "history.csv"), epochs)
    extra = f" and {batches} batches" if batches else ""
    print(
        f"Resuming the interrupted run in {out} after {epochs} epoch(s){extra}."
    )
    return epochs


def finish_run(out, summary):
    """Marks the run in `out` finished: writes its summary file (the
    numbers the final report shows), then removes the backup."""
    path = os.path.join(out, SUMMARY)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    shutil.rmtree(os.path.join(out, BACKUP), ignore_errors=True)


@contextlib.contextmanager
def resumable(out):
    """Turns Ctrl-C into one line that says how to resume (exit status
    130, as for any interrupted command)."""
    try:
        yield
    except KeyboardInterrupt:
        from fitcustom import BackupAndRestore

        progress = BackupAndRestore.progress(os.path.join(out, BACKUP))
        saved = (
            f"{progress[0]} epoch(s) saved"
            if progress
            else "no epoch finished yet"
        )
        print(
            f"\nInterrupted ({saved}); run the same command to resume.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def save_image_rows(rows, path, title, value_range=(0.0, 1.0)):
    """A PNG of grey images in rows, each row titled: `rows` is a list of
    `(title, images)` (images `(n, height, width, 1)`, the same `n` in
    every row; a title may be empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows[0][1])
    fig, axes = plt.subplots(
        len(rows), n, figsize=(n * 0.8, len(rows) * 1.05), squeeze=False
    )
    low, high = value_range
    for r, (row_title, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c, ..., 0], cmap="gray_r", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
        if row_title:
            axes[r, 0].set_title(row_title, loc="left", fontsize=9)
    fig.suptitle(title)
    fig.subplots_adjust(
        left=0.02, right=0.98, top=0.86, bottom=0.02, wspace=0.08, hspace=0.4
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_example_arguments(parser, epochs, batch_size):
    """The options every example program starts with: --output-dir,
    --epochs, --batch-size (with the program's defaults), --smoke."""
    parser.add_argument(
        "--output-dir", required=True, help="where everything is written"
    )
    parser.add_argument(
        "--epochs",
        type=positive_int("--epochs"),
        default=epochs,
        help="epochs to train",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=batch_size,
        help="images per training step",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps on a few images, to check that everything runs",
    )
