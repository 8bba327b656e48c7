"""GAN quality metrics on feature arrays: FID, KID, precision/recall,
density/coverage.

These are the numbers GAN papers report. Each compares two sets of
features (rows = samples), usually the activations of a fixed pretrained
network (e.g. Inception-v3's 2048-wide pool layer) on real and on
generated images; `extract_features` runs any Keras model over images in
batches to get them. The metrics take NumPy arrays, compute in float64
and return Python floats.

| function | metric | better |
| --- | --- | --- |
| `frechet_distance` | FID: distance of Gaussians fitted to each set | lower |
| `kernel_distance` | KID: unbiased MMD^2, cubic polynomial kernel | lower |
| `precision_recall` | fidelity and diversity from k-NN balls | higher |
| `density_coverage` | the same, robust to outliers | higher |

A score is only comparable with another computed with the same feature
extractor (and preprocessing) and the same sample counts: FID in
particular is biased upwards for small samples. Read every score beside a
real-vs-real baseline: the same metric between two disjoint real samples
of the sizes used, which is the best value reachable at those sizes.

Example:

```python
import numpy as np
from fitcustom import evaluation

rng = np.random.default_rng(0)
real, other_real = rng.normal(size=(2, 500, 8))
fake = rng.normal(loc=0.5, size=(500, 8))
baseline = evaluation.frechet_distance(real, other_real)  # 0.1: bias
fid = evaluation.frechet_distance(real, fake)  # mean term 8 * 0.5**2 = 2
assert baseline < fid
precision, recall = evaluation.precision_recall(real, fake, k=3)
```

May import: the ground floor.
"""

import contextlib
import inspect
import weakref

import numpy as np

from fitcustom import _args
from fitcustom.checks import describe_structure

_BLOCK_ROWS = 1024  # rows of a distance block: 1024 x 10k float64 = 80 MB
# Relative to the largest squared norms: far above the rounding of the
# fast distances (about d * 1e-16), far below real differences.
_TIE_TOLERANCE = 1e-9


