"""A training job that can be SIGKILLed mid-epoch and restarted.

    python tests/programs/resume_job.py OUT KILL_MARKER KIND

Trains `KIND` ("engine", "classifier" or "gan") for four epochs with
Keras' `BackupAndRestore` under `OUT/backup`, appending each epoch's
index to `OUT/epochs.txt`, and saves the final weights to
`OUT/weights.npz`. Unless `KILL_MARKER` is "-", it creates that file
after batch 2 of epoch index 2 and then sleeps, for
`tests/test_resume.py` to kill it.
"""

import os
import sys
import time

import keras
import numpy as np
from small_models import build

out, kill_marker, kind = sys.argv[1], sys.argv[2], sys.argv[3]
keras.utils.set_random_seed(0)
model, x, y = build(kind)


class Hang(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if kill_marker != "-" and self.epoch == 2 and batch == 2:
            open(kill_marker, "w").close()
            time.sleep(600)  # the test kills us here

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        with open(os.path.join(out, "epochs.txt"), "a") as f:
            f.write(f"{epoch}\n")


model.fit(
    x,
    y,
    batch_size=16,
    epochs=4,
    shuffle=False,
    verbose=0,
    callbacks=[
        keras.callbacks.BackupAndRestore(os.path.join(out, "backup")),
        Hang(),
    ],
)
np.savez(os.path.join(out, "weights.npz"), *model.get_weights())
