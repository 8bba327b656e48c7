"""A training job for the durability tests, run in fresh processes.

    python tests/programs/durable_job.py OUT KIND SAVE_FREQ [KILL]

Trains a small model of `small_models.build(KIND)` (a TapeClassifier, a
TapeGAN, or a step of its own) with `fitcustom.BackupAndRestore`
(`save_freq` "epoch" or a number of batches) and
`fitcustom.ModelCheckpoint` under `OUT`, then saves the final weights to
`OUT/final.weights.h5` and the last epoch's logs to `OUT/logs.json`.
`KILL` makes the process SIGKILL itself once:

- `batch:E:B`: after batch B of epoch E;
- `backup:E:HOW` / `checkpoint:E:HOW`: while writing the backup (or the
  model checkpoint) at the end of epoch E, `HOW` being `partial` (the
  temporary file half-written, the target untouched) or `renamed` (the
  new file in place, the old backup not yet removed).
"""

import json
import os
import signal
import sys

import keras
import tensorflow as tf
from small_models import build

import fitcustom
from fitcustom import checkpoints

EPOCHS = 4
BATCH = 16


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class Position(keras.callbacks.Callback):
    """Where training is: `(epoch, batch)` of the last finished batch."""

    epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        Position.epoch = epoch


class KillAfterBatch(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.target = (epoch, batch)

    def on_train_batch_end(self, batch, logs=None):
        if (Position.epoch, batch) == self.target:
            die()


def kill_in_write(which, epoch, how):
    """Arms the write hook for the write of `which` ("backup" or
    "checkpoint") at the end of `epoch`."""

    def hook(temp, target):
        name = os.path.basename(target)
        if which == "backup":
            # The file name says where training is: a backup in epoch E
            # (batch-level) or at its end (written at the next epoch's
            # start, once every callback has ended the epoch).
            in_epoch = f"-epoch{epoch:06d}-done" in name
            at_end = f"-epoch{epoch + 1:06d}-done{0:09d}." in name
            if not (at_end or (in_epoch and f"done{0:09d}." not in name)):
                return
        elif "checkpoint.keras" not in name or Position.epoch != epoch:
            return
        if how == "partial":
            with open(temp, "r+b") as f:
                f.truncate(os.path.getsize(temp) // 2)
        else:
            os.replace(temp, target)
        die()

    checkpoints._before_replace = hook


def main(argv):
    out, kind = argv[0], argv[1]
    save_freq = "epoch" if argv[2] == "epoch" else int(argv[2])
    kill = argv[3].split(":") if len(argv) > 3 else None
    # Grappler's rewrites are not bitwise reproducible from one process
    # to the next; the comparison is exact.
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True}
    )
    keras.utils.set_random_seed(0)
    model, x, y = build(kind, n_critic=2, dropout=0.1)
    callbacks = [
        Position(),
        fitcustom.ModelCheckpoint(os.path.join(out, "checkpoint.keras")),
        fitcustom.BackupAndRestore(
            os.path.join(out, "backup"), save_freq=save_freq
        ),
    ]
    if kill and kill[0] == "batch":
        callbacks.append(KillAfterBatch(int(kill[1]), int(kill[2])))
    elif kill:
        kill_in_write(kill[0], int(kill[1]), kill[2])
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        verbose=0,  # shuffle=True, fit()'s default: seeded, so exact
        callbacks=callbacks,
    )
    checkpoints._before_replace = None
    model.save_weights(os.path.join(out, "final.weights.h5"))
    last = {k: v[-1] for k, v in history.history.items()}
    with open(os.path.join(out, "logs.json"), "w") as f:
        json.dump(last, f)


if __name__ == "__main__":
    main(sys.argv[1:])