def _count(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _features(name, x, min_rows, why, fix="Pass more samples."):
    """`x` as a finite 2-D float64 array of at least `min_rows` rows.

    Args:
        name: The argument's name in the message.
        x: The feature array (rows = samples).
        min_rows: The fewest rows the metric can use.
        why: What needs that many rows, for the message.
        fix: The way out, for the message.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(
            f"`{name}` must hold real numbers. Received: {name} of dtype "
            f"{x.dtype} and shape {x.shape}. Convert it to a float array, "
            f"e.g. np.asarray({name}, dtype='float64')."
        )
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(
            f"`{name}` must be a 2-D array of features, one row per sample "
            f"and at least one column. Received: {name} of shape {x.shape}."
            f" Flatten the features first, e.g. {name}.reshape(len({name}),"
            " -1), or get them with extract_features()."
        )
    if len(x) < min_rows:
        raise ValueError(
            f"`{name}` has too few samples: {why}. Received: {name} of "
            f"shape {x.shape} ({_count(len(x), 'sample')}). Expected at "
            f"least {min_rows} samples. {fix}"
        )
    x = x.astype(np.float64, copy=False)
    if not (np.isfinite(x.min()) and np.isfinite(x.max())):
        bad = ~np.isfinite(x).all(axis=1)
        raise ValueError(
            f"`{name}` contains NaN or inf. Received: "
            f"{_count(int(bad.sum()), 'row')} of {len(x)} with non-finite "
            f"values, the first at row {int(np.argmax(bad))}. Expected "
            "finite features. Check the generator's outputs and the feature "
            "extractor, or drop those rows."
        )
    return x


def _feature_pair(names, a, b, min_rows, why, fix="Pass more samples."):
    """Both feature sets checked by `_features`, of one width."""
    a = _features(names[0], a, min_rows, why, fix)
    b = _features(names[1], b, min_rows, why, fix)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same number of "
            f"features. Received: {names[0]} of shape {a.shape} and "
            f"{names[1]} of shape {b.shape}. Extract both with the same "
            "feature extractor."
        )
    return a, b


def frechet_distance(a, b) -> float:
    """Fréchet Inception Distance (FID) between two feature sets.

    Fits a Gaussian to each set (mean and covariance with ddof=1) and
    returns the squared Fréchet (2-Wasserstein) distance between them,
    `|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`. Lower is
    better; 0 means equal means and covariances. Typical use: features of
    10,000 or 50,000 real and generated images; FID is biased upwards for
    fewer samples, so compare scores only at equal sample counts.

    The trace of the matrix square root is taken from symmetric
    eigendecompositions, `Tr((S_a S_b)^(1/2)) = sum sqrt(eig(R S_b R))`
    with `R = S_a^(1/2)`, which stays finite and real for singular
    covariances (fewer samples than features).

    Reference: Heusel et al., "GANs Trained by a Two Time-Scale Update
    Rule Converge to a Local Nash Equilibrium", NeurIPS 2017.

    Args:
        a: Features of shape `(n_a, d)`, `n_a >= 2`, e.g. of real images.
        b: Features of shape `(n_b, d)`, `n_b >= 2`, e.g. of generated
            images.

    Returns:
        The FID, a float >= 0.
    """
    a, b = _feature_pair(("a", "b"), a, b, 2, "a covariance needs 2")
    mean_a, cov_a = _moments(a)
    mean_b, cov_b = _moments(b)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
    diff = mean_a - mean_b
    fid = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    # Mathematically >= 0; only rounding can take it below.
    return float(max(fid, 0.0))


def _moments(x):
    mean = x.mean(axis=0)
    centered = x - mean
    return mean, centered.T @ centered / (len(x) - 1)


def kernel_distance(
    a, b, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (KID) between two feature sets.

    The unbiased estimate of the squared maximum mean discrepancy (MMD^2)
    with the cubic polynomial kernel `k(x, y) = (x . y / d + 1)^3`
    (`d` = number of features), averaged over `subsets` random subsets of
    `m` rows of each set, drawn without replacement. Lower is better; the
    expected value is 0 when both sets come from one distribution, and
    single estimates can then be slightly negative. Unlike FID it is
    unbiased, so it can be compared across sample counts, but its spread
    (the returned std) shrinks with `m`. Typical use: Inception features
    of a few thousand images per set, reported as mean +- std.

    `m = min(subset_size, n_a, n_b)`: the subset size is lowered
    automatically to the smaller set. When `m` equals both set sizes,
    every subset is the whole of both sets and the std is 0: pick
    `subset_size` below the set sizes to see the spread.

    Reference: Bińkowski et al., "Demystifying MMD GANs", ICLR 2018.

    Args:
        a: Features of shape `(n_a, d)`, `n_a >= 2`.
        b: Features of shape `(n_b, d)`, `n_b >= 2`.
        subsets: Number of random subsets. Defaults to `100`.
        subset_size: Rows drawn from each set per subset (at most the
            smaller set's size). Defaults to `1000`.
        seed: Seed of the `np.random.Generator` that draws the subsets.
            Defaults to `0`.

    Returns:
        `(mean, std)` of the estimates over the subsets (std with
        ddof=0).
    """
    subsets = _args.whole("subsets", subsets)
    subset_size = _args.whole("subset_size", subset_size, 2)
    a, b = _feature_pair(
        ("a", "b"), a, b, 2, "the unbiased MMD estimate needs 2"
    )
    m = min(subset_size, len(a), len(b))
    width = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = _cubic_kernel(x, x, width)
        k_yy = _cubic_kernel(y, y, width)
        k_xy = _cubic_kernel(x, y, width)
        within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
        estimates[i] = within / (m * (m - 1)) - 2 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


def _cubic_kernel(x, y, width):
    """`(x . y / width + 1)^3` for all pairs of rows, in place (NumPy's
    `** 3` is several times slower)."""
    base = x @ y.T
    base /= width
    base += 1
    cube = base * base
    cube *= base
    return cube


def _squared_distances(x, y):
    """Squared Euclidean distances between the rows of `x` and `y`, from
    `|x|^2 + |y|^2 - 2 x.y` (fast, but its rounding depends on the block
    shapes BLAS sees)."""
    d = x @ y.T
    d *= -2
    d += np.einsum("ij,ij->i", x, x)[:, None]
    d += np.einsum("ij,ij->i", y, y)[None, :]
    return np.maximum(d, 0, out=d)


def _direct(x, y):
    """Squared distances of the paired rows `x[i]`, `y[i]` as
    `sum((x - y)^2)`: the same number for (x, y) and (y, x)."""
    diff = x - y
    return (diff * diff).sum(axis=1)


def _blocks(x, y):
    """`(start, squared distances of x[start:start + block] to y)`, block
    by block, so that memory stays `_BLOCK_ROWS * len(y)` floats."""
    for start in range(0, len(x), _BLOCK_ROWS):
        yield start, _squared_distances(x[start : start + _BLOCK_ROWS], y)


def _knn_radii(x, k):
    """Squared distance of each row of `x` to its k-th nearest other row
    (found from the fast distances, measured with `_direct`)."""
    radii = np.empty(len(x))
    for start, d in _blocks(x, x):
        rows = np.arange(len(d))
        d[rows, start + rows] = np.inf  # not its own neighbour
        nearest = np.argpartition(d, k - 1, axis=1)[:, k - 1]
        radii[start : start + len(d)] = _direct(x[start + rows], x[nearest])
    return radii


def _memberships(points, centres, radii):
    """Whether each point lies in each centre's ball, `_BLOCK_ROWS` points
    at a time: boolean blocks `inside[i, j] = |p_i - c_j|^2 <= radii[j]`.

    Distances within rounding of a radius are measured again with
    `_direct`, so a point exactly on a ball's edge (a copy of the centre's
    k-th neighbour, a grid) counts as inside whatever the block size.
    """
    scale = np.einsum("ij,ij->i", points, points).max()
    scale += np.einsum("ij,ij->i", centres, centres).max()
    tolerance = _TIE_TOLERANCE * scale
    for start, d in _blocks(points, centres):
        d -= radii[None, :]  # in place: <= 0 inside
        inside = d <= 0
        rows, cols = np.nonzero(np.abs(d) <= tolerance)
        if len(rows):
            exact = _direct(points[start + rows], centres[cols])
            inside[rows, cols] = exact <= radii[cols]
        yield inside


def _in_any_ball(points, centres, radii):
    """Fraction of `points` in the ball of at least one centre."""
    inside = 0
    for block in _memberships(points, centres, radii):
        inside += int(block.any(axis=1).sum())
    return inside / len(points)


def _neighbour_sets(real, fake, k):
    """`k` and both sets checked for a k-nearest-neighbour metric, minus
    the real mean (the same distances, less rounding in
    `|x|^2 + |y|^2 - 2 x.y`)."""
    k = _args.whole("k", k)
    real, fake = _feature_pair(
        ("real", "fake"),
        real,
        fake,
        k + 1,
        f"k={k} nearest other points need {k + 1}",
        "Pass more samples or a smaller k.",
    )
    mean = real.mean(axis=0)
    return k, real - mean, fake - mean


def precision_recall(real, fake, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of generated features.

    Each point of a set gets a ball reaching its k-th nearest other point
    of the same set; the balls together estimate the set's support.
    Precision is the fraction of fake points inside at least one real
    ball (fidelity: do samples look real?); recall is the fraction of real
    points inside at least one fake ball (diversity: is all of the real
    data covered?). Both lie in [0, 1]; higher is better. A point on a
    ball's edge counts as inside. Typical use: with FID, to tell low
    quality from low variety (mode collapse lowers recall, not precision).

    Distances are computed `_BLOCK_ROWS` rows at a time, so memory stays
    bounded for 10k x 10k sets.

    Reference: Kynkäänniemi et al., "Improved Precision and Recall Metric
    for Assessing Generative Models", NeurIPS 2019.

    Args:
        real: Real features of shape `(n, d)`, `n >= k + 1`.
        fake: Generated features of shape `(m, d)`, `m >= k + 1`.
        k: The neighbour that sets each ball's radius. Defaults to `3`
            (the paper's choice).

    Returns:
        `(precision, recall)`.
    """
    k, real, fake = _neighbour_sets(real, fake, k)
    precision = _in_any_ball(fake, real, _knn_radii(real, k))
    recall = _in_any_ball(real, fake, _knn_radii(fake, k))
    return precision, recall


def density_coverage(real, fake, *, k: int = 5) -> tuple[float, float]:
    """Density and coverage of generated features.

    Balls around the real points only, each reaching the point's k-th
    nearest other real point. Density is the mean number of real balls a
    fake point lies in, divided by `k`: about 1 when fake points are
    spread like real ones, above 1 when they crowd into dense real
    regions, so it can exceed 1 (fidelity). Coverage is the fraction of
    real balls that hold at least one fake point, in [0, 1] (diversity).
    Higher is better for both. Unlike precision and recall they are not
    inflated by a few outlying fake points, whose own balls would be
    large, since only real balls are used. A point on a ball's edge
    counts as inside. Typical use: beside or instead of
    precision/recall.

    `density = 1 / (k M) sum_j sum_i 1[fake_j in B(real_i, r_i)]`,
    `coverage = 1 / N sum_i 1[some fake_j in B(real_i, r_i)]`.

    Reference: Naeem et al., "Reliable Fidelity and Diversity Metrics for
    Generative Models", ICML 2020.

    Args:
        real: Real features of shape `(N, d)`, `N >= k + 1`.
        fake: Generated features of shape `(M, d)`, `M >= k + 1`.
        k: The neighbour that sets each ball's radius. Defaults to `5`
            (the paper's choice).

    Returns:
        `(density, coverage)`.
    """
    k, real, fake = _neighbour_sets(real, fake, k)
    in_balls = 0
    covered = np.zeros(len(real), bool)
    for block in _memberships(fake, real, _knn_radii(real, k)):
        in_balls += int(block.sum())
        covered |= block.any(axis=0)
    return in_balls / (k * len(fake)), float(covered.mean())


def extract_features(extractor, images, *, batch_size: int = 256) -> np.ndarray:
    """Features of `images`: `extractor`'s outputs, one row per image.

    Runs `extractor` over the images batch by batch in one `tf.function`
    (made once per extractor and traced once per batch shape), with
    `training=False` when it takes that argument (every Keras layer and
    model does: batch normalization uses its moving
    statistics and dropout is off, so a row does not depend on the other
    images of its batch). Each output is flattened to `(batch, features)`.
    Typical use: the pool features of a pretrained classifier, e.g.
    `keras.applications.InceptionV3(include_top=False, pooling="avg")`,
    for the metrics of this module; apply the preprocessing the extractor
    expects first.

    Args:
        extractor: A Keras model or layer, or another callable on a batch
            of images that returns one tensor.
        images: A NumPy array of images (first axis = images), or a
            `tf.data.Dataset` that yields batches of images only (map
            `(images, labels)` pairs to images first).
        batch_size: Images per call for array input; a dataset keeps its
            own batches. Defaults to `256`.

    Returns:
        A float64 NumPy array of shape `(n_images, features)`.
    """
    import tensorflow as tf

    batch_size = _args.whole("batch_size", batch_size)
    if isinstance(images, tf.data.Dataset):
        spec = images.element_spec
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                "The dataset must yield batches of images only. Received: "
                f"a tf.data.Dataset with element spec {spec}. Map it to the"
                " images first, e.g. dataset.map(lambda x, y: x)."
            )
        batches = iter(images)
    else:
        images = np.asarray(images)
        if images.ndim < 2 or len(images) == 0:
            raise ValueError(
                "`images` must be an array of at least one image (first "
                f"axis = images). Received: images of shape {images.shape}."
            )
        batches = (
            tf.convert_to_tensor(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        )
    run = _compiled(extractor)
    rows = [_flat_rows(run(batch)) for batch in batches]
    if not rows:
        raise ValueError(
            "`images` holds no images. Received: an empty tf.data.Dataset."
            " Expected at least one batch."
        )
    return np.concatenate(rows, axis=0)


# One tf.function per extractor, kept as long as the extractor lives:
# called every epoch (GANQuality), a new function would trace every time.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(extractor):
    """`extractor` (with `training=False` when it takes it) in a
    `tf.function`, made once per extractor."""
    import keras
    import tensorflow as tf

    try:
        return _COMPILED[extractor]
    except (KeyError, TypeError):
        pass
    takes_training = isinstance(extractor, keras.layers.Layer) or (
        _accepts_training(extractor)
    )

    try:
        # A weak reference, so that the cache does not keep it alive.
        target = weakref.ref(extractor)
    except TypeError:  # not weakly referenceable: compiled per call
        target = lambda: extractor  # noqa: E731

    # A graph per input shape (the whole batches, the last one): shapes
    # stay static, which models with Flatten or a resize need.
    @tf.function
    def run(batch):
        if takes_training:
            return target()(batch, training=False)
        return target()(batch)

    with contextlib.suppress(TypeError):
        _COMPILED[extractor] = run
    return run


def _flat_rows(outputs):
    """One batch of outputs as a float64 array of shape `(batch, -1)`."""
    import keras

    leaves = keras.tree.flatten(outputs)
    if len(leaves) != 1:
        raise ValueError(
            "The extractor must return one tensor. Received: "
            f"{describe_structure(outputs)}. Return the output to use, "
            "e.g. keras.Model(model.input, model.get_layer(name).output)."
        )
    values = np.asarray(leaves[0], np.float64)
    return values.reshape(len(values), -1)


def _accepts_training(extractor):
    """Whether a callable (not a Keras layer) takes `training=`."""
    try:
        parameters = inspect.signature(extractor).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "training" or p.kind is p.VAR_KEYWORD for p in parameters
    )
