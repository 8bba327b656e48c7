"""GAN quality during `fit()`: KID, FID, precision/recall and
density/coverage of generated samples, logged every few epochs.

`GANQuality` is a callback for `TapeGAN` (any model with
`generate(n, seed=..., labels=...)`). It compares the features of
generated images with those of real images, using the metrics of
`fitcustom.evaluation`, and writes the scores into the epoch's logs, so
that `History`, `CSVLogger`, `TensorBoard`, `EarlyStopping` and
`ModelCheckpoint` see them. Features come from one of the two extractors
of `extractors` (re-exported here): `digits_extractor()`, a small CNN
trained on the digits the first time it is needed, or
`inception_extractor()`, Keras' InceptionV3 with ImageNet weights.

A score is comparable only with another one from the same extractor file
and the same sample counts; `GANQuality.baseline` holds the same metrics
between two disjoint real samples of those sizes, the best value reachable.

May import: the GAN's `evaluation` and `extractors`, and the ground floor.
"""

import warnings

import keras
import numpy as np

from fitcustom import _args
from fitcustom.tasks.gan import evaluation
from fitcustom.tasks.gan import extractors
from fitcustom.tasks.gan.extractors import DIGITS_FILE as DIGITS_FILE
from fitcustom.tasks.gan.extractors import digits_cache_dir as digits_cache_dir
from fitcustom.tasks.gan.extractors import digits_extractor as digits_extractor
from fitcustom.tasks.gan.extractors import (
    inception_extractor as inception_extractor,
)

#: Metric name -> the log keys it writes.
METRICS = {
    "kid": ("kid", "kid_std"),
    "fid": ("fid",),
    "precision_recall": ("precision", "recall"),
    "density_coverage": ("density", "coverage"),
}
# The k-NN metrics' own defaults (their papers' choices).
_DEFAULT_K = {"precision_recall": 3, "density_coverage": 5}


def _images(name, x, allow_none=False):
    """`x` as a float32 array of images `(n, h, w, c)`, finite."""
    if x is None and allow_none:
        return None
    try:
        x = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - e.g. a tf.data.Dataset
        raise ValueError(
            f"`{name}` must be an array of images (n, height, width, "
            f"channels). Received: {type(x).__name__} ({e})."
        ) from e
    if x.dtype.kind not in "biuf" or x.ndim != 4 or len(x) == 0:
        raise ValueError(
            f"`{name}` must be a non-empty array of images (n, height, "
            f"width, channels) of numbers. Received: {name} of dtype "
            f"{x.dtype} and shape {x.shape}. Add the channel axis of grey "
            "images, e.g. x[..., None]; convert a dataset to an array "
            "first, e.g. np.concatenate(list(ds.as_numpy_iterator()))."
        )
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"`{name}` contains NaN or inf. Received: "
            f"{int((~finite).sum())} of {len(x)} images with non-finite "
            f"values, the first at index {int(np.argmax(~finite))}. Drop or "
            "repair them."
        )
    return x


def _check_range(name, x, value_range):
    low, high = value_range
    slack = 1e-3 * (high - low)
    lo, hi = float(x.min()), float(x.max())
    if lo < low - slack or hi > high + slack:
        raise ValueError(
            f"`{name}` must hold values in value_range={value_range}, the "
            f"range of the generator's samples. Received: values in "
            f"[{lo:g}, {hi:g}]. Scale the images like the GAN's training "
            "data (e.g. x / 127.5 - 1 or x * 2 - 1 for [-1, 1]), or set "
            "value_range."
        )
    if lo >= (low + high) / 2:
        warnings.warn(
            f"`{name}` uses only [{lo:g}, {hi:g}] of value_range="
            f"{value_range}: are they scaled like the GAN's training data "
            "(e.g. x * 2 - 1 for [-1, 1])?",
            stacklevel=3,
        )


