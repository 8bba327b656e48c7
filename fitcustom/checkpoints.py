"""Durable saving: a kill or a full disk never destroys a good file.

Keras writes every file in place: `model.save()` opens the target for
writing, and `keras.callbacks.BackupAndRestore` rewrites its backup. A
process killed during the write (or a disk that fills up) leaves a
truncated file where the good one was, and a restart cannot read it.

Here every file is written to a temporary file in the same directory,
flushed to disk (`fsync`) and then renamed over the target (`os.replace`,
atomic on POSIX and Windows): the target is always either the old
complete file or the new complete one. What is provided:

- `save_model(model, path)` and `save_weights(model, path)`: atomic
  versions of `model.save()` and `model.save_weights()` for any Keras
  model. `fitcustom.TapeModel.save()` and `.save_weights()` use them.
- `ModelCheckpoint`: Keras' callback (same arguments) saving through them.
- `BackupAndRestore`: Keras' callback (same arguments) whose backup is one
  file written atomically, named by the epoch and batch it holds, so the
  weights and the place to resume from can never disagree.

Paths with a scheme (`gs://...`) and sharded weights (`max_shard_size`)
are written by Keras as before: a rename is not atomic there.

Example:

```python
import keras
import numpy as np
import fitcustom

inputs = keras.Input((4,))
model = fitcustom.TapeModel(inputs, keras.layers.Dense(1)(inputs))
model.compile(optimizer="sgd", loss="mse")
x, y = np.ones((32, 4)), np.zeros((32, 1))
model.fit(
    x, y, epochs=2, verbose=0,
    callbacks=[fitcustom.BackupAndRestore("/tmp/fitcustom_doc_backup")],
)
fitcustom.checkpoints.save_model(model, "/tmp/fitcustom_doc_model.keras")
```

May import: the ground floor, `_keras`, `callback_states` and `preemption`.
"""

import contextlib
import os
import re
import shutil
import typing
import uuid
import warnings

import keras

from fitcustom import callback_states
from fitcustom import distribute
from fitcustom import preemption
from fitcustom._engine_state import fit_callbacks_of
from fitcustom._engine_state import logged_names
from fitcustom._keras import compat as _compat

#: Prefix of the temporary files written before the rename. Leftovers of a
#: killed write are removed by `BackupAndRestore` on start.
TEMP_PREFIX = ".fitcustom-tmp-"

# Test hook: called as `_before_replace(temp_path, target_path)` after the
# temporary file is complete and flushed, just before the rename (a test
# kills the process there to show that the old file survives).
_before_replace = None


def _is_local(filepath) -> bool:
    return "://" not in str(filepath)


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory):
    # A rename is durable once the directory entry is on disk; Windows
    # cannot open a directory, and there the rename itself is enough.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(filepath):
    """A temporary path to write `filepath`'s new content to.

    Yields a path in the same directory whose name ends like
    `filepath`'s (Keras checks the `.keras` / `.weights.h5` endings).
    When the block ends without an error the file is flushed to disk and
    renamed over `filepath`; on any error (a full disk, an interrupt) the
    temporary file is removed and `filepath` is left as it was.

    Args:
        filepath: The file to (re)write. Its directory is created if
            missing.
    """
    filepath = os.fspath(filepath)
    directory = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(
        directory,
        f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        f"{os.path.basename(filepath)}",
    )
    try:
        yield temp
        _fsync_file(temp)
        if _before_replace is not None:
            _before_replace(temp, filepath)
        os.replace(temp, filepath)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    _fsync_dir(directory)


def _may_overwrite(filepath, overwrite):
    if overwrite or not os.path.exists(filepath):
        return True
    return _compat.ask_to_overwrite(filepath)


def save_model(model, filepath, overwrite=True, zipped=None, **kwargs):
    """`model.save(filepath)`, written atomically (see the module).

    Args:
        model: A Keras model.
        filepath: A `.keras` path.
        overwrite: As in `keras.Model.save`. Defaults to `True`.
        zipped: As in `keras.Model.save`; an unzipped save (a directory)
            is written by Keras as it is.
        **kwargs: Other arguments of `keras.Model.save`.
    """
    if not _is_local(filepath) or zipped is False:
        return keras.Model.save(model, filepath, overwrite, zipped, **kwargs)
    if not _may_overwrite(filepath, overwrite):
        return None
    with atomic_path(filepath) as temp:
        keras.Model.save(model, temp, True, zipped, **kwargs)
    return None


