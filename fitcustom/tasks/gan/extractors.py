"""The feature extractors of `GANQuality`, Keras models from images to
feature vectors:

- `digits_extractor()`: a small CNN classifier of 8x8 digits, trained by
  fitcustom on the digits train split the first time it is needed (a few
  seconds, nothing downloaded) and cached in the Keras folder.
- `inception_extractor()`: Keras' InceptionV3 with ImageNet weights (2048
  pool features), downloaded once by Keras.

May import: `checkpoints`, `datasets` and the ground floor.
"""

import os
import warnings

import keras
import numpy as np

from fitcustom import checkpoints
from fitcustom import datasets

#: File name of the cached digits classifier. The version changes when its
#: architecture or training changes, so that old files are not reused.
DIGITS_FILE = "digits_features-v1.keras"
_DIGITS_FEATURES = 128
_INCEPTION_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"


def value_range_of(value_range):
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        low, high = 0.0, 0.0
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(
            "`value_range` must be (low, high) with finite low < high, the "
            f"range of the images' values. Received: value_range="
            f"{value_range!r}. E.g. (-1.0, 1.0) for a tanh generator."
        )
    return low, high


def digits_cache_dir() -> str:
    """Default folder of the digits classifier: `fitcustom` beside Keras'
    `datasets` folder (`$KERAS_HOME/fitcustom` or `~/.keras/fitcustom`)."""
    return os.path.join(
        os.path.dirname(datasets.keras_cache_dir()), "fitcustom"
    )


def _float32_layers(seed):
    """Keyword arguments for each layer: float32 whatever the global dtype
    policy, and a seeded initializer (no use of the global RNG)."""
    count = iter(range(1000))

    def kwargs():
        return dict(
            dtype="float32",
            kernel_initializer=keras.initializers.GlorotUniform(
                seed=seed + next(count)
            ),
        )

    return kwargs


def _train_digits_classifier(seed=0, epochs=15, batch_size=64):
    """The digits classifier, trained on the train split of `load_digits()`
    (1347 images): two 3x3 convs (32), max-pool, a 3x3 conv (64), a
    128-wide dense layer named `features`, ReLU, dropout 0.3, 10 logits;
    Adam 1e-3, `epochs` passes in orders drawn from `seed`."""
    layer = _float32_layers(seed)
    inputs = keras.Input((8, 8, 1), name="images")
    h = keras.layers.Conv2D(
        32, 3, padding="same", activation="relu", **layer()
    )(inputs)
    h = keras.layers.Conv2D(
        32, 3, padding="same", activation="relu", **layer()
    )(h)
    h = keras.layers.MaxPooling2D(dtype="float32")(h)
    h = keras.layers.Conv2D(
        64, 3, padding="same", activation="relu", **layer()
    )(h)
    h = keras.layers.Flatten(dtype="float32")(h)
    h = keras.layers.Dense(_DIGITS_FEATURES, name="features", **layer())(h)
    h = keras.layers.ReLU(dtype="float32")(h)
    h = keras.layers.Dropout(0.3, seed=seed, dtype="float32")(h)
    logits = keras.layers.Dense(10, name="logits", **layer())(h)
    model = keras.Model(inputs, logits, name="digits_classifier")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    (x, y), _ = datasets.load_digits()
    # All passes in one array, shuffled here: the order depends on `seed`
    # only, not on a global seed.
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(epochs)])
    model.fit(
        x[order], y[order], batch_size=batch_size, shuffle=False, verbose=0
    )
    return model


def _load_digits_classifier(path):
    """The classifier at `path`, or `None` with a warning when the file
    cannot be read or is not the expected network."""
    try:
        model = keras.saving.load_model(path, compile=False)
        width = model.get_layer("features").output.shape[-1]
        if tuple(model.input.shape[1:]) != (8, 8, 1):
            raise ValueError(f"input shape {model.input.shape}")
        if width != _DIGITS_FEATURES:
            raise ValueError(f"{width} features")
    except Exception as e:  # noqa: BLE001 - any unreadable file
        warnings.warn(
            f"The cached digits classifier {path} cannot be used "
            f"({type(e).__name__}: {e}); training it again (a few seconds).",
            stacklevel=3,
        )
        return None
    return model