class GANQuality(keras.callbacks.Callback):
    """Scores a GAN's samples against real images every few epochs.

    At the end of every `every`-th epoch (and of the first and the last
    epoch of each `fit()`, and of an epoch after which training stops) it
    draws `n_samples` images with
    `model.generate(n_samples, seed=seed, labels=labels)` (the EMA
    generator when the GAN has one: that is what `generate` uses), takes
    their features with `extractor` and compares them with the features of
    `real_images` (extracted once, at the first `on_train_begin`). The
    latent seed is fixed, so the scores of different epochs measure the
    same latent points. Scores go into the epoch's logs, in place, under
    `METRICS`' keys: `kid` and `kid_std` (KID, Bińkowski et al., ICLR
    2018), `fid` (FID, Heusel et al., NeurIPS 2017), `precision` and
    `recall` (Kynkäänniemi et al., NeurIPS 2019), `density` and `coverage`
    (Naeem et al., ICML 2020); see `fitcustom.evaluation`. Callbacks after
    this one in the `callbacks` list (`History`, `CSVLogger`,
    `TensorBoard`, `EarlyStopping`, `ModelCheckpoint`) see them.

    Epochs that are not scored log NaN under the same keys, so that every
    epoch has the same columns (`CSVLogger` fixes its columns at the first
    epoch) and `History`'s lists line up with the epochs. `EarlyStopping`,
    `ModelCheckpoint(save_best_only=True)` and `ReduceLROnPlateau` take
    the first value they see as the best and a NaN as no improvement:
    hence the first epoch of a `fit()` is always scored (a NaN best would
    never be beaten), and patience also counts unscored epochs. Use
    `patience >= every`, and `mode="min"` for `kid` and `fid`, `"max"` for
    the others (Keras cannot infer the direction of these names).

    The real-vs-real baseline, the same metrics between `real_images` and
    `held_out`, is the best score reachable at these sample counts (FID in
    particular is biased upwards for small samples). It is computed once,
    kept in `baseline`, printed when `verbose`, and logged at every epoch
    under the keys with a `_real` suffix (`kid_real`, `fid_real`, ...): a
    flat line that plots and CSV files show beside the scores. The
    generated set plays the held-out set's part, so `n_samples` defaults
    to `len(held_out)`. Without `held_out`, `real_images` is split into two
    halves (drawn with `seed`): the first is the reference, the second the
    held-out set.

    Under a `tf.distribute` strategy the scores equal those of one device
    with the same weights: `on_epoch_end` runs outside the replica
    context, where `generate` and the extractor read one copy of the
    weights.

    Args:
        real_images: Real images `(n, h, w, c)` scaled like the GAN's
            training data (its values in `value_range`), e.g. held-out
            test images.
        held_out: Other real images, disjoint from `real_images`, for the
            baseline. Defaults to `None` (split `real_images` in halves).
        extractor: `"digits"` (`digits_extractor()`, 8x8x1 images),
            `"inception"` (`inception_extractor()`), or a Keras model (or
            callable) from images to features, given images as they are.
            Defaults to `"digits"`.
        metrics: Names from `METRICS`: `"kid"`, `"fid"`,
            `"precision_recall"`, `"density_coverage"`. Defaults to
            `("kid", "fid")`.
        every: Score every `every` epochs. Defaults to `1`.
        n_samples: Generated images per scoring. Defaults to `None`: one
            per held-out image (or per label when `labels` is given).
        value_range: Range of the images' values, for the built-in
            extractors. Defaults to `(-1.0, 1.0)` (tanh).
        batch_size: Images per extractor call. Defaults to `None`: 32 for
            `"inception"` (299x299 activations), else 256.
        seed: Seed of the latent vectors, of the halves and of KID's
            subsets. Defaults to `0`.
        labels: Class labels for a conditional GAN, one per generated
            image; draw them with the real class frequencies. Defaults to
            `None`.
        kid_subsets: KID's number of subsets. Defaults to `100`.
        kid_subset_size: KID's subset size, lowered to the set sizes. When
            both sets are that small, every subset is the whole of both,
            one is computed and `kid_std` is 0: pick a smaller size to see
            the spread. Defaults to `1000`.
        k: Neighbour count of precision/recall and density/coverage.
            Defaults to `None`: 3 and 5, their papers' choices.
        verbose: `1` prints the baseline once, `2` also every score.
            Defaults to `1`.

    Attributes:
        baseline: Dict of the real-vs-real scores (after training begins).
        history: List of the scored epochs: dicts with `epoch` (1-based)
            and the scores.

    Example:

    ```python
    import keras
    import fitcustom
    from fitcustom import datasets, quality

    (x_train, _), (x_test, _) = datasets.load_digits()
    generator, discriminator = fitcustom.architectures.dcgan_8x8(16)
    gan = fitcustom.TapeGAN(generator=generator,
                            discriminator=discriminator, latent_dim=16)
    gan.compile(d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5))
    # Trained once, then read from ~/.keras/fitcustom (or cache_dir=).
    extractor = quality.digits_extractor()
    scores = quality.GANQuality(x_test * 2 - 1, extractor=extractor,
                                every=2, verbose=0)
    history = gan.fit(x_train[:256] * 2 - 1, batch_size=64, epochs=2,
                      verbose=0, callbacks=[
                          scores, keras.callbacks.CSVLogger("scores.csv")])
    print(history.history["kid"], scores.baseline["kid"])  # scores, floor
    ```
    """

    def __init__(
        self,
        real_images,
        *,
        held_out=None,
        extractor="digits",
        metrics=("kid", "fid"),
        every: int = 1,
        n_samples: int | None = None,
        value_range=(-1.0, 1.0),
        batch_size: int | None = None,
        seed: int = 0,
        labels=None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        k: int | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        self.metrics = _metric_names(metrics)
        positive = _args.whole
        self.every = positive("every", every)
        self.kid_subsets = positive("kid_subsets", kid_subsets)
        self.kid_subset_size = positive("kid_subset_size", kid_subset_size, 2)
        self.k = None if k is None else positive("k", k)
        if batch_size is not None:
            batch_size = positive("batch_size", batch_size)
        self.seed = _args.integer("seed", seed)
        self.verbose = verbose
        builtin = isinstance(extractor, str)
        if builtin and extractor not in ("digits", "inception"):
            raise ValueError(
                "`extractor` must be 'digits', 'inception' or a model from "
                f"images to features. Received: extractor={extractor!r}."
            )
        if not builtin and not callable(extractor):
            raise ValueError(
                "`extractor` must be 'digits', 'inception' or a model from "
                f"images to features. Received: an object of type "
                f"{type(extractor).__name__}, which is not callable."
            )
        value_range = extractors.value_range_of(value_range)
        real, held, split = _real_sets(
            real_images, held_out, extractor, value_range, self.seed
        )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 0 or (
                n_samples is not None and len(labels) != n_samples
            ):
                raise ValueError(
                    "`labels` must hold one label per generated image. "
                    f"Received: labels of shape {labels.shape} for "
                    f"n_samples={n_samples}."
                )
        if n_samples is None:
            n_samples = len(held) if labels is None else len(labels)
        self.n_samples = positive("n_samples", n_samples)
        self._check_counts(len(real), len(held), split)
        self.labels = labels
        self.value_range = value_range
        self.real_images = real
        self.held_out = held
        if builtin and extractor == "digits":
            extractor = digits_extractor(value_range)
        elif builtin:
            extractor = inception_extractor(value_range=value_range)
            batch_size = batch_size or 32
        self.extractor = extractor
        self.batch_size = batch_size or 256
        self.keys = [key for name in self.metrics for key in METRICS[name]]
        self.baseline = None
        self.history = []
        self._real_features = None
        self._first_epoch = True

    def _k(self, metric):
        return _DEFAULT_K[metric] if self.k is None else self.k

    def _check_counts(self, n_real, n_held, split):
        need = {
            name: 2 if name in ("kid", "fid") else self._k(name) + 1
            for name in self.metrics
        }
        name = max(need, key=need.get)
        fewest = need[name]
        sizes = {
            "real images": n_real,
            "held-out images": n_held,
            "generated images (n_samples)": self.n_samples,
        }
        for what, size in sizes.items():
            if size >= fewest:
                continue
            how = f" with k={self._k(name)}" if name in _DEFAULT_K else ""
            where = (
                " (real_images split in halves, as held_out=None)"
                if split and what != "generated images (n_samples)"
                else ""
            )
            raise ValueError(
                f"Too few {what} for the metrics: {name!r}{how} needs at "
                f"least {fewest} per set. Received: {size}{where}. Pass "
                "more images, or fewer/other metrics."
            )

    # ------------------------------------------------------------------
    # Keras hooks
    # ------------------------------------------------------------------

    @property
    def epoch_line(self) -> dict:
        """What `fit()`'s progress bar shows of this callback's logs: the
        scores on the epochs that computed them, the baselines on the
        first epoch (History and CSVLogger get them all, every epoch)."""
        marks = dict.fromkeys(self.keys, "when_computed")
        marks.update(
            dict.fromkeys((f"{k}_real" for k in self.keys), "first_epoch")
        )
        return marks

    def on_train_begin(self, logs=None):
        self._check_model()
        self._prepare()
        self._first_epoch = True

    def on_epoch_end(self, epoch, logs=None):
        epoch += 1
        last = (self.params or {}).get("epochs")
        stopping = bool(getattr(self.model, "stop_training", False))
        first, self._first_epoch = self._first_epoch, False
        if first or epoch % self.every == 0 or epoch == last or stopping:
            scores = self.measure()
            self.history.append({"epoch": epoch, **scores})
            if self.verbose >= 2:
                print(f"Epoch {epoch}: {_format(scores)}")
        else:
            scores = dict.fromkeys(self.keys, float("nan"))
        if logs is not None:
            logs.update(scores)
            logs.update({f"{k}_real": v for k, v in self.baseline.items()})

    # ------------------------------------------------------------------
    # Pieces
    # ------------------------------------------------------------------

    def measure(self) -> dict:
        """The scores of the model's samples now (what an epoch logs).

        NaN for every score, with a warning, when a sample is not finite
        (a diverged generator).
        """
        self._check_model()
        self._prepare()
        images = self._generate(self.n_samples)
        if not np.isfinite(images).all():
            warnings.warn(
                "GANQuality: the generator's samples contain NaN or inf; "
                "their scores are logged as NaN.",
                stacklevel=2,
            )
            return dict.fromkeys(self.keys, float("nan"))
        return self.scores(self._real_features, self._features(images))

    def scores(self, real_features, fake_features) -> dict:
        """The chosen metrics of two feature sets, by log key."""
        out = {}
        for name in self.metrics:
            if name == "kid":
                size = min(self.kid_subset_size, len(real_features))
                whole = size == len(real_features) == len(fake_features)
                out["kid"], out["kid_std"] = evaluation.kernel_distance(
                    real_features,
                    fake_features,
                    # Subsets that are the whole sets are all the same.
                    subsets=1 if whole else self.kid_subsets,
                    subset_size=self.kid_subset_size,
                    seed=self.seed,
                )
            elif name == "fid":
                out["fid"] = evaluation.frechet_distance(
                    real_features, fake_features
                )
            elif name == "precision_recall":
                out["precision"], out["recall"] = evaluation.precision_recall(
                    real_features, fake_features, k=self._k(name)
                )
            else:
                out["density"], out["coverage"] = evaluation.density_coverage(
                    real_features, fake_features, k=self._k(name)
                )
        return out

    def _features(self, images):
        return evaluation.extract_features(
            self.extractor, images, batch_size=self.batch_size
        )

    def _prepare(self):
        """Real features and the baseline, once."""
        if self._real_features is not None:
            return
        real = self._features(self.real_images)
        self.baseline = self.scores(real, self._features(self.held_out))
        self._real_features = real
        if self.verbose:
            print(
                f"GANQuality real-vs-real baseline ({len(self.real_images)}"
                f" vs {len(self.held_out)} images): {_format(self.baseline)}"
            )

    def _generate(self, n):
        """`n` samples from the model (`labels=` only where given, so a
        model whose `generate(n, seed=...)` takes no labels works)."""
        if self.labels is None:
            return self.model.generate(n, seed=self.seed)
        return self.model.generate(n, seed=self.seed, labels=self.labels[:n])

    def _check_model(self):
        model = self.model
        if not callable(getattr(model, "generate", None)):
            raise ValueError(
                "GANQuality needs a model with generate(n, seed=...) (and "
                "labels=... for a conditional one), such as fitcustom.TapeGAN "
                "or a diffusion model of your own. Received: a model "
                f"of type {type(model).__name__}."
            )
        if self._real_features is None:  # before training: check shapes
            probe = self._generate(1)
            shape = tuple(np.shape(probe)[1:])
            if shape != self.real_images.shape[1:]:
                raise ValueError(
                    "The generator's samples and real_images must have one "
                    f"shape. Received: samples of shape {shape}, "
                    f"real_images of shape {self.real_images.shape[1:]}."
                )


def _real_sets(real_images, held_out, extractor, value_range, seed):
    """`(reference, held-out, split)`: the real images checked, and split
    in halves drawn with `seed` when `held_out` is `None`."""
    real = _images("real_images", real_images)
    held = _images("held_out", held_out, allow_none=True)
    if held is not None and held.shape[1:] != real.shape[1:]:
        raise ValueError(
            "`held_out` must hold images of the shape of real_images'. "
            f"Received: real_images of shape {real.shape} and held_out "
            f"of shape {held.shape}."
        )
    if extractor == "digits" and real.shape[1:] != (8, 8, 1):
        raise ValueError(
            "extractor='digits' takes 8x8 grey images (n, 8, 8, 1). "
            f"Received: real_images of shape {real.shape}. Use "
            "extractor='inception' or a model of your own."
        )
    if isinstance(extractor, str):
        _check_range("real_images", real, value_range)
        if held is not None:
            _check_range("held_out", held, value_range)
    if held is not None:
        return real, held, False
    order = np.random.default_rng(seed).permutation(len(real))
    half = len(real) - len(real) // 2
    return real[order[:half]], real[order[half:]], True


def _metric_names(metrics):
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        what = f"Unknown metric(s) {unknown}" if unknown else "No metric"
        raise ValueError(
            f"{what}. Received: metrics={metrics!r}. Expected a non-empty "
            f"list of names from {list(METRICS)}."
        )
    return tuple(dict.fromkeys(names))  # without repeats, in order


def _format(scores):
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
