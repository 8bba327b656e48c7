"""Trains a TapeClassifier end to end (offline on the default dataset).

Writes under --output-dir: the model (`model.keras`, the best epoch by
validation accuracy), the per-epoch log (`history.csv`), the learning
curves (`curves.png`), TensorBoard logs (`tensorboard/`); a killed run
started again with the same command resumes from `backup/` (Keras'
BackupAndRestore).

Usage: python -m scripts.train_classifier --output-dir outputs/classifier
"""

import argparse
import os
import sys

from scripts._common import positive_int
from scripts._common import prepare_output_dir
from scripts._common import read_csv_history
from scripts._common import save_curves

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="an MLP (flatten, 64, 64) or a VGG-like CNN",
    )
    parser.add_argument("--epochs", type=positive_int("--epochs"), default=30)
    parser.add_argument(
        "--batch-size", type=positive_int("--batch-size"), default=64
    )
    parser.add_argument("--clip-norm", type=float, default=5.0)
    parser.add_argument(
        "--patience",
        type=int,
        default=10,
        help="EarlyStopping patience (epochs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    return parser.parse_args(argv)


def build_model(kind, input_shape):
    """An MLP (flatten, 64, 64) or a VGG-like CNN, as a classifier."""
    import keras

    import fitcustom
    from fitcustom import architectures

    inputs = keras.Input(input_shape)
    body = architectures.mlp_body if kind == "mlp" else architectures.vgg_body
    return fitcustom.TapeClassifier(
        inputs, body(inputs), name=f"{kind}_classifier"
    )


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir)
    import keras

    import fitcustom
    from fitcustom import datasets

    try:
        (x_train, y_train), (x_test, y_test) = datasets.load(args.dataset)
    except OSError as e:
        sys.exit(f"error: {e}")
    keras.utils.set_random_seed(args.seed)
    model = build_model(args.model, x_train.shape[1:])
    model.compile(
        gradient_transforms=[fitcustom.ClipByGlobalNorm(args.clip_norm)],
        log_gradient_norm=True,
    )
    out = args.output_dir
    callbacks = [
        fitcustom.BackupAndRestore(os.path.join(out, "backup")),
        keras.callbacks.CSVLogger(
            os.path.join(out, "history.csv"), append=True
        ),
        fitcustom.ModelCheckpoint(
            os.path.join(out, "model.keras"),
            monitor="val_accuracy",
            save_best_only=True,
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy",
            patience=args.patience,
            restore_best_weights=True,
        ),
        keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")),
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
    history = read_csv_history(os.path.join(out, "history.csv"))
    save_curves(history, os.path.join(out, "curves.png"), ["loss", "accuracy"])
    print(
        f"{args.dataset}/{args.model}: test accuracy "
        f"{results['accuracy']:.4f}, test loss {results['loss']:.4f}; "
        f"outputs in {out}"
    )
    return results


if __name__ == "__main__":
    main()
