"""Callbacks: sample grids of a `TapeGAN` during training."""

import os

import keras
import numpy as np


class SampleGrid(keras.callbacks.Callback):
    """Writes a PNG grid of generated samples at chosen epochs.

    The latent vectors come from one fixed seed, so grids from different
    epochs show the same points of the latent space and can be compared.
    Uses the EMA generator when the GAN has one.

    Args:
        output_dir: Folder for the PNG files (created if missing).
        every: Write every `every` epochs (and at the last epoch).
            Defaults to 1.
        epochs: Optional explicit list of (1-based) epochs instead.
        n: Number of samples (a square grid is used). Defaults to 16.
        seed: Latent seed. Defaults to 0.
        labels: Class labels for a conditional GAN (length `n`).
        filename: Pattern with `{epoch}`. Defaults to
            `"samples_epoch_{epoch:03d}.png"`.
        value_range: Range of the generator's output, mapped to black and
            white. Defaults to `(-1.0, 1.0)` (tanh).

    Example:

    ```python
    import fitcustom
    grid = fitcustom.SampleGrid("outputs/grids", every=5, n=16)
    # gan.fit(images, epochs=20, callbacks=[grid])
    ```
    """

    def __init__(
        self,
        output_dir,
        every=1,
        epochs=None,
        n=16,
        seed=0,
        labels=None,
        filename="samples_epoch_{epoch:03d}.png",
        value_range=(-1.0, 1.0),
    ):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"`every` must be an int >= 1. Received: every={every!r}."
            )
        if "{epoch" not in filename:
            raise ValueError(
                "`filename` must contain `{epoch}` (e.g. "
                f"'grid_{{epoch:03d}}.png'). Received: filename={filename!r}."
            )
        self.output_dir = os.fspath(output_dir)
        self.every = every
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.n = int(n)
        self.seed = int(seed)
        self.labels = labels
        self.filename = filename
        self.value_range = value_range
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
        images = self.model.generate(self.n, seed=self.seed, labels=self.labels)
        path = os.path.join(self.output_dir, self.filename.format(epoch=epoch))
        save_grid(images, path, self.value_range)
        self.written.append(path)


def save_grid(images, path, value_range=(-1.0, 1.0)):
    """Saves images (N, H, W[, C]) as one PNG grid with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, np.float32)
    low, high = value_range
    images = np.clip((images - low) / (high - low), 0.0, 1.0)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image in zip(np.ravel(axes), images):
        ax.imshow(
            image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
