"""Long runs: thousands of steps without memory growth or retracing."""

import keras
import numpy as np
import pytest

import fitcustom


def _rss_bytes():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


class _RecordRSS(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rss = []

    def on_epoch_end(self, epoch, logs=None):
        self.rss.append(_rss_bytes())


@pytest.mark.slow
def test_4800_steps_no_memory_growth_no_retrace():
    traces = []

    class Counting(fitcustom.TapeModel):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1600, 16)).astype("float32")
    y = rng.integers(0, 4, size=1600)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    model = Counting(inputs, keras.layers.Dense(4)(h))
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
        log_gradient_norm=True,
        skip_nonfinite=True,
    )
    record = _RecordRSS()
    model.fit(x, y, batch_size=8, epochs=24, verbose=0, callbacks=[record])
    assert model.optimizer.iterations.numpy() == 4800
    assert len(traces) == 1
    # Skip the first epochs (allocator warm-up), then fit a line. Measured:
    # 3-23 KiB per epoch of 200 steps; the bound is 64 KiB.
    rss = np.asarray(record.rss[8:], np.float64)
    slope = np.polyfit(np.arange(len(rss)), rss, 1)[0]
    print(
        f"RSS per epoch (MiB): {np.round(rss / 2**20, 1).tolist()}, "
        f"slope {slope / 1024:.1f} KiB/epoch"
    )
    assert slope < 64 * 1024, f"RSS grows {slope / 1024:.0f} KiB per epoch"
