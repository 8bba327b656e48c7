"""Callbacks: sample grids of a `TapeGAN` during training.

May import: the ground floor.
"""

import os

import keras
import numpy as np

from fitcustom import _args
from fitcustom._engine_state import fit_callbacks_of


class SampleGrid(keras.callbacks.Callback):
    """Writes a PNG grid of generated samples at chosen epochs.

    The latent vectors come from one fixed seed (`model.generate(n,
    seed=seed)`), so grids from different epochs show the same points of
    the latent space, in the same cells, on the same grey scale, and can be
    compared. Uses the EMA generator when the GAN has one. Drawn with
    matplotlib's Agg canvas directly: the global matplotlib backend (e.g.
    a notebook's) is left alone. When the same `fit()` has a
    `keras.callbacks.TensorBoard`, each grid also goes to its log
    directory (`LOG_DIR/samples`, tag "samples", the step the epoch's
    other summaries have), and shows in TensorBoard's images tab.

    Args:
        output_dir: Folder for the PNG files (created if missing).
        every: Write every `every` epochs (and at the last epoch).
            Defaults to 1.
        epochs: Optional explicit list of (1-based) epochs instead of
            `every`.
        n: Number of samples (a square grid is used). Defaults to 16.
        seed: Latent seed. Defaults to 0.
        labels: Class labels for a conditional GAN (length `n`), e.g.
            `np.arange(16) % 10`. Defaults to `None`.
        filename: File name pattern, formatted with `epoch` (1-based), e.g.
            `"grid_{epoch:03d}.png"`. Defaults to
            `"samples_epoch_{epoch:03d}.png"`.
        value_range: Range of the generator's output, mapped to black and
            white. Defaults to `(-1.0, 1.0)` (tanh).

    Example:

    ```python
    import keras
    import numpy as np
    import fitcustom

    generator = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
        keras.layers.Reshape((4, 4, 1))])
    discriminator = keras.Sequential([
        keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    gan = fitcustom.TapeGAN(generator=generator,
                            discriminator=discriminator, latent_dim=8)
    gan.compile()
    grid = fitcustom.SampleGrid("outputs/grids", epochs=[1, 2], n=9,
                                filename="digits_{epoch:02d}.png")
    real = np.random.uniform(-1, 1, (32, 4, 4, 1)).astype("float32")
    gan.fit(real, batch_size=16, epochs=2, verbose=0, callbacks=[grid])
    print(grid.written)  # ['outputs/grids/digits_01.png', ...]
    ```
    """

    def __init__(
        self,
        output_dir: str,
        every: int = 1,
        epochs=None,
        n: int = 16,
        seed: int = 0,
        labels=None,
        filename: str = "samples_epoch_{epoch:03d}.png",
        value_range: tuple = (-1.0, 1.0),
    ):
        super().__init__()
        every = _args.whole("every", every)
        n = _args.whole("n", n)
        seed = _args.integer("seed", seed)
        try:
            example = filename.format(epoch=1)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                "`filename` must be a pattern formatted with `epoch` only, "
                f"e.g. 'grid_{{epoch:03d}}.png'. Received: filename="
                f"{filename!r} ({type(e).__name__}: {e})."
            ) from e
        if "{epoch" not in filename or example == filename.format(epoch=2):
            raise ValueError(
                "`filename` must contain `{epoch}` so that epochs do not "
                "overwrite each other (e.g. 'grid_{epoch:03d}.png'). "
                f"Received: filename={filename!r}."
            )
        if epochs is not None:
            epochs = list(epochs)
            if not epochs or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 1
                for e in epochs
            ):
                raise ValueError(
                    "`epochs` must be a non-empty list of 1-based epoch "
                    f"numbers (ints >= 1). Received: epochs={epochs!r}."
                )
        try:  # needed only at the first epoch's end: checked now
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "SampleGrid draws its grids with matplotlib, which is not "
                "installed. Install it with `pip install matplotlib` (or "
                "`pip install fitcustom[examples]`)."
            ) from e
        low, high = value_range
        if not high > low:
            raise ValueError(
                "`value_range` must be (low, high) with high > low. "
                f"Received: value_range={value_range!r}."
            )
        if labels is not None and len(labels) != n:
            raise ValueError(
                "`labels` must hold one label per sample. Received: "
                f"{len(labels)} labels for n={n}."
            )
        self.output_dir = os.fspath(output_dir)
        self.every = every
        self.epochs = None if epochs is None else set(epochs)
        self.n = n
        self.seed = seed
        self.labels = labels
        self.filename = filename
        self.value_range = (float(low), float(high))
        self.written = []

    def _selected(self, epoch):
        if self.epochs is not None:
            return epoch in self.epochs
        last = self.params.get("epochs") if self.params else None
        return epoch % self.every == 0 or epoch == last

    def on_epoch_end(self, epoch, logs=None):
        epoch = epoch + 1
        if not self._selected(epoch):
            return
        if not hasattr(self.model, "generate"):
            raise ValueError(
                "SampleGrid needs a model with generate(n, seed=...), such "
                "as fitcustom.TapeGAN. Received: a model of type "
                f"{type(self.model).__name__}."
            )
        images = self.model.generate(self.n, seed=self.seed, labels=self.labels)
        path = os.path.join(self.output_dir, self.filename.format(epoch=epoch))
        save_grid(images, path, self.value_range, title=f"after epoch {epoch}")
        self.written.append(path)
        self._to_tensorboard(images, epoch - 1)

    def _to_tensorboard(self, images, step):
        """The grid as an image summary in the run's TensorBoard log
        directory, if the `fit()` has a TensorBoard callback."""
        board = next(
            (
                c
                for c in fit_callbacks_of(self.model)
                if isinstance(c, keras.callbacks.TensorBoard)
            ),
            None,
        )
        if board is None:
            return
        import tensorflow as tf

        if getattr(self, "_writer", None) is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(board.log_dir, "samples")
            )
        grid = tile(images, self.value_range)
        with self._writer.as_default():
            tf.summary.image("samples", grid[None], step=step)
        self._writer.flush()

    def on_train_end(self, logs=None):
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()
            self._writer = None


def tile(images, value_range=(-1.0, 1.0)):
    """Images `(N, H, W)` or `(N, H, W, C)` as one grid image `(rows * H,
    cols * W, C)` in [0, 1], the cells in the order of `save_grid`'s (the
    empty ones black)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    low, high = value_range
    images = np.clip((images - low) / (high - low), 0.0, 1.0)
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return grid


def save_grid(images, path, value_range=(-1.0, 1.0), title=None):
    """Saves images `(N, H, W)` or `(N, H, W, C)` as one PNG grid.

    Values are mapped linearly from `value_range` to black..white (clipped),
    the same mapping for every grid. Uses matplotlib's Agg canvas without
    touching the global backend. `title`, if given, is written above the
    grid.

    Returns:
        `path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(
            "save_grid needs a batch of images (N, H, W) or (N, H, W, C). "
            f"Received: an array of shape {images.shape}."
        )
    low, high = value_range
    images = np.clip((images - low) / (high - low), 0.0, 1.0)
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    top = 0.4 if title else 0.0  # inches for the title
    fig = Figure(figsize=(cols, rows + top))
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
        fig.subplots_adjust(top=rows / (rows + top))
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(
                images[i],
                cmap="gray" if images[i].ndim == 2 else None,
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
