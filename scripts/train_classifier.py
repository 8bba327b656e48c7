"""Trains a TapeClassifier end to end (offline on the default dataset).

The training images are split into a training part and a validation part
(--validation-fraction); the epoch kept is the best on validation, and
the test images are read once, at the end.

Writes under --output-dir: the model (`model.keras`, the best epoch by
validation accuracy), the per-epoch log (`history.csv`), the learning
curves (`curves.png`), TensorBoard logs (`tensorboard/`) and the final
numbers (`summary.json`). A run that was interrupted (Ctrl-C, a crash, a
killed machine) resumes when the same command runs again; a finished run
is kept unless --overwrite is given.

Usage: python -m scripts.train_classifier --output-dir outputs/classifier
"""

import os
import sys

import numpy as np

from scripts._common import add_run_arguments
from scripts._common import finish_run
from scripts._common import fraction
from scripts._common import load_tensorflow
from scripts._common import make_parser
from scripts._common import positive_int
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import resumable
from scripts._common import save_curves
from scripts._common import start_run

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


def parse_args(argv):
    parser = make_parser(__doc__, "scripts.train_classifier")
    parser.add_argument(
        "--output-dir", required=True, help="where everything is written"
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits is offline; the others come through Keras' cache",
    )
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="an MLP (two hidden layers of 64) or a small CNN",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int("--epochs"),
        default=30,
        help="at most this many epochs",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=64,
        help="images per training step",
    )
    parser.add_argument(
        "--validation-fraction",
        type=fraction("--validation-fraction"),
        default=0.2,
        help="share of the training images held out to pick the best epoch",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=5.0,
        help="gradients are clipped to this global norm",
    )
    parser.add_argument(
        "--patience",
        type=positive_int("--patience"),
        default=10,
        help="stop after this many epochs without a better validation accuracy",
    )
    add_run_arguments(
        parser, seed_help="seeds the weights, the data order and the splits"
    )
    return parser.parse_args(argv)


def build_model(kind, input_shape):
    """An MLP (flatten, 64, 64) or a small CNN, as a classifier."""
    import keras

    import fitcustom
    from fitcustom import architectures

    inputs = keras.Input(input_shape)
    body = architectures.mlp_body if kind == "mlp" else architectures.cnn_body
    return fitcustom.TapeClassifier(
        inputs, body(inputs), name=f"{kind}_classifier"
    )


def _best_so_far(out):
    """The best validation accuracy of the epochs a resumed run keeps."""
    try:
        history = read_csv_history(os.path.join(out, "history.csv"))
    except (OSError, IndexError):  # no file, or no row yet
        return None
    return max(history.get("val_accuracy", [float("-inf")]))


OUTPUTS = ["history.csv", "model.keras", "curves.png", "tensorboard"]


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    load_tensorflow()
    out = args.output_dir
    with resumable(out):
        return _train(args, out)


def _train(args, out):
    import keras

    import fitcustom
    from fitcustom import datasets

    try:
        (x_train, y_train), (x_test, y_test) = datasets.load(args.dataset)
    except OSError as e:
        sys.exit(f"error: {e}")
    (x_fit, y_fit), (x_val, y_val) = datasets.split(
        x_train, y_train, args.validation_fraction, seed=args.seed
    )
    done = start_run(out, args.overwrite, OUTPUTS)
    keras.utils.set_random_seed(args.seed)
    model = build_model(args.model, x_train.shape[1:])
    model.compile(
        gradient_transforms=[fitcustom.ClipByGlobalNorm(args.clip_norm)],
        log_gradient_norm=True,
    )
    # Everything an epoch writes comes before its backup: a run killed
    # between the two trains that epoch again, and the resume drops its
    # history row.
    callbacks = [
        keras.callbacks.CSVLogger(
            os.path.join(out, "history.csv"), append=True
        ),
        fitcustom.ModelCheckpoint(
            os.path.join(out, "model.keras"),
            monitor="val_accuracy",
            save_best_only=True,
            # A resumed run keeps the best model of the epochs before.
            initial_value_threshold=_best_so_far(out) if done else None,
        ),
        fitcustom.BackupAndRestore(
            os.path.join(out, "backup"), delete_checkpoint=False
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy",
            patience=args.patience,
            restore_best_weights=True,
        ),
        keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")),
    ]
    print(
        f"Training the {args.model.upper()} on {args.dataset}: "
        f"{len(x_fit)} training, {len(x_val)} validation and "
        f"{len(x_test)} test images."
    )
    model.fit(
        x_fit,
        y_fit,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        callbacks=callbacks,
        verbose=args.verbose,
    )
    # The best epoch on validation (EarlyStopping restores it only when
    # it stops early), then the test images, read once.
    best = fitcustom.load_model(os.path.join(out, "model.keras"))
    results = best.evaluate(x_test, y_test, verbose=0, return_dict=True)
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(
        history,
        os.path.join(out, "curves.png"),
        ["loss", "accuracy"],
        title=f"{args.model.upper()} on {args.dataset}",
    )
    best_epoch = int(np.argmax(history["val_accuracy"]))
    summary = {
        "dataset": args.dataset,
        "model": args.model,
        "epochs": len(history["loss"]),
        "best_epoch": best_epoch + 1,
        "val_accuracy": history["val_accuracy"][best_epoch],
        "test_accuracy": results["accuracy"],
        "test_loss": results["loss"],
        "model_path": os.path.join(out, "model.keras"),
        "curves": os.path.join(out, "curves.png"),
        "tensorboard": os.path.join(out, "tensorboard"),
    }
    finish_run(out, summary)
    print(
        f"{args.dataset}/{args.model}: test accuracy "
        f"{results['accuracy']:.4f} (best validation epoch "
        f"{best_epoch + 1} of {len(history['loss'])}); outputs in {out}"
    )
    return results


if __name__ == "__main__":
    main()
