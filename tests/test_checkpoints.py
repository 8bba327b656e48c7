"""Atomic saving: the previous file survives an interrupted or failed write."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import threading
import uuid
import warnings
import zipfile

import keras
import numpy as np
import pytest
from helpers import assert_weights_close

import fitcustom
from fitcustom import checkpoints


def _model(width=4, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(width)(inputs))
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, width), "float32")
    model.fit(x, x, verbose=0)
    return model


def _leftovers(directory):
    return [
        n
        for n in os.listdir(directory)
        if n.startswith(checkpoints.TEMP_PREFIX)
    ]


@contextlib.contextmanager
def _hook(function):
    checkpoints._before_replace = function
    try:
        yield
    finally:
        checkpoints._before_replace = None


def _interrupt(temp, target):
    raise KeyboardInterrupt


@pytest.mark.parametrize("what", ["save", "save_weights"])
def test_interrupted_save_keeps_the_old_file(tmp_path, what):
    suffix = ".keras" if what == "save" else ".weights.h5"
    path = tmp_path / f"model{suffix}"
    old = _model(seed=0)
    getattr(old, what)(path)
    new = _model(seed=1)
    with _hook(_interrupt), pytest.raises(KeyboardInterrupt):
        getattr(new, what)(path)
    assert _leftovers(tmp_path) == []
    restored = _model(seed=2)
    if what == "save":
        restored = keras.models.load_model(path)
    else:
        restored.load_weights(path)
    assert_weights_close(old.get_weights(), restored.get_weights(), atol=0)
    getattr(new, what)(path)  # and a complete save replaces it
    if what == "save":
        restored = keras.models.load_model(path)
    else:
        restored.load_weights(path)
    assert_weights_close(new.get_weights(), restored.get_weights(), atol=0)


def test_failing_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC from the file system)."""
    path = tmp_path / "model.weights.h5"
    old = _model(seed=0)
    old.save_weights(path)

    def half_written(model, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", half_written)
    with pytest.raises(OSError, match="No space"):
        _model(seed=1).save_weights(path)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []
    restored = _model(seed=2)
    restored.load_weights(path)
    assert_weights_close(old.get_weights(), restored.get_weights(), atol=0)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where the machine lets the test mount one (root)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory, leave):
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_disk_keeps_the_old_file(small_disk):
    path = small_disk / "model.keras"
    old = _model(width=4)
    old.save(path)
    _fill(small_disk, leave=64 * 1024)
    big = _model(width=200)  # ~480 KB of weights and optimizer state
    with pytest.raises(OSError):
        big.save(path)
    assert _leftovers(small_disk) == []
    loaded = keras.models.load_model(path)
    assert_weights_close(old.get_weights(), loaded.get_weights(), atol=0)
    # Control: Keras' own save destroys the old file on the same disk.
    with pytest.raises(OSError):
        keras.Model.save(big, path)
    with pytest.raises(Exception):  # noqa: B017 - any load error
        keras.models.load_model(path)


def _backup_files(directory):
    return sorted(p.name for p in directory.glob("backup-*.weights.h5"))


def test_backup_removes_leftovers_and_resumes_from_the_newest(tmp_path):
    backup = tmp_path / "backup"
    x = np.ones((16, 4), "float32")

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    model = _model()
    callback = fitcustom.BackupAndRestore(backup, delete_checkpoint=False)
    model.fit(x, x, epochs=5, verbose=0, callbacks=[callback, StopAfter()])
    # One backup kept: the end of epoch index 1, so resume at epoch 2.
    assert _backup_files(backup) == [
        "backup-000000001-epoch000002-done000000000.weights.h5"
    ]
    (backup / f"{checkpoints.TEMP_PREFIX}123-abc-x.weights.h5").write_bytes(
        b"half"
    )
    resumed = _model(seed=5)
    epochs = []
    history = resumed.fit(
        x,
        x,
        epochs=5,
        verbose=0,
        callbacks=[
            fitcustom.BackupAndRestore(backup),
            keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda e, logs: epochs.append(e)
            ),
        ],
    )
    assert epochs == [2, 3, 4]
    assert len(history.history["loss"]) == 3
    assert not backup.exists()


