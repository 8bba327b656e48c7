"""The example program `scripts/examples/vae.py`: it trains end to end
(`--smoke`), and its step, written with the engine's tools, trains on 2
replicas what it trains on one device and continues exactly after a save
and a load in a fresh process; a term divided twice fails the
replica comparison, a step without the loss scale the mixed-precision
one (the controls)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from task_harness import Task
from task_harness import check_continue_in_fresh_process

import fitcustom
from fitcustom import distribute
from scripts.examples import vae as vae_example


def _vae_data():
    rng = np.random.default_rng(0)
    return rng.uniform(size=(64, 8, 8, 1)).astype("float32"), None


def _vae(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = vae_example.build_vae(latent_dim=3, width=16)
    model.compile(optimizer=keras.optimizers.SGD(0.01), **compile_kwargs)
    return model


VAE_TASK = Task(
    build=_vae, data=_vae_data, fit_kwargs={"batch_size": 16, "shuffle": False}
)


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class KLDividedTwice(vae_example.VAE):
    """The control: the KL term divided by the replicas by hand, which
    the engine does already."""

    def terms(self, images, training):
        terms = super().terms(images, training)
        terms["kl"] = terms["kl"] / distribute.num_replicas()
        return terms


def test_vae_program_runs_and_writes_its_outputs(tmp_path):
    last = vae_example.main(
        ["--output-dir", str(tmp_path), "--smoke", "--verbose", "0"]
    )
    for name in ("vae.keras", "history.csv", "curves.png", "digits.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] == last
    # The loss is what the step minimised: its two terms.
    np.testing.assert_allclose(
        last["loss"], last["reconstruction"] + last["kl"], rtol=1e-5
    )
    assert last["kl"] > 0 and last["val_loss"] > 0
    assert not (tmp_path / "backup").exists()  # finished: no backup left
    # A finished run is kept unless --overwrite replaces it.
    with pytest.raises(SystemExit, match="holds a finished run"):
        vae_example.main(["--output-dir", str(tmp_path), "--smoke"])
    again = vae_example.main(
        ["--output-dir", str(tmp_path), "--smoke", "--verbose", "0"]
        + ["--overwrite"]
    )
    assert again == last  # the same seed, from scratch
    rows = (tmp_path / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # the header and the new run's 2 epochs


def test_vae_on_two_replicas_trains_what_one_device_trains(two_replicas):
    x, _ = _vae_data()
    report = fitcustom.testing.check_replicas(
        _vae,
        x,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_vae_with_a_term_divided_twice_fails_the_comparison(two_replicas):
    def build():
        keras.utils.set_random_seed(0)
        base = vae_example.build_vae(latent_dim=3, width=16)
        model = KLDividedTwice(base.encoder, base.decoder)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return model

    x, _ = _vae_data()
    report = fitcustom.testing.check_replicas(
        build, x, strategy=two_replicas, batch_size=16, epochs=2
    )
    assert not report.ok, report
    assert report.log_diffs["kl"] > 0.1, report


def test_vae_noise_is_the_same_for_a_sample_on_any_number_of_replicas(
    two_replicas,
):
    # One device: the noise of a global batch of 4 at step 1.
    seed = tf.constant([0, 1], tf.int64)
    whole = distribute.normal_per_sample([4, 3], seed)
    halves = two_replicas.run(
        lambda: distribute.normal_per_sample([2, 3], seed)
    )
    parts = two_replicas.experimental_local_results(halves)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_noise_and_rows_of_a_batch_split_unevenly(two_replicas):
    """A last batch of 5 on 2 replicas (3 and 2 samples): each replica's
    rows of the global batch, and their noise, are one device's. The
    control: the rows of an even split (`replica * local size`) are not."""
    seed = tf.constant([0, 1], tf.int64)
    whole = distribute.normal_per_sample([5, 3], seed)
    sizes = tf.constant([3, 2])

    def per_replica():
        size = sizes[distribute.replica_id()]
        rows = distribute.local_rows(size)
        noise = distribute.normal_per_sample(tf.stack([size, 3]), seed)
        return rows, noise, distribute.replica_id() * size + tf.range(size)

    results = two_replicas.run(per_replica)
    rows, noise, even = (
        np.concatenate(two_replicas.experimental_local_results(r))
        for r in results
    )
    np.testing.assert_array_equal(rows, np.arange(5))
    np.testing.assert_array_equal(noise, whole)
    assert list(even) != list(range(5))


def test_vae_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_example_vae", "VAE_TASK", tmp_path
    )
    assert result["steps"] == [8]
    assert set(result["logs"]) == {"loss", "reconstruction", "kl"}


def test_vae_saved_file_names_its_class(tmp_path):
    model = _vae()
    model.fit(_vae_data()[0], batch_size=16, verbose=0)
    path = os.path.join(tmp_path, "vae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is vae_example.VAE
    np.testing.assert_array_equal(
        loaded.predict(_vae_data()[0], verbose=0),
        model.predict(_vae_data()[0], verbose=0),
    )


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class ForgetsTheLossScale(vae_example.VAE):
    """The control: the update written by hand, without the loss scale
    (under mixed_float16 the optimizer still divides by it)."""

    def train_step(self, data):
        images = self.unpack_data(data)[0]
        with tf.GradientTape() as tape:
            terms = self.terms(images, training=True)
            loss = tf.add_n([tf.reduce_mean(v) for v in terms.values()])
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.log_mean("kl", terms["kl"])


def test_vae_under_mixed_precision_takes_float32_sized_updates():
    x, _ = _vae_data()
    report = fitcustom.testing.check_mixed_precision(
        _vae, x, batch_size=16, epochs=2, shuffle=False
    )
    assert "applied updates per optimizer: float32 [8]" in str(report)
    assert "mixed_float16 [8]" in str(report), report
    report.assert_ok()


def test_a_step_without_the_loss_scale_fails_the_comparison():
    def build():
        base = _vae()
        model = ForgetsTheLossScale(base.encoder, base.decoder)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return model

    x, _ = _vae_data()
    report = fitcustom.testing.check_mixed_precision(
        build, x, batch_size=16, epochs=2, shuffle=False
    )
    assert not report.ok and report.weight_diff > 0.9, report
