"""Non-finite batches with oneDNN on and off (it changes how NaN flows).

With oneDNN (TensorFlow's CPU default) a fused Dense+ReLU maps NaN inputs
to 0, so the loss can stay finite while the gradients carry NaN into the
weights. The guard checks gradients as well as the loss, so
it must hold in both settings; without it, training must not go on
silently. Each setting runs in a fresh process, since the flag is read at
import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import fitcustom

SCRIPT = Path(__file__).parent / "programs" / "nonfinite_job.py"


@pytest.mark.parametrize("kind", ["engine", "gan"])
@pytest.mark.parametrize("onednn", ["0", "1"], ids=["onednn_off", "onednn_on"])
def test_nonfinite_batch_with_and_without_guard(onednn, kind):
    env = dict(
        os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3"
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    guard, no_guard = result["guard"], result["no_guard"]
    # Guard on: every epoch runs, the poisoned batch is skipped each time,
    # the weights stay finite and the logged loss is finite.
    assert guard["finite"] and guard["epochs"] == 3
    assert guard["skipped"] == [1.0, 1.0, 1.0]
    assert guard["iterations"] == 9
    assert all(v == v for v in guard["loss"])
    # Guard off: training stops instead of going on with corrupted
    # weights, and the last finite weights (here the initial ones: the
    # poisoned batch is in epoch 1) are put back.
    assert no_guard["epochs"] == 1
    assert no_guard["finite"] and no_guard["initial"]
    assert not guard["initial"]  # control: the guarded run did train


def _model(skip_nonfinite):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        optimizer="adam",
        loss="mse",
        metrics=["mae"],
        skip_nonfinite=skip_nonfinite,
        log_gradient_norm=True,
    )
    return model


def _data(poisoned):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    if poisoned:
        x[:] = np.nan
    return x, rng.normal(size=(32, 3)).astype("float32")


def test_epoch_without_an_applied_step_logs_nan(tmp_path):
    """An epoch whose every step was skipped logs NaN, not 0.0, and a
    best-only checkpoint keeps the last good epoch."""
    model = _model(skip_nonfinite=True)
    best = tmp_path / "best.keras"
    checkpoint = fitcustom.ModelCheckpoint(
        best, monitor="loss", save_best_only=True
    )
    stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=5)
    good, bad = _data(False), _data(True)
    history = model.fit(
        *good, batch_size=16, verbose=0, callbacks=[checkpoint, stopper]
    ).history
    saved = model.get_weights()
    history_bad = model.fit(
        *bad, batch_size=16, epochs=2, verbose=0, callbacks=[checkpoint]
    ).history
    assert np.isfinite(history["loss"][0]) and history["loss"][0] > 0
    for key in ("loss", "mae", "gradient_norm"):
        assert np.isnan(history_bad[key]).all(), (key, history_bad[key])
    assert history_bad["nonfinite_steps"] == [2.0, 2.0]
    loaded = keras.models.load_model(best)
    for a, b in zip(saved, loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Control: what Keras logs for a mean that counted nothing, which a
    # best-only checkpoint would have taken for the best epoch.
    assert float(keras.metrics.Mean().result()) == 0.0


def test_without_guard_the_last_finite_weights_are_put_back(tmp_path):
    model = _model(skip_nonfinite=False)
    good, bad = _data(False), _data(True)
    model.fit(*good, batch_size=16, epochs=2, verbose=0)
    weights = model.get_weights()
    slots = [v.numpy() for v in model.optimizer.variables]
    backup = tmp_path / "backup"
    with pytest.warns(UserWarning, match="start of training.*put back"):
        history = model.fit(
            *bad,
            batch_size=16,
            epochs=3,
            initial_epoch=0,
            verbose=0,
            callbacks=[
                fitcustom.BackupAndRestore(backup, delete_checkpoint=False)
            ],
        ).history
    assert len(history["loss"]) == 1
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, [v.numpy() for v in model.optimizer.variables]):
        np.testing.assert_array_equal(a, b)
    # The backup written at that epoch's end holds the restored weights.
    (saved,) = backup.glob("backup-*.weights.h5")
    restored = _model(skip_nonfinite=False)
    restored.load_weights(saved)
    for a, b in zip(weights, restored.get_weights()):
        np.testing.assert_array_equal(a, b)
