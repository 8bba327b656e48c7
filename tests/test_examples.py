"""The example programs under `scripts/examples/`: each trains end to end
(`--smoke`), and its step, written with the engine's tools, trains on 2
replicas what it trains on one device, continues exactly after a save and
a load in a fresh process, and fails the replica comparison when a term is
divided twice (the control)."""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from task_harness import Task
from task_harness import check_continue_in_fresh_process

import fitcustom
from fitcustom import distribute
from scripts.examples import contrastive as contrastive_example
from scripts.examples import diffusion as diffusion_example
from scripts.examples import translation as translation_example
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


def test_vae_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_examples", "VAE_TASK", tmp_path
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


def _contrastive_data():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    return x, rng.integers(0, 10, size=64)


def _contrastive(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = contrastive_example.build_contrastive(
        width=16, features=8, projected=4
    )
    model.compile(
        optimizer={
            "contrastive": keras.optimizers.SGD(0.05),
            "probe": keras.optimizers.SGD(0.1),
        },
        **compile_kwargs,
    )
    return model


CONTRASTIVE_TASK = Task(
    build=_contrastive,
    data=_contrastive_data,
    fit_kwargs={"batch_size": 16, "shuffle": False},
)


@keras.saving.register_keras_serializable(package="fitcustom_tests")
class ContrastPerReplica(contrastive_example.Contrastive):
    """The control: negatives from this replica's images only."""

    def gather(self, projections):
        return projections


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
    def build():
        base = _contrastive()
        keras.utils.set_random_seed(0)
        model = ContrastPerReplica(base.encoder, base.projection, base.probe)
        model.compile(
            optimizer={
                "contrastive": keras.optimizers.SGD(0.05),
                "probe": keras.optimizers.SGD(0.1),
            }
        )
        return model

    x, y = _contrastive_data()
    report = fitcustom.testing.check_replicas(
        build,
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
        "test_examples", "CONTRASTIVE_TASK", tmp_path
    )
    assert result["steps"] == [8, 8]
    assert {"contrastive_loss", "probe_loss", "probe_accuracy"} <= set(
        result["logs"]
    )


def _diffusion_data():
    rng = np.random.default_rng(2)
    return rng.uniform(-1, 1, size=(64, 8, 8, 1)).astype("float32"), None


def _diffusion(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = diffusion_example.build_diffusion(width=16, depth=1, ema_decay=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), **compile_kwargs)
    return model


DIFFUSION_TASK = Task(
    build=_diffusion,
    data=_diffusion_data,
    fit_kwargs={"batch_size": 16, "shuffle": False},
)


def test_diffusion_program_runs_and_scores_its_samples(tmp_path):
    last = diffusion_example.main(
        [
            "--output-dir",
            str(tmp_path),
            "--smoke",
            "--verbose",
            "0",
            "--sampling-steps",
            "4",
        ]
    )
    for name in ("diffusion.keras", "history.csv", "curves.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert last["loss"] == last["noise_loss"]
    assert np.isfinite([last["kid"], last["fid"]]).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["real_vs_real"]["fid"] < last["fid"]


def test_diffusion_on_two_replicas_trains_what_one_device_trains(
    two_replicas,
):
    x, _ = _diffusion_data()
    report = fitcustom.testing.check_replicas(
        _diffusion,
        x,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
        shuffle=False,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_diffusion_ema_network_follows_and_generates():
    x, _ = _diffusion_data()
    model = _diffusion()
    model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    moved = [
        float(np.abs(e.numpy() - w.numpy()).max())
        for e, w in zip(model.ema_network.weights, model.network.weights)
    ]
    assert max(moved) > 0  # an average, not a copy
    a = model.generate(3, seed=1, steps=3)
    b = model.generate(3, seed=1, steps=3)
    assert a.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(a, b)


def test_diffusion_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_examples", "DIFFUSION_TASK", tmp_path
    )
    assert result["steps"] == [8]


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


def _translation_data():
    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, size=(32, 8, 8, 1)).astype("float32")
    return a, translation_example.to_domain_b(a[::-1])


def _translation(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = translation_example.build_translation()
    model.compile(
        optimizer={
            name: keras.optimizers.SGD(0.02)
            for name in ("a_to_b", "b_to_a", "judge_a", "judge_b")
        },
        **compile_kwargs,
    )
    return model


TRANSLATION_TASK = Task(
    build=_translation,
    data=_translation_data,
    fit_kwargs={"batch_size": 8, "shuffle": False},
)


def test_translation_program_runs_and_writes_its_outputs(tmp_path):
    last = translation_example.main(
        ["--output-dir", str(tmp_path), "--smoke", "--verbose", "0"]
    )
    for name in (
        "translation.keras",
        "history.csv",
        "curves.png",
        "translations.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    terms = (
        "cycle",
        "fool_a",
        "fool_b",
        "identity_a",
        "identity_b",
        "judge_a_loss",
        "judge_b_loss",
    )
    # The cycle term, minimised by both generators, counts once.
    np.testing.assert_allclose(
        last["loss"], sum(last[t] for t in terms), rtol=1e-5
    )


def test_translation_four_optimizers_on_two_replicas(two_replicas):
    x, y = _translation_data()
    report = fitcustom.testing.check_replicas(
        _translation,
        x,
        y,
        strategy=two_replicas,
        batch_size=8,
        epochs=2,
        weight_tolerance=1e-6,
        shuffle=False,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_translation_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_examples", "TRANSLATION_TASK", tmp_path
    )
    assert result["steps"] == [8, 8, 8, 8]