def save_weights(model, filepath, overwrite=True, max_shard_size=None):
    """`model.save_weights(filepath)`, written atomically.

    Args:
        model: A Keras model.
        filepath: A `.weights.h5` path.
        overwrite: As in `keras.Model.save_weights`. Defaults to `True`.
        max_shard_size: As in `keras.Model.save_weights`; sharded weights
            (several files) are written by Keras as they are.
    """
    if not _is_local(filepath) or max_shard_size is not None:
        return keras.Model.save_weights(
            model, filepath, overwrite, max_shard_size
        )
    if not _may_overwrite(filepath, overwrite):
        return None
    with atomic_path(filepath) as temp:
        keras.Model.save_weights(model, temp, True)
    return None


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """`keras.saving.load_model` with fitcustom's classes registered, and a
    short message when the file holds a class that is not.

    Importing fitcustom is what makes its classes known to Keras; a class
    of your own (a `TapeModel` subclass, a custom layer) must be imported
    too, or given in `custom_objects`. Keras' own error for a missing
    class ends with the file's whole configuration (kilobytes of JSON);
    this one names the class and how to make it known.

    Args:
        filepath: A `.keras` file.
        custom_objects: As in `keras.saving.load_model`.
        compile: As in `keras.saving.load_model`. Defaults to `True`.
        safe_mode: As in `keras.saving.load_model`. Defaults to `True`.

    Returns:
        The model.
    """
    try:
        return keras.saving.load_model(
            filepath,
            custom_objects=custom_objects,
            compile=compile,
            safe_mode=safe_mode,
        )
    except TypeError as e:
        found = re.match(r"Could not locate (\w+) '([^']+)'", str(e))
        if found is None:
            raise
        kind, name = found.groups()
        # Keras looks the class up by its registered name ("package>name").
        registered = re.search(
            r"'registered_name': '([^']*>" + re.escape(name) + ")'", str(e)
        )
        if registered is not None:
            name = registered.group(1)
    raise ValueError(
        f"{filepath} holds a {kind} {name!r} that Keras does not know in "
        "this program. Received: no registered class of that name. Import "
        "the module that defines it (decorated with "
        "@keras.saving.register_keras_serializable()) before loading, or "
        f"pass custom_objects={{{name!r}: {name.split('>')[-1]}}}."
    ) from None


