"""GANQuality and its feature extractors: the digits classifier is trained
once and then loaded, its features tell real digits from noise, the
callback logs what the evaluation functions give on `generate()`'s
samples, the same on two replicas as on one device, and bad input is
refused before training."""

import csv
import inspect
import os
import re
import shutil

import keras
import numpy as np
import pytest
from helpers import strategy_scope

import fitcustom
from fitcustom import datasets
from fitcustom import evaluation
from fitcustom import quality
from fitcustom.architectures import dcgan_8x8
from fitcustom.tasks.gan import extractors

ALL_METRICS = ("kid", "fid", "precision_recall", "density_coverage")
SCORES = ["kid", "kid_std", "fid", "precision", "recall", "density", "coverage"]


@pytest.fixture(scope="module")
def digits():
    """`(x_train, x_test)` of the digits, scaled to [-1, 1]."""
    (x_train, _), (x_test, _) = datasets.load_digits()
    return x_train * 2 - 1, x_test * 2 - 1


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory):
    """A folder holding the digits classifier, trained once per module."""
    directory = tmp_path_factory.mktemp("digits_extractor")
    quality.digits_extractor(cache_dir=directory)
    return directory


@pytest.fixture(scope="module")
def extractor(extractor_dir):
    return quality.digits_extractor(cache_dir=extractor_dir)


def features(model, images):
    return evaluation.extract_features(model, images)


# digits_extractor


def test_digits_extractor_loads_from_its_cache_without_training(
    extractor_dir, extractor, digits, monkeypatch
):
    path = extractor_dir / quality.DIGITS_FILE
    assert os.listdir(extractor_dir) == [quality.DIGITS_FILE]  # no temp
    mtime = os.path.getmtime(path)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the file is cached")

    monkeypatch.setattr(extractors, "_train_digits_classifier", no_training)
    again = quality.digits_extractor(cache_dir=extractor_dir)
    _, x_test = digits
    np.testing.assert_array_equal(
        features(again, x_test[:16]), features(extractor, x_test[:16])
    )
    assert again.output.shape == (None, 128)
    assert os.path.getmtime(path) == mtime


def test_digits_classifier_is_accurate_on_the_test_split(extractor_dir):
    classifier = keras.saving.load_model(
        extractor_dir / quality.DIGITS_FILE, compile=False
    )
    _, (x_test, y_test) = datasets.load_digits()
    predicted = classifier.predict(x_test, verbose=0).argmax(axis=1)
    assert np.mean(predicted == y_test) > 0.95


def test_a_corrupt_cache_file_is_trained_again(tmp_path, monkeypatch):
    path = tmp_path / quality.DIGITS_FILE
    path.write_bytes(b"not a keras file")
    calls = []
    train = extractors._train_digits_classifier

    def quick_training(**kwargs):
        calls.append(kwargs)
        return train(epochs=1)

    monkeypatch.setattr(extractors, "_train_digits_classifier", quick_training)
    with pytest.warns(UserWarning, match="cannot be used.*training it again"):
        model = quality.digits_extractor(cache_dir=tmp_path)
    assert len(calls) == 1 and model.output.shape == (None, 128)
    keras.saving.load_model(path, compile=False)  # a good file now
    assert os.listdir(tmp_path) == [quality.DIGITS_FILE]


def test_an_unwritable_cache_warns_and_still_extracts(
    tmp_path, extractor_dir, monkeypatch
):
    saved = extractor_dir / quality.DIGITS_FILE
    monkeypatch.setattr(
        extractors,
        "_train_digits_classifier",
        lambda **kwargs: keras.saving.load_model(saved),
    )
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be saved.*a_file"):
        model = quality.digits_extractor(cache_dir=blocked)
    assert model.output.shape == (None, 128)