def test_truncated_keras_backup_warns_and_starts_over(tmp_path):
    """What Keras' own callback leaves after a kill during its write: the
    restart used to fail with 'file signature not found' forever."""
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n")
    (backup / "training_metadata.json").write_text('{"epoch": 3')
    x = np.ones((16, 4), "float32")
    model = _model()
    with pytest.warns(UserWarning, match="unreadable.*starts over"):
        history = model.fit(
            x,
            x,
            epochs=2,
            verbose=0,
            callbacks=[fitcustom.BackupAndRestore(backup)],
        )
    assert len(history.history["loss"]) == 2
    # Control: Keras' own callback cannot get past it.
    backup.mkdir()
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(OSError):
        model.fit(
            x,
            x,
            epochs=2,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup)],
        )


def test_model_checkpoint_interrupted_keeps_the_best(tmp_path):
    path = tmp_path / "best.keras"
    x = np.ones((16, 4), "float32")
    model = _model()
    model.fit(
        x,
        x,
        epochs=1,
        verbose=0,
        callbacks=[fitcustom.ModelCheckpoint(path, monitor="loss")],
    )
    saved = model.get_weights()
    with _hook(_interrupt), pytest.raises(KeyboardInterrupt):
        model.fit(
            x,
            x,
            epochs=1,
            verbose=0,
            callbacks=[fitcustom.ModelCheckpoint(path, monitor="loss")],
        )
    loaded = keras.models.load_model(path)
    assert_weights_close(saved, loaded.get_weights(), atol=0)
    # A plain keras.Model gets the same through fitcustom's callback.
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    plain.compile(optimizer="sgd", loss="mse")
    with _hook(_interrupt), pytest.raises(KeyboardInterrupt):
        plain.fit(
            x,
            x,
            epochs=1,
            verbose=0,
            callbacks=[fitcustom.ModelCheckpoint(path, monitor="loss")],
        )
    loaded = keras.models.load_model(path)
    assert_weights_close(saved, loaded.get_weights(), atol=0)


def _rewrite_version(path, version):
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    config = json.loads(files["config.json"])
    assert config["config"]["fitcustom_version"] == fitcustom.__version__
    config["config"]["fitcustom_version"] = version
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


@pytest.mark.parametrize("cls", ["TapeModel", "TapeClassifier"])
def test_saved_file_records_the_fitcustom_version(tmp_path, cls):
    inputs = keras.Input((4,))
    model = getattr(fitcustom, cls)(inputs, keras.layers.Dense(3)(inputs))
    path = tmp_path / "model.keras"
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same version: no warning
        keras.models.load_model(path)
    _rewrite_version(path, "9.9.9")
    with pytest.warns(UserWarning, match="saved by fitcustom 9.9.9"):
        loaded = keras.models.load_model(path)
    assert_weights_close(model.get_weights(), loaded.get_weights(), atol=0)


def test_load_model_names_a_class_it_does_not_know(tmp_path):
    """Keras' own error for an unregistered class ends with the file's
    whole configuration; fitcustom.load_model names the class and the
    fix in a few lines."""
    package = f"test_{uuid.uuid4().hex[:8]}"

    @keras.saving.register_keras_serializable(package=package)
    class MyModel(fitcustom.TapeModel):
        pass

    inputs = keras.Input((4,))
    model = MyModel(inputs, keras.layers.Dense(3)(inputs))
    path = tmp_path / "mine.keras"
    model.save(path)
    loaded = fitcustom.load_model(path)  # registered: loads
    assert type(loaded).__name__ == "MyModel"
    # As in a program that never imported the class's module:
    del keras.saving.get_custom_objects()[f"{package}>MyModel"]
    with pytest.raises(TypeError, match="Full object config") as keras_error:
        keras.saving.load_model(path)
    with pytest.raises(ValueError) as ours:
        fitcustom.load_model(path)
    message = str(ours.value)
    assert f"'{package}>MyModel'" in message
    assert (
        "custom_objects={" in message
        and "register_keras_serializable" in message
    )
    assert len(message) < 400 < len(str(keras_error.value))
    loaded = fitcustom.load_model(
        path, custom_objects={f"{package}>MyModel": MyModel}
    )
    np.testing.assert_array_equal(
        loaded.get_weights()[0], model.get_weights()[0]
    )