class _AtomicSaves:
    """A model whose `save` / `save_weights` are the atomic ones; every
    other attribute is the model's."""

    def __init__(self, model):
        self._wrapped = model

    def save(self, filepath, overwrite=True, **kwargs):
        save_model(self._wrapped, filepath, overwrite, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        save_weights(self._wrapped, filepath, overwrite, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


class ModelCheckpoint(_compat.KerasModelCheckpoint):
    """Keras' `ModelCheckpoint`, writing each file atomically.

    Same arguments and behaviour as `keras.callbacks.ModelCheckpoint`
    (`monitor`, `save_best_only`, `save_weights_only`, `save_freq`, ...);
    a kill or a full disk during a save leaves the previous checkpoint
    complete and loadable, where Keras' own leaves a truncated file.
    """

    def model_for_saving(self, model):
        return _AtomicSaves(model)


_BACKUP_NAME = re.compile(r"^backup-(\d+)-epoch(\d+)-done(\d+)\.weights\.h5$")
_RESUME_GROUP = "fitcustom_resume"


class _Backup(typing.NamedTuple):
    """A complete backup file: its sequence number, the epoch and the
    batches of it done, and its path."""

    sequence: int
    epoch: int
    done: int
    path: str


def _list_backups(backup_dir):
    """Every complete backup in `backup_dir` (`_Backup`), newest last."""
    if not os.path.isdir(backup_dir):
        return []
    found = []
    for name in os.listdir(backup_dir):
        match = _BACKUP_NAME.match(name)
        if match:
            numbers = (int(g) for g in match.groups())
            found.append(_Backup(*numbers, os.path.join(backup_dir, name)))
    return sorted(found)


class BackupAndRestore(
    preemption.PreemptionHandling, _compat.KerasBackupAndRestore
):
    """Keras' `BackupAndRestore`: a backup that survives any kill, and a
    resume at the exact batch where training stopped.

    Same arguments as `keras.callbacks.BackupAndRestore`. The backup is one
    weights file written atomically (see the module): model weights,
    optimizer state, random generator states, the metrics' running
    values, and where training is, named by a sequence number, the epoch
    and the batches of it already trained
    (`backup-000000004-epoch000003-done000000010.weights.h5`). The
    previous backup is removed only once the new one is in place; the one
    with the highest sequence number is restored. Keras' own callback
    rewrites `latest.weights.h5` and then `training_metadata.json` in
    place: a kill during either write leaves a backup that the restart
    cannot read, or weights that do not match the recorded epoch.

    With a batch-level `save_freq`, a fitcustom model resumes after the
    last batch the backup holds: the batches of that epoch already
    trained are read and skipped, not trained again (Keras' callback
    replays the whole epoch), and the epoch's logs include them. The run
    then ends with exactly the weights of an uninterrupted run when the
    batches come in the same order on every run: `shuffle=False`, or
    `shuffle=True` (fit()'s default) in a run seeded with
    `keras.utils.set_random_seed` (Keras then draws the same shuffled
    order in every process), or a dataset without unseeded shuffling.
    Unseeded, the resumed epoch skips as many batches of a new order.
    A backup taken mid-epoch
    is refused if the number of batches per epoch has changed (another
    `batch_size` or data size). Other Keras models resume at the start of
    the epoch, as with Keras' callback.

    Args:
        backup_dir: Directory of the backup; one per training run.
        save_freq: `"epoch"` or a number of batches. Defaults to
            `"epoch"`.
        double_checkpoint: Accepted for compatibility; the previous backup
            is always kept until the new one is complete. Defaults to
            `False`.
        delete_checkpoint: Delete the backup when training ends. Defaults
            to `True`.
        preemption_signals: Signals that mean "this job is about to be
            stopped" (Kubernetes and spot machines send SIGTERM, Slurm's
            `--signal` what it is told): the running step finishes, the
            backup is written at that step, and the process exits. Names
            or numbers; `None` or `()` leaves the signals alone. Defaults
            to `("SIGTERM", "SIGUSR1")`.
        exit_code: The exit status after a preemption backup. Defaults to
            128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1:
            what a shell reports for a process the signal stopped), so a
            restart policy or `--requeue` sees a job that did not finish.
        exit_on_preemption: `True` (default) exits the process (`SystemExit`
            raised from the callback) once the backup is written, so the
            code after `fit()` (a final save, an evaluation) does not run
            on an unfinished model. `False` stops training instead:
            `fit()` returns early, the backup is kept, and the callback's
            `preempted_by` names the signal.

    A notice during validation (or between an epoch's last batch and its
    end) is acted upon at the end of the epoch, after validation. With
    `exit_on_preemption=False`, Keras still ends the epoch that was cut
    short (validation and the other callbacks' `on_epoch_end` run on it),
    after the backup was written. With
    `steps_per_execution > 1` the backup is written when the running call
    returns. The state of Keras' `EarlyStopping`, `ModelCheckpoint` and
    `ReduceLROnPlateau` in the same `fit()` is in the backup too (for
    fitcustom models), so they go on as in an uninterrupted run.
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
        preemption_signals=("SIGTERM", "SIGUSR1"),
        exit_code=None,
        exit_on_preemption=True,
    ):
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        self.preemption_signals = preemption.signal_numbers(preemption_signals)
        if exit_code is not None and (
            isinstance(exit_code, bool)
            or not isinstance(exit_code, int)
            or not 0 <= exit_code <= 255
        ):
            raise ValueError(
                "exit_code is the process's exit status: an int from 0 to "
                f"255, or None for 128 + the signal number. Received: "
                f"{exit_code!r}."
            )
        self.exit_code = exit_code
        self.exit_on_preemption = bool(exit_on_preemption)
        self.preempted_by = None
        self._notice = None
        self._previous_handlers = {}
        self._pending_states = None
        self._epoch_end = None

    def on_train_begin(self, logs=None):
        self._resume_at = None
        self._notice = None
        self.preempted_by = None
        self._pending_states = None
        self._epoch_end = None
        self._remove_leftovers()
        self._restore()
        self._install_handlers()

    def on_train_end(self, logs=None):
        self._write_epoch_end(last=True)
        self._remove_handlers()
        if self.preempted_by is not None:
            return  # the backup is what the next run resumes from
        if self.delete_checkpoint and _is_local(self.backup_dir):
            # Workers that share the directory all remove it: once every
            # one has finished its last save (a barrier: the slowest could
            # still be renaming its file), and what one removed first is
            # not an error for the others.
            distribute.first_flag_of_any_worker(
                0, self.model.distribute_strategy
            )
            shutil.rmtree(self.backup_dir, onerror=_unless_gone)
        else:
            super().on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._write_epoch_end()
        # Keras sets the epoch only at epoch end, so that a batch-level
        # backup written in the first epoch after a resume recorded epoch 0.
        self._epoch = epoch
        if self._pending_states is not None:
            # After every callback's on_train_begin (EarlyStopping and
            # ReduceLROnPlateau reset themselves there).
            callback_states.set_states(
                self._sibling_callbacks(), *self._pending_states
            )
            self._pending_states = None

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted_by is not None:
            return  # the end of an epoch cut short: the backup is taken
        self._epoch = epoch + 1
        self.start_batch_count()
        noticed = self._agreed_notice()
        if noticed:
            self.model.stop_training = True
        if noticed or self.save_freq == "epoch":
            # Written once every callback has ended the epoch (at the next
            # epoch's start, or at the end of training): the callbacks
            # after this one in the list (EarlyStopping, ModelCheckpoint)
            # have counted the epoch in the state the backup keeps.
            self._epoch_end = (epoch + 1, noticed)

    def _write_epoch_end(self, last=False):
        """The backup of the epoch that ended, with a notice: the exit."""
        if self._epoch_end is None:
            return
        (epoch, noticed), self._epoch_end = self._epoch_end, None
        if noticed:
            self._preempt(epoch, 0)
        elif not (last and self.delete_checkpoint):
            self._save_at(epoch, 0)

    def on_train_batch_end(self, batch, logs=None):
        skipped = False
        if self._resume_at is not None:
            epoch, done = self._resume_at
            if epoch == self._epoch and batch < done:
                skipped = True  # the state is still the backup's
            else:
                self._resume_at = None
        if self._agreed_notice():
            self._preempt(self._epoch, batch + 1, save=not skipped)
            return
        if skipped or not self.should_save_on_batch(batch):
            return
        self._save_at(self._epoch, batch + 1)

    def _sibling_callbacks(self):
        """The other callbacks of the running `fit()` (known to fitcustom
        models only), in order."""
        model = self.model
        found = [] if model is None else fit_callbacks_of(model)
        return [c for c in found if c is not self]

    @staticmethod
    def progress(backup_dir):
        """Where the backup in `backup_dir` stands, without loading it.

        Returns:
            `(epochs, batches)`: the epochs completed and the batches of
            the next epoch already trained, or `None` when `backup_dir`
            holds no backup of this callback (a run that has not saved
            yet, or a finished one).
        """
        backups = _list_backups(backup_dir)
        return (backups[-1].epoch, backups[-1].done) if backups else None

    def _backups(self):
        return _list_backups(self.backup_dir)

    def _remove_leftovers(self):
        if not os.path.isdir(self.backup_dir):
            return
        for name in os.listdir(self.backup_dir):
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, name))

    def _restore(self):
        backups = self._backups()
        if not backups:
            self._load_keras_backup()
            return
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model to restore into. "
                f"Received: model {self.model.name!r}, not built. Build it "
                "before fit(), e.g. by calling it on a batch of data."
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        build_named = getattr(self.model, "_build_named_optimizers", None)
        if build_named is not None:
            build_named()
        _, epoch, done, path = backups[-1]
        metrics = self._check_resume(path, epoch, done)  # before loading
        self.model.load_weights(path)
        _compat.set_initial_epoch(self.model, epoch)
        self._epoch = epoch
        if done and metrics is not None:
            self._resume_within_epoch(epoch, done, metrics)

    def _check_resume(self, path, epoch, done):
        """Refuses (mid-epoch) or warns about (at an epoch's end) a backup
        written with another number of batches per epoch; returns the
        backup's metric values (None for a file without them)."""
        import h5py

        with h5py.File(path, "r") as f:
            group = f.get(_RESUME_GROUP)
            if group is None:  # not written by this callback
                return None
            steps = int(group.attrs["steps"])
            metrics = [
                group[f"metric_{i}"][()]
                for i in range(len(group))
                if f"metric_{i}" in group
            ]
            self._pending_states = callback_states.read_states(f)
            logged = [str(n) for n in group.attrs.get("logged", [])]
        if logged:
            # Values a step logs (made at their first use): made now, so
            # that the backup's running values find their place.
            self.model.create_logs(logged)
        now = self.params.get("steps")
        changed = steps >= 0 and now is not None and now != steps
        if changed and not done:
            warnings.warn(
                f"The backup in {self.backup_dir} was written by a run with "
                f"{steps} batches per epoch; an epoch now has {now} "
                "(another batch_size or data size). Training goes on from "
                f"epoch {epoch + 1}, but will not end with the numbers the "
                "interrupted run would have given.",
                stacklevel=2,
            )
        if changed and done:
            raise ValueError(
                f"The backup in {self.backup_dir} was taken after {done} of "
                f"the {steps} batches of epoch {epoch + 1}, but an epoch now "
                f"has {now} batches (another batch_size or data size), so "
                "training cannot go on where it stopped. Run with the "
                "batch_size and data of the interrupted run, or delete "
                f"{self.backup_dir} to start over."
            )
        return metrics

    def _resume_within_epoch(self, epoch, done, metrics):
        resume = getattr(self.model, "resume_within_epoch", None)
        if resume is None:
            warnings.warn(
                f"{type(self.model).__name__} cannot skip the {done} "
                f"batches of epoch {epoch + 1} that the backup already "
                "holds: the epoch is trained from its first batch again. "
                "fitcustom models resume at the exact batch.",
                stacklevel=2,
            )
            return
        resume(done, metrics)
        self._resume_at = (epoch, done)

    def _save_at(self, epoch, done):
        """Writes the backup of the state after `done` batches of
        `epoch`."""
        import h5py

        old = self._backups()
        sequence = old[-1].sequence + 1 if old else 0
        path = os.path.join(
            self.backup_dir,
            f"backup-{sequence:09d}-epoch{epoch:06d}-done{done:09d}.weights.h5",
        )
        steps = self.params.get("steps")
        with atomic_path(path) as temp:
            keras.Model.save_weights(self.model, temp, True)
            with h5py.File(temp, "a") as f:
                group = f.create_group(_RESUME_GROUP)
                group.attrs["steps"] = -1 if steps is None else int(steps)
                logged = logged_names(self.model)
                if logged:
                    group.attrs["logged"] = logged
                for i, variable in enumerate(self.model.metrics_variables):
                    group[f"metric_{i}"] = keras.ops.convert_to_numpy(variable)
                callback_states.write_states(f, self._sibling_callbacks())
        for stale in old:
            with contextlib.suppress(OSError):
                os.remove(stale.path)

    def _load_keras_backup(self):
        """Resumes from a backup of Keras' own callback in the same
        directory, if it is readable; warns and starts over if not."""
        if not os.path.exists(self.keras_backup_path):
            return
        try:
            self.load_keras_backup()
        except (OSError, ValueError) as e:
            warnings.warn(
                f"The backup in {self.backup_dir} was left unreadable by an "
                "interrupted write of keras.callbacks.BackupAndRestore "
                f"({type(e).__name__}: {str(e)[:200]}); training starts "
                "over. fitcustom.BackupAndRestore writes backups that a "
                "kill cannot damage.",
                stacklevel=2,
            )


def _unless_gone(function, path, exc_info):
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]