def test_value_range_is_rescaled_inside_the_extractor(
    extractor_dir, extractor, digits
):
    _, x_test = digits
    unit = quality.digits_extractor((0.0, 1.0), cache_dir=extractor_dir)
    np.testing.assert_allclose(
        features(unit, (x_test[:32] + 1) / 2),
        features(extractor, x_test[:32]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_digits_features_tell_real_digits_from_noise(extractor, digits):
    x_train, x_test = digits
    noise = np.random.default_rng(0).uniform(-1, 1, x_test.shape)
    real = features(extractor, x_test)
    fake = features(extractor, noise.astype("float32"))
    half = len(real) // 2
    kid_real, _ = evaluation.kernel_distance(real[:half], real[half:])
    kid_noise, _ = evaluation.kernel_distance(real[:half], fake[half:])
    assert abs(kid_real) < 0.1 * kid_noise
    train = features(extractor, x_train)
    fid_real = evaluation.frechet_distance(train, real)
    fid_noise = evaluation.frechet_distance(train, fake)
    assert fid_real < 0.05 * fid_noise


# inception_extractor


def test_inception_extractor_resizes_and_preprocesses(monkeypatch):
    """A stand-in for InceptionV3 that averages its input: grey images
    reach it as three equal channels of 75x75, mapped to [-1, 1]."""
    seen = {}

    def stand_in(**kwargs):
        seen.update(kwargs)
        inputs = keras.Input(kwargs["input_shape"])
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        return keras.Model(inputs, pooled)

    monkeypatch.setattr(keras.applications, "InceptionV3", stand_in)
    model = quality.inception_extractor(image_size=75, value_range=(0, 1))
    assert seen == dict(
        include_top=False,
        weights="imagenet",
        input_shape=(75, 75, 3),
        pooling="avg",
    )
    grey = np.stack([np.full((8, 8, 1), v) for v in (0.0, 1.0, 0.5)])
    np.testing.assert_allclose(
        features(model, grey.astype("float32")),
        [[-1] * 3, [1] * 3, [0] * 3],
        atol=1e-6,
    )
    rgb = np.broadcast_to([0.0, 0.5, 1.0], (2, 16, 16, 3))
    np.testing.assert_allclose(
        features(model, rgb.astype("float32")), [[-1, 0, 1]] * 2, atol=1e-6
    )
    with pytest.raises(ValueError, match="grey .* or RGB"):
        features(model, np.zeros((1, 8, 8, 2), "float32"))


def test_inception_extractor_offline_names_the_file(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise Exception(  # what keras' get_file raises
            "URL fetch failure on https://storage.googleapis.com/x.h5: "
            "None -- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(keras.applications, "InceptionV3", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    expected = tmp_path / "models" / extractors._INCEPTION_FILE
    with pytest.raises(OSError, match=re.escape(str(expected))) as error:
        quality.inception_extractor()
    message = str(error.value)
    assert "\n" not in message and "network access" in message
    assert "name resolution" in message
    # With the file cached, another failure is not called a download's.
    expected.parent.mkdir()
    expected.write_bytes(b"")
    with pytest.raises(Exception, match="URL fetch") as error:
        quality.inception_extractor()
    assert not isinstance(error.value, OSError)


@pytest.mark.parametrize(
    "image_size, match", [(74, "image_size=74"), (True, "image_size=True")]
)
def test_inception_extractor_refuses_small_sizes(image_size, match):
    with pytest.raises(ValueError, match=match):
        quality.inception_extractor(image_size=image_size)


# GANQuality


def make_gan(ema_decay=None):
    keras.utils.set_random_seed(0)
    generator, discriminator = dcgan_8x8(latent_dim=8)
    gan = fitcustom.TapeGAN(
        generator=generator,
        discriminator=discriminator,
        latent_dim=8,
        ema_decay=ema_decay,
    )
    gan.compile(
        d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
        g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
    )
    return gan


def counted(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_scores_reach_history_csv_and_early_stopping(
    tmp_path, extractor, digits, monkeypatch, capsys
):
    """Scored at epochs 1 (the first), 3 (every=3) and 4 (the last), NaN
    at epoch 2;
    the numbers are those of the evaluation functions on the features of
    `generate(n, seed)` (EMA generator), against the first half of the
    real images; the baseline is computed once."""
    x_train, x_test = digits
    fids = counted(monkeypatch, evaluation, "frechet_distance")
    extractions = counted(monkeypatch, evaluation, "extract_features")
    gan = make_gan(ema_decay=0.9)
    scores = quality.GANQuality(
        x_test[:64], extractor=extractor, metrics=ALL_METRICS, every=3, k=3
    )
    stopper = keras.callbacks.EarlyStopping("fid", mode="min", patience=5)
    log = tmp_path / "log.csv"
    history = gan.fit(
        x_train[:64],
        batch_size=32,
        epochs=4,
        verbose=0,
        callbacks=[scores, keras.callbacks.CSVLogger(log), stopper],
    ).history
    assert capsys.readouterr().out.count("real-vs-real baseline") == 1
    assert len(fids) == 1 + 3 and len(extractions) == 2 + 3
    baseline_keys = [f"{key}_real" for key in SCORES]
    assert set(SCORES + baseline_keys) <= set(history)
    for key in SCORES:
        scored = np.delete(history[key], 1)
        assert np.isnan(history[key][1]) and np.isfinite(scored).all(), key
        assert history[f"{key}_real"] == [scores.baseline[key]] * 4
    assert [h["epoch"] for h in scores.history] == [1, 3, 4]
    assert stopper.best == np.nanmin(history["fid"])  # not a NaN best
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(SCORES + baseline_keys) <= set(rows[0])
    assert rows[1]["kid"] == "nan"
    assert float(rows[3]["kid"]) == history["kid"][3]

    # The same numbers by hand.
    reference, held_out = scores.real_images, scores.held_out
    assert len(reference) == len(held_out) == scores.n_samples == 32
    np.testing.assert_array_equal(
        np.sort(np.concatenate([reference, held_out]), axis=0),
        np.sort(x_test[:64], axis=0),
    )
    real = features(extractor, reference)
    fake = features(extractor, gan.generate(32, seed=0))

    def by_hand(fake):
        # 32 vs 32 images: KID's subsets are the whole sets, so one is
        # computed; 100 of them give the same mean.
        kid, kid_std = evaluation.kernel_distance(real, fake, subsets=1)
        hundred = evaluation.kernel_distance(real, fake, subsets=100)
        np.testing.assert_allclose(hundred, (kid, kid_std), atol=1e-9)
        precision, recall = evaluation.precision_recall(real, fake, k=3)
        density, coverage = evaluation.density_coverage(real, fake, k=3)
        return dict(
            kid=kid,
            kid_std=kid_std,
            fid=evaluation.frechet_distance(real, fake),
            precision=precision,
            recall=recall,
            density=density,
            coverage=coverage,
        )

    expected = by_hand(fake)
    for key in SCORES:
        np.testing.assert_allclose(history[key][3], expected[key], rtol=1e-12)
    baseline = by_hand(features(extractor, held_out))
    for key in SCORES:
        np.testing.assert_allclose(scores.baseline[key], baseline[key])
    raw = by_hand(features(extractor, gan.generate(32, use_ema=False)))
    assert raw["fid"] != expected["fid"]  # it was the EMA generator's

    # A second fit reuses the real features and the baseline.
    fids.clear()
    extractions.clear()
    gan.fit(
        x_train[:64], batch_size=32, epochs=1, verbose=0, callbacks=[scores]
    )
    assert len(fids) == 1 and len(extractions) == 1


def _epoch_lines(text):
    return [line for line in text.splitlines() if " - d_loss: " in line]


def test_the_epoch_line_shows_scores_where_computed_and_baselines_once(
    extractor, digits, capsys
):
    """The progress bar's epoch line (verbose=2: one line an epoch) shows
    the scores of the epochs that computed them and the real-vs-real
    baselines on the first epoch only; History keeps every value, every
    epoch. Keras' own progress bar, passed explicitly, shows them all
    (the control)."""
    x_train, x_test = digits
    lines = {}
    for kind in ("default", "keras"):
        gan = make_gan()
        scores = quality.GANQuality(
            x_test[:64], extractor=extractor, every=5, verbose=0
        )
        extra = [keras.callbacks.ProgbarLogger()] if kind == "keras" else []
        capsys.readouterr()
        history = gan.fit(
            x_train[:64],
            batch_size=32,
            epochs=3,
            verbose=2,
            callbacks=[scores, *extra],
        ).history
        lines[kind] = _epoch_lines(capsys.readouterr().out)
        assert len(lines[kind]) == 3, lines[kind]
        assert np.isnan(history["kid"][1]) and np.isfinite(history["fid"][2])
        assert history["kid_real"] == [scores.baseline["kid"]] * 3
    first, unscored, last = lines["default"]
    assert " - kid: " in first and " - kid_real: " in first
    assert " - kid" not in unscored and " - fid" not in unscored
    assert " - fid: " in last and "_real" not in last
    # Keras' progress bar: the NaN and the baselines on every line.
    assert all(" - kid_real: " in line for line in lines["keras"])
    assert " - kid: nan" in lines["keras"][1]


def test_two_replicas_score_what_one_device_scores(
    two_replicas, extractor, digits
):
    """Training on two replicas draws other noise, so the generator is set
    to the same weights before the callback runs: its scores then agree."""
    x_train, x_test = digits
    pinned = make_gan().generator.get_weights()

    def run(strategy):
        with strategy_scope(strategy):
            gan = make_gan()
        pin = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: gan.generator.set_weights(pinned)
        )
        scores = quality.GANQuality(
            x_test[:64], extractor=extractor, metrics=ALL_METRICS, verbose=0
        )
        history = gan.fit(
            x_train[:64],
            batch_size=32,
            epochs=1,
            verbose=0,
            callbacks=[pin, scores],
        ).history
        return {k: v for k, v in history.items() if k.split("_")[0] in SCORES}

    one, two = run(None), run(two_replicas)
    assert sorted(one) == sorted(two) and len(one) == 2 * len(SCORES)
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-6, err_msg=key)


def test_string_digits_loads_from_the_keras_folder(
    tmp_path, extractor_dir, digits, monkeypatch
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "fitcustom").mkdir()
    shutil.copy(extractor_dir / quality.DIGITS_FILE, tmp_path / "fitcustom")
    monkeypatch.setattr(extractors, "_train_digits_classifier", None)
    _, x_test = digits
    with pytest.warns(UserWarning, match=r"uses only \[0, 1\]"):
        scores = quality.GANQuality((x_test[:20] + 1) / 2)  # [0, 1] data
    assert scores.extractor.output.shape == (None, 128)


class StubGAN:
    """Only what GANQuality uses: `generate` and `generator`."""

    generator = "a network"
    stop_training = False

    def __init__(self, images):
        self.images = images

    def generate(self, n, seed=0, labels=None):
        return np.resize(self.images, (n,) + self.images.shape[1:])


class Sampler:
    """A model that is no GAN: `generate(n, seed)` and nothing else (no
    `generator`, no `labels`), as a diffusion model of your own."""

    stop_training = False

    def __init__(self, images):
        self.images = images

    def generate(self, n, seed=0):
        return np.resize(self.images, (n,) + self.images.shape[1:])


@pytest.mark.parametrize(
    "make, match",
    [
        (keras.Sequential, r"generate\(n.*type Sequential"),
        (lambda: StubGAN(np.zeros((1, 4, 4, 1))), r"shape \(4, 4, 1\)"),
    ],
    ids=["not_a_gan", "other_shape"],
)
def test_a_model_that_cannot_be_scored_is_refused(
    extractor, digits, make, match
):
    scores = quality.GANQuality(digits[1][:20], extractor=extractor)
    scores.set_model(make())
    with pytest.raises(ValueError, match=match):
        scores.on_train_begin()


def test_any_model_with_generate_is_scored(extractor, digits):
    scores = quality.GANQuality(digits[1][:20], extractor=extractor, verbose=0)
    scores.set_model(Sampler(digits[0][:40]))
    scores.on_train_begin()
    logs = {}
    scores.on_epoch_end(0, logs)
    assert np.isfinite([logs["kid"], logs["fid"]]).all()


def test_a_model_without_generate_fails_in_fit(extractor, digits):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    scores = quality.GANQuality(digits[1][:20], extractor=extractor)
    with pytest.raises(ValueError, match="Received: a model of type"):
        model.fit(
            np.zeros((4, 2)), np.zeros((4, 1)), verbose=0, callbacks=[scores]
        )


def test_non_finite_samples_log_nan_with_a_warning(extractor, digits):
    scores = quality.GANQuality(digits[1][:20], extractor=extractor, verbose=0)
    scores.set_model(StubGAN(np.full((1, 8, 8, 1), np.nan, "float32")))
    scores.on_train_begin()
    logs = {}
    with pytest.warns(UserWarning, match="NaN or inf"):
        scores.on_epoch_end(0, logs)
    assert np.isnan([logs["kid"], logs["fid"]]).all()
    assert np.isfinite(logs["fid_real"])


def _real(n=20):
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 8, 8, 1)).astype("float32")


def _with_nan():
    x = _real()
    x[3, 0, 0, 0] = np.nan
    return x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(extractor="vgg"), r"'digits', 'inception'.*extractor='vgg'"),
        (dict(extractor=42), r"type int, which is not callable"),
        (dict(metrics=("kid", "is")), r"\['is'\].*'density_coverage'"),
        (dict(metrics=()), r"No metric"),
        (dict(every=0), r"every=0"),
        (dict(n_samples=1), r"Too few generated.*'kid' needs at least 2"),
        (dict(kid_subset_size=1), r"kid_subset_size=1"),
        (dict(value_range=(1, -1)), r"value_range=\(1, -1\)"),
        (dict(real_images=_real()[..., 0]), r"shape \(20, 8, 8\).*None\]"),
        (dict(real_images=[["a"]]), r"dtype <U1"),
        (dict(real_images=_with_nan()), r"1 of 20 .* index 3"),
        (dict(real_images=_real() * 127.5 + 127.5), r"in \[0.*, 254.*\]"),
        (dict(real_images=_real(3)), r"held-out.*Received: 1 \(real_images"),
        (
            dict(metrics=["precision_recall"], real_images=_real(6)),
            r"'precision_recall' with k=3 needs at least 4",
        ),
        (
            dict(real_images=np.zeros((4, 28, 28, 1))),
            r"extractor='digits' takes 8x8.*\(4, 28, 28, 1\)",
        ),
        (dict(held_out=np.zeros((4, 8, 8, 3))), r"held_out of shape"),
        (dict(labels=[1, 2], n_samples=4), r"\(2,\) for n_samples=4"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    """All refused before anything is trained or loaded."""
    kwargs.setdefault("real_images", _real())
    with pytest.raises(ValueError, match=match):
        quality.GANQuality(**kwargs)


def test_class_example_runs(tmp_path, monkeypatch, extractor_dir):
    """The docstring's example, with its classifier file already there."""
    (tmp_path / "models").mkdir()
    shutil.copy(extractor_dir / quality.DIGITS_FILE, tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    doc = inspect.getdoc(quality.GANQuality)
    (block,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    exec(compile(block, "<example>", "exec"), {"__name__": "doc"})
    assert (tmp_path / "scores.csv").exists()
