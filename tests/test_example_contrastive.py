"""The example program `scripts/examples/contrastive.py`: it trains end to end
(`--smoke`), and its step, written with the engine's tools, trains on 2
replicas what it trains on one device and continues exactly after a save
and a load in a fresh process; negatives from one
replica's images only fail the replica comparison (the control)."""

import functools

import keras
import numpy as np
import tensorflow as tf
from helpers import max_abs_diff
from task_harness import Task
from task_harness import check_backup_resume
from task_harness import check_continue_in_fresh_process
from task_harness import check_kill_and_resume

import fitcustom
from scripts.examples import contrastive as contrastive_example


def _contrastive_data(n=64):
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(n, 8, 8, 1)).astype("float32")
    return x, rng.integers(0, 10, size=n)


def _contrastive(cls=None, **compile_kwargs):
    """The example's model at a tiny size, compiled; `cls` rebuilds it
    from the same networks as a subclass of the example's class."""
    keras.utils.set_random_seed(0)
    model = contrastive_example.build_contrastive(
        width=16, features=8, projected=4
    )
    if cls is not None:
        model = cls(model.encoder, model.projection, model.probe)
    model.compile(
        optimizer={
            "contrastive": keras.optimizers.SGD(0.05),
            "probe": keras.optimizers.SGD(0.1),
        },
        **compile_kwargs,
    )
    return model


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class ContrastiveWithEMA(contrastive_example.Contrastive):
    """The example's step with an EMA copy of its encoder (as BYOL and
    MoCo keep one), following the contrastive optimizer's updates."""

    def __init__(self, encoder, projection, probe, **kwargs):
        super().__init__(encoder, projection, probe, **kwargs)
        self.ema_encoder = self.track_ema(
            self.encoder, 0.5, optimizer="contrastive"
        )


def _contrastive_with_ema(**compile_kwargs):
    return _contrastive(ContrastiveWithEMA, **compile_kwargs)


EMA_TASK = Task(
    build=_contrastive_with_ema,
    data=_contrastive_data,
    fit_kwargs={"batch_size": 16, "shuffle": False},
)

CONTRASTIVE_TASK = Task(
    build=_contrastive,
    data=_contrastive_data,
    fit_kwargs={"batch_size": 16, "shuffle": False},
)


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class ContrastPerReplica(contrastive_example.Contrastive):
    """The control: negatives from this replica's images only."""

    def gather(self, *views):
        return list(views), tf.range(tf.shape(views[0])[0])


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class RowsOfAnEvenSplit(contrastive_example.Contrastive):
    """The control of an uneven split: this replica's rows taken as
    `replica * local size`, right only when the replicas hold as many
    samples each."""

    def gather(self, *views):
        n = tf.shape(views[0])[0]
        rows = fitcustom.distribute.replica_id() * n + tf.range(n)
        return [fitcustom.distribute.all_gather(v) for v in views], rows


def _gathered_on_two_replicas(cls, strategy):
    """What `cls.gather` gives each replica for a last batch of 9 split 5
    and 4: the gathered rows, and the positions it names as its own."""
    model = _contrastive(cls)
    projections = np.arange(9 * 2, dtype="float32").reshape(9, 2)
    parts = tf.constant(projections[:5]), tf.constant(projections[5:])

    def run():  # eager: each replica takes its part
        mine = parts[int(fitcustom.distribute.replica_id())]
        (gathered,), rows = model.gather(mine)
        return tf.gather(gathered, rows), mine

    own, mine = (
        strategy.experimental_local_results(r) for r in strategy.run(run)
    )
    return own, mine


def test_contrastive_rows_of_a_batch_split_unevenly(two_replicas):
    """A last batch of 9 on 2 replicas is split 5 and 4 (57 samples in
    batches of 16): the rows the example names as a replica's own in the
    gathered projections are its own samples, so each image meets its
    twin. Rows that assume an even split (`replica * local size`) name
    another replica's samples (the control).

    Over such a batch the update follows Keras' reduction (each replica's
    mean over its own samples, divided by the number of replicas: (mean
    of 5 + mean of 4) / 2), as built-in fit() does; the replica tests use
    batches the replicas divide evenly."""
    own, mine = _gathered_on_two_replicas(
        contrastive_example.Contrastive, two_replicas
    )
    for a, b in zip(own, mine, strict=True):
        np.testing.assert_array_equal(a, b)
    own, mine = _gathered_on_two_replicas(RowsOfAnEvenSplit, two_replicas)
    assert not np.array_equal(own[1], mine[1])


def test_contrastive_program_runs_and_writes_its_outputs(tmp_path):
    last = contrastive_example.main(
        ["--output-dir", str(tmp_path), "--smoke", "--verbose", "0"]
    )
    for name in ("contrastive.keras", "history.csv", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    np.testing.assert_allclose(
        last["loss"],
        last["contrastive_loss"] + last["probe_loss"],
        rtol=1e-5,
    )
    # The test step logs only the probe: no val_ value of a term it does
    # not compute (Keras would log 0.0).
    assert "val_contrastive_loss" not in last
    assert last["val_loss"] == last["val_probe_loss"]


def test_contrastive_on_two_replicas_trains_what_one_device_trains(
    two_replicas,
):
    x, y = _contrastive_data()
    report = fitcustom.testing.check_replicas(
        _contrastive,
        x,
        y,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
        shuffle=False,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_contrasting_per_replica_fails_the_comparison(two_replicas):
    x, y = _contrastive_data()
    report = fitcustom.testing.check_replicas(
        functools.partial(_contrastive, ContrastPerReplica),
        x,
        y,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        shuffle=False,
    )
    assert not report.ok, report
    assert report.log_diffs["contrastive_loss"] > 0.05, report


def test_contrastive_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_example_contrastive", "CONTRASTIVE_TASK", tmp_path
    )
    assert result["steps"] == [8, 8]
    assert {"contrastive_loss", "probe_loss", "probe_accuracy"} <= set(
        result["logs"]
    )


def test_contrastive_resumes_two_optimizers_and_an_ema_exactly(tmp_path):
    """Interrupted after 3 of 4 batches (the backup holds 2), the step
    with two optimizers and an EMA copy resumes to the weights (EMA copy
    included) of a run that never stopped."""
    weights, logs, steps = check_backup_resume(EMA_TASK, tmp_path)
    assert weights <= 1e-6 and logs <= 1e-5, (weights, logs)
    assert steps == ([8, 8], [8, 8])
    model = EMA_TASK.build()
    EMA_TASK.fit(model, epochs=1)
    far = max_abs_diff(
        model.ema_encoder.get_weights(), model.encoder.get_weights()
    )
    assert far > 1e-4  # the copy lags: the comparison covers it


def test_contrastive_with_an_ema_killed_mid_epoch_resumes_exactly(tmp_path):
    """The same, with a real SIGKILL after batch 2 of 4 (the backup holds
    2 batches) and the same command run again in a fresh process: bit for
    bit the run that was never killed, both optimizers' step counts and
    the EMA copy included."""
    result = check_kill_and_resume(
        "test_example_contrastive", "EMA_TASK", tmp_path, at=2
    )
    assert result["steps"] == [8, 8]
    assert {"contrastive_loss", "probe_loss"} <= set(result["logs"])


def test_contrastive_under_mixed_precision_takes_float32_sized_updates():
    x, y = _contrastive_data()
    report = fitcustom.testing.check_mixed_precision(
        _contrastive, x, y, batch_size=16, epochs=2, shuffle=False
    )
    report.assert_ok()
