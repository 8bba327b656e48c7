"""A training process killed with SIGKILL mid-epoch resumes exactly.

Three fresh processes: an uninterrupted run; a run killed (SIGKILL to its
own process group) in the middle of its third epoch; the same command
restarted, which resumes from Keras' BackupAndRestore. The final weights of
the resumed run must equal the uninterrupted run's.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

JOB = textwrap.dedent(
    """
    import os, sys, time
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
        discriminator = keras.Model(d_in, keras.layers.Dense(1)(
            keras.layers.Dropout(0.2)(h)))
        model = fitcustom.TapeGAN(generator=generator,
                                  discriminator=discriminator, latent_dim=4,
                                  ema_decay=0.9)
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
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
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
                f.write(f"{epoch}\\n")

    model.fit(
        x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(os.path.join(out, "backup")),
            Hang(),
        ],
    )
    np.savez(os.path.join(out, "weights.npz"), *model.get_weights())
    """
)


def _run(job, out, kind, marker="-"):
    return subprocess.Popen(
        [sys.executable, str(job), str(out), str(marker), kind],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, killed alone
    )


def _finish(proc, timeout=300):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]


def _weights(out):
    with np.load(out / "weights.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["engine", "classifier", "gan"])
def test_sigkill_mid_epoch_then_resume_gives_uninterrupted_weights(
    tmp_path, kind
):
    job = tmp_path / "job.py"
    job.write_text(JOB)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    # The uninterrupted run alongside the one that is killed (each
    # process spends most of its time importing TensorFlow on one core).
    uninterrupted = _run(job, straight, kind)

    marker = tmp_path / "reached"
    proc = _run(job, crashed, kind, marker)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "job never reached epoch 3"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        for started in (proc, uninterrupted):
            failing = sys.exc_info()[0] is not None
            if started.poll() is None and (started is proc or failing):
                os.killpg(started.pid, signal.SIGKILL)
    _finish(uninterrupted)
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "weights.npz").exists()
    assert (crashed / "backup").exists()

    _finish(_run(job, crashed, kind))  # the same command, restarted
    epochs = (crashed / "epochs.txt").read_text().split()
    # Killed in epoch index 2; the restart resumes there, not from 0.
    assert epochs == ["0", "1", "2", "2", "3"], epochs
    for a, b in zip(_weights(straight), _weights(crashed)):
        np.testing.assert_array_equal(a, b)