class _Crash(keras.callbacks.Callback):
    """Stops the run with an exception after batch `batch` of epoch 0."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError("crash")


def test_resume_with_another_batch_size_is_refused_or_warned(tmp_path):
    """Mid-epoch, the batches already trained cannot be skipped in a new
    batching: refused. At an epoch's end training can go on, but not to
    the interrupted run's numbers: a warning."""
    x = np.ones((16, 4), "float32")
    backup = tmp_path / "mid"
    with pytest.raises(RuntimeError, match="crash"):
        _model().fit(
            x,
            x,
            batch_size=4,
            epochs=2,
            verbose=0,
            callbacks=[
                fitcustom.BackupAndRestore(backup, save_freq=1),
                _Crash(1),
            ],
        )
    model = _model()
    before = model.get_weights()
    with pytest.raises(
        ValueError, match=r"after 2 of the 4 batches.*now has 2"
    ):
        model.fit(
            x,
            x,
            batch_size=8,
            epochs=2,
            verbose=0,
            callbacks=[fitcustom.BackupAndRestore(backup, save_freq=1)],
        )
    assert_weights_close(before, model.get_weights(), atol=0)

    class StopAfterFirst(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    backup = tmp_path / "epoch"
    _model().fit(
        x,
        x,
        batch_size=4,
        epochs=2,
        verbose=0,
        callbacks=[
            fitcustom.BackupAndRestore(backup, delete_checkpoint=False),
            StopAfterFirst(),
        ],
    )
    with pytest.warns(UserWarning, match="4 batches per epoch.*now has 2"):
        history = _model().fit(
            x,
            x,
            batch_size=8,
            epochs=2,
            verbose=0,
            callbacks=[fitcustom.BackupAndRestore(backup)],
        )
    assert len(history.history["loss"]) == 1  # epoch 2 only


class _Notice(keras.callbacks.Callback):
    """Sends this process `number` after batch `batch` of epoch `epoch`,
    as a cluster's preemption notice would arrive."""

    def __init__(self, number, epoch, batch):
        super().__init__()
        self.number, self.at = number, (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), self.number)


def _stopping_run(backup, extra=(), **backup_kwargs):
    """A model trained with EarlyStopping (stops after epoch 4 of 6 when
    uninterrupted) beside the backup; returns (model, EarlyStopping,
    the backup callback)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 4)).astype("float32")
    model = _model()
    stopping = keras.callbacks.EarlyStopping(
        "loss", min_delta=0.2, patience=1, restore_best_weights=True
    )
    callbacks = [
        fitcustom.BackupAndRestore(backup, **backup_kwargs),
        *extra,
        stopping,
    ]
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=6,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
    )
    return model, stopping, callbacks[0]


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are set in the main thread only",
)
def test_outside_fit_a_notice_reaches_the_handler_that_was_there(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda n, _: seen.append(n))
    try:
        # Control: during fit() the backup takes the notice, not the
        # program's handler.
        _, _, backup = _stopping_run(
            tmp_path / "during",
            extra=[_Notice(signal.SIGUSR1, 1, 1)],
            exit_on_preemption=False,
        )
        assert backup.preempted_by == "SIGUSR1" and seen == []
        # After fit() returned: the program's handler, and no backup.
        model, _, backup = _stopping_run(tmp_path / "after")
        assert backup.preempted_by is None
        os.kill(os.getpid(), signal.SIGUSR1)
        model.predict(np.ones((4, 4), "float32"), verbose=0)  # runs on
        assert seen == [signal.SIGUSR1]
        assert fitcustom.BackupAndRestore.progress(tmp_path / "after") is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are set in the main thread only",
)
def test_a_notice_stops_fit_with_a_backup_and_the_rerun_resumes(tmp_path):
    straight, straight_stopping, _ = _stopping_run(tmp_path / "straight")
    assert 0 < straight_stopping.stopped_epoch < 5
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        _, _, backup = _stopping_run(
            tmp_path / "b",
            extra=[_Notice(signal.SIGUSR1, 1, 1)],
            exit_on_preemption=False,
        )
        # fit() returned early; the handler before fit() is back.
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert backup.preempted_by == "SIGUSR1"
    # Sent after batch 1 (once the backup callback had seen it): saved
    # after the next one, the step that was running.
    assert fitcustom.BackupAndRestore.progress(tmp_path / "b") == (1, 3)
    resumed, stopping, _ = _stopping_run(tmp_path / "b")
    assert stopping.stopped_epoch == straight_stopping.stopped_epoch
    assert stopping.best == straight_stopping.best
    assert_weights_close(straight.get_weights(), resumed.get_weights(), atol=0)
    # Control: the same resume without the callbacks' state in the backup
    # (Keras' EarlyStopping starts over) does not stop where it should.
    _stopping_run(
        tmp_path / "c",
        extra=[_Notice(signal.SIGUSR1, 1, 1)],
        exit_on_preemption=False,
    )
    with h5py_file(tmp_path / "c") as f:
        del f["callbacks"]
    _, stopping, _ = _stopping_run(tmp_path / "c")
    assert stopping.stopped_epoch != straight_stopping.stopped_epoch


#: The chained run of the random-moments test: 8 batches an epoch.
BATCHES, EPOCHS = 8, 8


def _noticed_run(backup_dir, extra=(), exit_on_preemption=False, kind="mlp"):
    """A Dropout model (its masks must resume too), or a GAN with an EMA
    generator (`kind="gan"`), for EPOCHS epochs of BATCHES batches beside
    the backup; returns (model, history, the backup callback)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8 * BATCHES, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 2)).astype("float32")
    keras.utils.set_random_seed(0)
    if kind == "gan":
        generator = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4, activation="tanh")]
        )
        discriminator = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        model = fitcustom.TapeGAN(
            generator=generator,
            discriminator=discriminator,
            latent_dim=3,
            ema_decay=0.9,
        )
        model.compile()
        x, y = np.tanh(x), None
    else:
        inputs = keras.Input((4,))
        h = keras.layers.Dropout(0.2)(keras.layers.Dense(8)(inputs))
        model = fitcustom.TapeModel(inputs, keras.layers.Dense(2)(h))
        model.compile(optimizer="adam", loss="mse")
    backup = fitcustom.BackupAndRestore(
        backup_dir, exit_on_preemption=exit_on_preemption
    )
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[backup, *extra],
    )
    return model, history.history, backup


