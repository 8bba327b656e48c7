"""SampleGrid: PNG grids of a TapeGAN's samples at chosen epochs."""

import os
import sys

import keras
import matplotlib
import numpy as np
import pytest
from gan_builders import make_discriminator
from gan_builders import make_generator
from gan_builders import real_images
from matplotlib import image as mpimg

import fitcustom
from fitcustom import datasets
from fitcustom.tasks.gan.callbacks import save_grid


def _gan(lr=1e-3, conditional=False, batch_norm=True):
    keras.utils.set_random_seed(0)
    gan = fitcustom.TapeGAN(
        generator=make_generator(conditional, batch_norm),
        discriminator=make_discriminator(conditional),
        latent_dim=8,
    )
    gan.compile(
        d_optimizer=keras.optimizers.SGD(lr),
        g_optimizer=keras.optimizers.SGD(lr),
    )
    return gan


def test_grids_at_chosen_epochs_with_the_file_pattern(tmp_path):
    gan = _gan()
    grid = fitcustom.SampleGrid(
        tmp_path / "grids",
        every=2,
        n=9,
        seed=7,
        filename="grid_{epoch:02d}.png",
    )
    gan.fit(
        real_images(32), batch_size=16, epochs=3, verbose=0, callbacks=[grid]
    )
    # every 2 epochs, and the last one
    assert sorted(os.listdir(tmp_path / "grids")) == [
        "grid_02.png",
        "grid_03.png",
    ]
    assert grid.written == [
        str(tmp_path / "grids" / "grid_02.png"),
        str(tmp_path / "grids" / "grid_03.png"),
    ]
    explicit = fitcustom.SampleGrid(tmp_path / "explicit", epochs=[1, 3], n=4)
    gan.fit(
        real_images(32),
        batch_size=16,
        epochs=3,
        verbose=0,
        callbacks=[explicit],
    )
    assert sorted(os.listdir(tmp_path / "explicit")) == [
        "samples_epoch_001.png",
        "samples_epoch_003.png",
    ]


def _summaries(folder):
    """`(tag, step, image)` of the image summaries in a log folder."""
    import tensorflow as tf

    found = []
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(str(folder / name)):
            for value in event.summary.value:
                encoded = tf.make_ndarray(value.tensor)[2]  # w, h, png
                image = tf.io.decode_png(encoded).numpy()
                found.append((value.tag, event.step, image))
    return found


def test_grids_go_to_tensorboard_when_the_fit_has_it(tmp_path):
    gan = _gan()
    grid = fitcustom.SampleGrid(tmp_path / "grids", n=6, seed=3)
    board = keras.callbacks.TensorBoard(str(tmp_path / "logs"))
    gan.fit(
        real_images(32),
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[board, grid],
    )
    found = _summaries(tmp_path / "logs" / "samples")
    assert [(tag, step) for tag, step, _ in found] == [
        ("samples", 0),
        ("samples", 1),
    ]
    # The last grid: the samples of generate(6, seed=3), 3 columns of
    # 8x8 images in 2 rows, on the PNG's grey scale.
    image = found[-1][2]
    assert image.shape == (2 * 8, 3 * 8, 1)
    samples = np.asarray(gan.generate(6, seed=3))[..., 0]
    expected = np.clip((samples + 1.0) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(
        image[0:8, 8:16, 0] / 255.0, expected[1], atol=2 / 255
    )
    assert image[8:16, 0:8].any() and len(found) == len(grid.written)
    # Control: without TensorBoard in the fit, no log folder is made.
    plain = fitcustom.SampleGrid(tmp_path / "plain", n=4)
    gan.fit(real_images(16), epochs=1, verbose=0, callbacks=[plain])
    assert not (tmp_path / "plain" / "samples").exists()
    assert sorted(os.listdir(tmp_path / "logs")) == ["samples", "train"]


def test_grids_of_different_epochs_are_comparable(tmp_path):
    """Same latent points and grey scale at every epoch: a GAN that does
    not learn (learning rate 0, no BatchNorm statistics) draws the same
    grid pixel for pixel, one that learns a different one."""
    frozen = fitcustom.SampleGrid(tmp_path / "frozen", n=4, seed=3)
    _gan(lr=0.0, batch_norm=False).fit(
        real_images(32), batch_size=16, epochs=2, verbose=0, callbacks=[frozen]
    )
    first, second = (mpimg.imread(p) for p in frozen.written)
    assert first.shape[0] > 100 and first.std() > 0.01  # not blank
    # The titles differ ("after epoch 1", "after epoch 2"): 0.4 inch at
    # 80 dots per inch above the images.
    assert np.abs(first[:32] - second[:32]).max() > 0.1
    np.testing.assert_array_equal(first[32:], second[32:])

    learning = fitcustom.SampleGrid(tmp_path / "learning", n=4, seed=3)
    _gan(lr=0.5).fit(
        real_images(32),
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[learning],
    )
    first, second = (mpimg.imread(p) for p in learning.written)
    assert np.abs(first - second).max() > 0.01


def test_conditional_grid_and_backend_left_alone(tmp_path):
    backend = matplotlib.get_backend()
    gan = _gan(conditional=True)
    grid = fitcustom.SampleGrid(
        tmp_path, n=10, labels=np.arange(10), epochs=[1]
    )
    gan.fit(
        real_images(20),
        np.arange(20) % 10,
        batch_size=10,
        epochs=1,
        verbose=0,
        callbacks=[grid],
    )
    assert len(grid.written) == 1 and os.path.getsize(grid.written[0]) > 500
    assert matplotlib.get_backend() == backend


def test_value_range_maps_to_black_and_white(tmp_path):
    images = np.stack([np.full((4, 4), -1.0), np.full((4, 4), 1.0)])
    path = save_grid(images, tmp_path / "bw.png")
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.min() == 0.0 and pixels.max() == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(filename="grid.png"), r"must contain `\{epoch\}`.*'grid.png'"),
        (dict(filename="{step}_{epoch}.png"), r"formatted with `epoch`"),
        (dict(every=0), r"every=0"),
        (dict(n=0), r"n=0"),
        (dict(epochs=[0, 2]), r"epochs=\[0, 2\]"),
        (dict(value_range=(1, -1)), r"value_range=\(1, -1\)"),
        (dict(n=4, labels=[1, 2]), r"2 labels for n=4"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fitcustom.SampleGrid(tmp_path, **kwargs)


def test_a_model_without_generate_is_refused(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="generate.*Received: a model of type"):
        model.fit(
            np.zeros((4, 2)),
            np.zeros((4, 1)),
            verbose=0,
            callbacks=[fitcustom.SampleGrid(tmp_path)],
        )


@pytest.mark.parametrize(
    "module, make, hint",
    [
        (
            "matplotlib",
            lambda d: fitcustom.SampleGrid(str(d)),
            "pip install matplotlib",
        ),
        (
            "sklearn.datasets",
            lambda d: datasets.load_digits(),
            "pip install scikit-learn",
        ),
    ],
    ids=["SampleGrid", "load_digits"],
)
def test_missing_optional_dependency_fails_at_once_with_a_hint(
    tmp_path, monkeypatch, module, make, hint
):
    """Without the optional package, the object that needs it fails when
    it is made (not after an epoch has trained), in one line that says
    what to install."""
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    with pytest.raises(ImportError, match=hint) as error:
        make(tmp_path)
    assert "\n" not in str(error.value)