def digits_extractor(
    value_range=(-1.0, 1.0), cache_dir: str | None = None
) -> keras.Model:
    """A feature extractor for 8x8 grey digits: 128 features per image.

    The 128-wide dense layer before the last ReLU of a small CNN
    classifier of scikit-learn's digits (about 98% test accuracy): the
    digits' analogue of the Inception features of FID, taken before the
    ReLU so that no feature is constantly 0. The classifier is trained on
    the train split of `fitcustom.datasets.load_digits()` the first time
    (seeded, a few seconds on a CPU, nothing downloaded) and saved as
    `DIGITS_FILE` in `cache_dir` (written atomically); later calls load
    it. A file that cannot be read is replaced by a new one, with a
    warning; a folder that cannot be written to is warned about.
    Scores from different files (e.g. one trained on another machine,
    whose floating-point rounding differs) are not comparable: copy the
    file to compare runs across machines.

    Args:
        value_range: Range of the images' values, mapped to the [0, 1] the
            classifier was trained on by a `Rescaling` layer, so that a
            tanh generator's samples can be passed as they are. Defaults
            to `(-1.0, 1.0)`.
        cache_dir: Folder of the classifier file. Defaults to
            `digits_cache_dir()` (`~/.keras/fitcustom`, or under
            `$KERAS_HOME`).

    Returns:
        A `keras.Model` from images `(n, 8, 8, 1)` to features `(n, 128)`.
    """
    low, high = value_range_of(value_range)
    cache_dir = digits_cache_dir() if cache_dir is None else cache_dir
    path = os.path.join(os.fspath(cache_dir), DIGITS_FILE)
    classifier = None
    if os.path.exists(path):
        classifier = _load_digits_classifier(path)
    if classifier is None:
        classifier = _train_digits_classifier()
        try:
            checkpoints.save_model(classifier, path)
        except OSError as e:  # e.g. a read-only home: use it uncached
            warnings.warn(
                f"The digits classifier could not be saved to {path} "
                f"({type(e).__name__}: {e}); it will be trained again next "
                "time. Pass a writable cache_dir.",
                stacklevel=2,
            )
    features = keras.Model(
        classifier.inputs, classifier.get_layer("features").output
    )
    images = keras.Input((8, 8, 1), name="images")
    scaled = keras.layers.Rescaling(
        1.0 / (high - low), -low / (high - low), dtype="float32"
    )(images)
    return keras.Model(images, features(scaled), name="digits_features")


class _InceptionFeatures(keras.Model):
    """Images in `value_range` -> InceptionV3 pool features."""

    def __init__(self, base, image_size, value_range, **kwargs):
        super().__init__(**kwargs)
        self.base = base
        self.image_size = image_size
        self.value_range = value_range

    def call(self, images, training=False):
        x = keras.ops.cast(images, "float32")
        if x.shape[-1] == 1:
            x = keras.ops.repeat(x, 3, axis=-1)
        elif x.shape[-1] != 3:
            raise ValueError(
                "The Inception extractor takes grey (1 channel) or RGB (3 "
                f"channel) images. Received: images of shape {x.shape}."
            )
        low, high = self.value_range
        x = (x - low) * (255.0 / (high - low))  # to 0..255
        size = (self.image_size, self.image_size)
        x = keras.ops.image.resize(x, size, interpolation="bilinear")
        x = keras.applications.inception_v3.preprocess_input(x)
        return self.base(x, training=training)


def inception_extractor(
    image_size: int = 299, value_range=(-1.0, 1.0)
) -> keras.Model:
    """Keras' InceptionV3 (ImageNet weights) as a feature extractor: 2048
    average-pooled features per image, as in FID and KID.

    Images of any size, grey or RGB, with values in `value_range`, are
    resized bilinearly to `image_size` (grey repeated to 3 channels) and
    preprocessed with `keras.applications.inception_v3.preprocess_input`.
    On a CPU it costs about 6 GFLOPs per image at 299x299 (minutes per
    thousand images): score rarely (`every`). The weights are Keras'
    ImageNet weights, downloaded once into
    `$KERAS_HOME/models` (`~/.keras/models`): the scores compare runs with
    each other, not with published FIDs, which use the TF1 reference
    Inception graph and its own resizing (Parmar et al., "On Aliased
    Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022).

    Args:
        image_size: Side of the images Inception sees (>= 75). Defaults
            to `299`, its training size.
        value_range: Range of the images' values. Defaults to
            `(-1.0, 1.0)`.

    Returns:
        A `keras.Model` from images `(n, h, w, 1 or 3)` to `(n, 2048)`.

    Raises:
        OSError: The weights are not cached and cannot be downloaded; the
            message names the file to copy.
    """
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 75
    ):
        raise ValueError(
            "`image_size` must be a whole number >= 75 (InceptionV3's "
            f"smallest input). Received: image_size={image_size!r}."
        )
    value_range = value_range_of(value_range)
    home = os.path.dirname(datasets.keras_cache_dir())
    expected = os.path.join(home, "models", _INCEPTION_FILE)
    cached = os.path.exists(expected)
    try:
        base = keras.applications.InceptionV3(
            include_top=False,
            weights="imagenet",
            input_shape=(int(image_size), int(image_size), 3),
            pooling="avg",
        )
    except Exception as e:  # noqa: BLE001 - any download failure
        if cached:
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise OSError(
            "InceptionV3's ImageNet weights are not in the Keras cache and "
            f"could not be downloaded ({reason}). Expected the cached file "
            f"at {expected}. Run once with network access, or copy the file"
            " there (or set KERAS_HOME to a folder whose models/ holds it)."
        ) from e
    return _InceptionFeatures(
        base, int(image_size), value_range, name="inception_features"
    )