def _saved_step(backup_dir):
    epochs, batches = fitcustom.BackupAndRestore.progress(backup_dir)
    return BATCHES * epochs + batches


class _FullDisk(_Notice):
    """The notice, with every later backup write failing (no space)."""

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:

            def full(temp, target):
                raise OSError(errno.ENOSPC, "No space left on device")

            checkpoints._before_replace = full
        super().on_train_batch_end(batch, logs)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are set in the main thread only",
)
@pytest.mark.parametrize("exits", [False, True], ids=["returns", "exits"])
def test_a_backup_that_cannot_be_written_at_a_notice_keeps_the_last(
    tmp_path, capsys, exits
):
    backup_dir = tmp_path / "backup"
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        expected = SystemExit if exits else OSError
        with pytest.raises(expected) as raised:
            _noticed_run(
                backup_dir,
                extra=[_FullDisk(signal.SIGUSR1, 2, 3)],
                exit_on_preemption=exits,
            )
    finally:
        checkpoints._before_replace = None
        signal.signal(signal.SIGUSR1, previous)
    if exits:
        assert raised.value.code == 128 + signal.SIGUSR1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert (
        "SIGUSR1 received, but the backup after 5 batches of epoch 3"
        in (lines[0])
    )
    assert "could not be written" in lines[0]
    assert "the last backup (end of epoch 2) is kept" in lines[0]
    # The last backup is whole, and the run resumes from it exactly.
    assert fitcustom.BackupAndRestore.progress(backup_dir) == (2, 0)
    assert not _leftovers(backup_dir)
    straight, _, _ = _noticed_run(tmp_path / "straight")
    resumed, _, _ = _noticed_run(backup_dir)
    assert_weights_close(straight.get_weights(), resumed.get_weights(), atol=0)


@contextlib.contextmanager
def h5py_file(backup_dir):
    import h5py

    (path,) = list(backup_dir.glob("backup-*.weights.h5"))
    with h5py.File(path, "a") as f:
        yield f


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preemption_signals=("SIGKILL",)), "SIGKILL cannot be caught"),
        (dict(preemption_signals=("SIGNOPE",)), "'SIGNOPE', which is not"),
        (dict(exit_code=300), "int from 0 to 255.*300"),
    ],
    ids=["sigkill", "unknown", "exit_code"],
)
def test_bad_preemption_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fitcustom.BackupAndRestore(tmp_path, **kwargs)


def test_keras_backup_and_restore_is_met_with_a_warning(tmp_path):
    x = np.ones((8, 4), "float32")
    model = _model()
    with pytest.warns(UserWarning, match=r"fitcustom.BackupAndRestore\(...\)"):
        model.fit(
            x,
            x,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(tmp_path / "k")],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.fit(
            x,
            x,
            verbose=0,
            callbacks=[fitcustom.BackupAndRestore(tmp_path / "f")],
        )
