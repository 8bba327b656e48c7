"""A training job for the preemption tests, run in fresh processes.

    python tests/programs/preempt_job.py OUT KIND [SIGNALS]

Trains a small TapeClassifier or TapeGAN for up to 8 epochs with
`fitcustom.BackupAndRestore(OUT/backup)` at its default `save_freq`
("epoch"), Keras' `EarlyStopping` (patience 1, restoring the best
weights) and `fitcustom.ModelCheckpoint(save_best_only=True)`. After
each batch it prints `at EPOCH BATCH` and pauses 50 ms, so that a test
can send a signal in the middle of an epoch (the batches a resumed epoch
skips are reported too, as callbacks see them); before the first epoch
it prints `iteration N`, the steps the (generator's) optimizer took
before. `SIGNALS` ("none" or names joined by commas) is the callback's
`preemption_signals` (default: its own). At the end it writes
`OUT/final.weights.h5` and `OUT/result.json` (the history and the
callbacks' state); Keras' `CSVLogger` appends each epoch's logs to
`OUT/history.csv`, over the runs of one OUT. With
`NOTICE_IN_BACKUP=EPOCH` in the environment, the job sends itself
SIGTERM while the backup of that epoch's end is being written (its
temporary file complete, not yet in place). With
`SECOND=SIGNAL`, it sends itself that signal while the backup of a
notice is being written (a second notice, or Ctrl-C for SIGINT).
`PATIENCE=N` sets EarlyStopping's patience (default 1: the runs stop
after epoch 1; with 8 they train all 8 epochs).
"""

import json
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from small_models import build

import fitcustom
from fitcustom import checkpoints


class Position(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self, "epoch"):
            # The steps trained before this run (a backup restored).
            optimizer = getattr(self.model, "g_optimizer", None)
            optimizer = optimizer or self.model.optimizer
            print(f"iteration {int(optimizer.iterations)}", flush=True)
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        print(f"at {self.epoch} {batch}", flush=True)
        time.sleep(0.05)


def main(argv):
    out, kind = argv[0], argv[1]
    kwargs = {}
    if len(argv) > 2:
        kwargs["preemption_signals"] = (
            () if argv[2] == "none" else tuple(argv[2].split(","))
        )
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True}
    )
    position = Position()
    in_backup = os.environ.get("NOTICE_IN_BACKUP")
    if in_backup is not None:

        def notice_in_the_write(temp, target):
            # The backup of that epoch's end: its file name says so.
            end = f"-epoch{int(in_backup) + 1:06d}-done{0:09d}."
            if end in os.path.basename(target):
                checkpoints._before_replace = None
                os.kill(os.getpid(), signal.SIGTERM)

        checkpoints._before_replace = notice_in_the_write
    backup = fitcustom.BackupAndRestore(os.path.join(out, "backup"), **kwargs)
    second = os.environ.get("SECOND")
    if second is not None:

        def second_signal_in_the_write(temp, target):
            if backup.preempted_by is not None:
                checkpoints._before_replace = None
                os.kill(os.getpid(), signal.Signals[second])

        checkpoints._before_replace = second_signal_in_the_write
    keras.utils.set_random_seed(0)
    model, x, y = build(kind, n_critic=2, dropout=0.1)
    monitor = "g_loss" if kind == "gan" else "loss"
    stopping = keras.callbacks.EarlyStopping(
        monitor=monitor,
        mode="min",
        patience=int(os.environ.get("PATIENCE", "1")),
        restore_best_weights=True,
    )
    checkpoint = fitcustom.ModelCheckpoint(
        os.path.join(out, "best.keras"),
        monitor,
        mode="min",
        save_best_only=True,
    )
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=8,
        verbose=0,
        callbacks=[
            position,
            keras.callbacks.CSVLogger(
                os.path.join(out, "history.csv"), append=True
            ),
            backup,
            stopping,
            checkpoint,
        ],
    )
    model.save_weights(os.path.join(out, "final.weights.h5"))
    result = {
        "history": history.history,
        "stopped_epoch": stopping.stopped_epoch,
        "best_epoch": stopping.best_epoch,
        "best": float(stopping.best),
        "checkpoint_best": float(checkpoint.best),
    }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, default=lambda v: np.asarray(v).tolist())


if __name__ == "__main__":
    main(sys.argv[1:])
