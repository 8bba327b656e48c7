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

import fitcustom

out, kill_marker, kind = sys.argv[1], sys.argv[2], sys.argv[3]
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 6)).astype("float32")
y = rng.integers(0, 3, size=96)
if kind == "gan":
    z = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(z)
    h = keras.layers.BatchNormalization()(h)
    generator = keras.Model(z, keras.layers.Dense(6)(h))
    d_in = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(d_in)
    discriminator = keras.Model(
        d_in, keras.layers.Dense(1)(keras.layers.Dropout(0.2)(h))
    )
    model = fitcustom.TapeGAN(
        generator=generator,
        discriminator=discriminator,
        latent_dim=4,
        ema_decay=0.9,
    )
    model.compile(label_noise=0.05)
    y = None  # noise drawn by the GAN itself: part of what must resume
else:
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(3)(h)
    if kind == "classifier":
        model = fitcustom.TapeClassifier(inputs, outputs)
        model.compile(sam_rho=0.05, label_smoothing=0.1)
    else:
        model = fitcustom.TapeModel(inputs, outputs)
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
            skip_nonfinite=True,
        )


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
